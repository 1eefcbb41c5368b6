import Foundation
import QuiesceAgent
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePlugins
import QuiesceTestSupport
import QuiesceWire
import Synchronization
import Testing

/// A demo-like fleet end to end: an XFS reflink pool on a loop device, disk
/// images in it loop-mounted as ext4, one agent per instance over mutual TLS,
/// a fleet file, the coordinator, the local provider and the SQLite catalog.
@Suite("Fleet runs end to end", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct CoordinatorTests {
    @Test("three levels with their reasons, a missing agent reported, tags, catalog rows, everything thawed")
    func fleetRun() async throws {
        try await withLoopDevices { loops in
            let pool = try await blocking { try loops.mount("pool", fsType: "xfs", sizeMiB: 400, mkfsOptions: ["-m", "reflink=1"]).mountPoint }
            let provider = try LocalProvider(pool: pool + "/quiesce", createBurst: 20, createsPerSecond: 50)
            #expect(provider.reflinkSupported)
            var mounts: [String: String] = [:]
            for id in ["app-1", "loose-1", "base-1"] {
                let image = try provider.diskPath("\(id)-data")
                let mountPoint = try await blocking {
                    _ = try run("truncate", "-s", "64M", image)
                    _ = try run("mkfs.ext4", "-q", "-F", image)
                    return try loops.mountDevice(try loops.attach(image), at: id)
                }
                mounts[id] = mountPoint
            }
            // ghost-1's disk exists (the provider's check passes); its agent never connects.
            #expect(FileManager.default.createFile(atPath: try provider.diskPath("ghost-1-data"), contents: Data(count: 4096)))
            // Seed scripts: valid on app-1, mode 0755 on loose-1, none on base-1.
            var locations: [String: HookLocations] = [:]
            for id in ["app-1", "loose-1", "base-1"] {
                let dir = loops.directory + "/hooks-" + id
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                locations[id] = HookLocations(prescript: dir + "/prescript.sh", postscript: dir + "/postscript.sh", hookDirectory: dir)
            }
            try PluginPlanRunTests.writeHook(locations["app-1"]!.prescript, "#!/bin/sh\necho frozen-app\n")
            try PluginPlanRunTests.writeHook(locations["app-1"]!.postscript, "#!/bin/sh\necho thawed-app\n")
            try PluginPlanRunTests.writeHook(locations["loose-1"]!.prescript, "#!/bin/sh\nexit 0\n", mode: 0o755)
            try PluginPlanRunTests.writeHook(locations["loose-1"]!.postscript, "#!/bin/sh\nexit 0\n")

            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            var tasks: [Task<Void, any Error>] = []
            var handlers: [BuiltinCommandHandler] = []
            for id in ["app-1", "loose-1", "base-1"] {
                let handler = BuiltinCommandHandler(
                    facts: FactsCollector(hooks: locations[id]!), guardExecutable: AgentProcess.buildDirectory + "/quiesce-thaw-guard")
                handlers.append(handler)
                let runner = try await fleet.agent(id, handler: handler)
                tasks.append(Task { try await runner.run() })
            }
            defer { for task in tasks { task.cancel() } }

            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            func instance(_ id: String, _ policy: String, scripts: Bool) -> String {
                var options = "only_mounts: [\(mounts[id] ?? "/nonexistent")]"
                if scripts {
                    options += ", prescript_path: \(locations[id]!.prescript), postscript_path: \(locations[id]!.postscript)"
                }
                return "  - { id: \(id), policy: \(policy), disks: [\(id)-data], options: { \(options) } }\n"
            }
            let text = """
                providers:
                  pool: { kind: local, pool: \(provider.pool), burst: 20, per_second: 50 }
                policies:
                  app: { plugin: linux-freeze, wanted: application, minimum: crash, freeze_budget_ms: 10000 }
                  baseline: { plugin: crash, wanted: crash }
                  strict: { plugin: linux-freeze, wanted: application, minimum: filesystem }
                instances:

                """ + instance("app-1", "app", scripts: true) + instance("loose-1", "app", scripts: true)
                + "  - { id: base-1, policy: baseline, disks: [base-1-data] }\n"
                + "  - { id: ghost-1, policy: strict, disks: [ghost-1-data] }\n"
                + "run: { concurrency: 4, agent_wait_s: 2 }\n"
            let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: registry)
            #expect(await fleet.engine.registry.waitFor(["app-1", "loose-1", "base-1"], timeout: .seconds(20)).isEmpty)

            let catalog = try SQLiteCatalog(path: loops.directory + "/catalog.db")
            let coordinator = Coordinator(
                engine: fleet.engine, plugins: registry,
                providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: catalog, fleet: file)
            let events = EventLog()
            let report = await coordinator.run(runID: "r1") { events.append($0) }
            let byID = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })

            let app = try #require(byID["app-1"])
            #expect(app.achieved == .application && app.state == .succeeded && app.reasons.isEmpty, "\(app.reasons) \(app.warnings)")
            #expect((app.frozen ?? .zero) > .zero && (app.stall ?? .zero) >= (app.frozen ?? .zero))
            let loose = try #require(byID["loose-1"])
            #expect(loose.achieved == .filesystem && loose.state == .downgraded)
            #expect(loose.reasons.first?.hasPrefix("prescript-wrong-mode: \(locations["loose-1"]!.prescript) has mode 0755") == true, "\(loose.reasons)")
            let base = try #require(byID["base-1"])
            #expect(base.achieved == .crash && base.state == .succeeded && base.reasons.isEmpty && base.frozen == nil)
            let ghost = try #require(byID["ghost-1"])
            #expect(ghost.state == .failed && ghost.achieved == nil && ghost.groupID == nil)
            #expect(ghost.reasons.first?.hasPrefix("agent-not-connected") == true && ghost.reasons.first?.hasSuffix("needs at least filesystem") == true)
            #expect(report.exitCode == 3)
            #expect(report.instances.map(\.instanceID) == ["app-1", "loose-1", "base-1", "ghost-1"])
            #expect(events.count == 11, "one waiting event (ghost-1), the wait's end, the provider's check, then started and finished per instance")
            let checked = events.all.compactMap { event -> [ProviderCheckItem]? in if case .providerChecked(_, _, let items) = event { items } else { nil } }
            #expect(checked.count == 1 && checked[0].allSatisfy(\.ok) && checked[0].count == 5, "\(checked)")
            let waited = events.all.compactMap { event -> (Duration, Int, [String])? in
                if case .agentsWaited(let waited, let arrived, let missing) = event { (waited, arrived, missing) } else { nil }
            }
            #expect(waited.count == 1 && waited.first?.2 == ["ghost-1"] && waited.first?.1 == 0, "\(waited)")
            #expect(report.agentWait == waited.first?.0 && report.agentWait > .zero)

            // The catalog and the provider agree; the level tag is the proven level.
            let groups = try await catalog.groups(GroupFilter(runID: "r1"))
            #expect(Set(groups.map(\.instanceID)) == ["app-1", "loose-1", "base-1"])
            for group in groups {
                let outcome = byID[group.instanceID]!
                #expect(group.achievedLevel == outcome.achieved && group.state == .ready && group.disks.count == 1)
                let stored = try await provider.describe(group.providerGroupID)
                #expect(stored.tags["quiesce:level"] == outcome.achieved?.name && stored.tags["quiesce:instance"] == group.instanceID)
                #expect(stored.tags["ConsistencyLevel"] == outcome.achieved?.tagValue)
                #expect(stored.disks.first?.method == .reflink)
            }
            #expect(groups.first { $0.instanceID == "loose-1" }?.reasons.first?.code == "prescript-wrong-mode")

            // Honesty on disk: the clone of a frozen ext4 has a clean journal (FIFREEZE flushed it and
            // cleared needs_recovery); the crash-consistent clone of a mounted ext4 still needs recovery.
            func needsRecovery(_ instance: String) throws -> Bool {
                let group = try #require(groups.first { $0.instanceID == instance })
                let image = provider.snapshotPath(group: group.providerGroupID, disk: "\(instance)-data")
                let header = try run("dumpe2fs", "-h", image)
                let features = header.split(separator: "\n").first { $0.hasPrefix("Filesystem features:") } ?? ""
                return features.contains("needs_recovery")
            }
            #expect(try needsRecovery("app-1") == false, "the application-consistent clone needs journal recovery")
            #expect(try needsRecovery("loose-1") == false, "the filesystem-consistent clone needs journal recovery")
            #expect(try needsRecovery("base-1") == true, "the crash-consistent clone of a mounted ext4 should need recovery")
            let rows = try await catalog.instances(ofRun: "r1")
            #expect(Dictionary(uniqueKeysWithValues: rows.map { ($0.instanceID, $0.state) })
                    == ["app-1": .succeeded, "loose-1": .downgraded, "base-1": .succeeded, "ghost-1": .failed])
            #expect(try await catalog.run("r1")?.state == .failed)

            // Every filesystem is thawed: a write completes at once on each.
            for (id, mount) in mounts {
                let writer = try Writer(mount + "/after")
                #expect(await writer.finished(within: .seconds(2)) != nil, "\(id) is still frozen")
                let status = try await fleet.engine.freezeStatus(of: id)
                #expect(status.payload?.frozen == false)
            }
            // A second run with the same run id makes no new groups (idempotency tokens).
            let again = await coordinator.run(runID: "r1", agentWait: .zero)
            #expect(again.instances.first { $0.instanceID == "app-1" }?.groupID == app.groupID)
            let listed = try await provider.list(tags: ["quiesce:run": "r1"])
            #expect(listed.count == 3)
            // Every create the coordinator armed was finished into a group: no partial one is left.
            let entries = try FileManager.default.contentsOfDirectory(atPath: provider.snapshotsDirectory)
            #expect(entries.sorted() == listed.map(\.id).sorted(), "\(entries)")
            for handler in handlers { await handler.shutdown() }
        }
    }
}

final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var events: [RunEvent] = []
    func append(_ event: RunEvent) { self.lock.withLock { self.events.append(event) } }
    var count: Int { self.lock.withLock { self.events.count } }
    var all: [RunEvent] { self.lock.withLock { self.events } }
}

/// A test provider around a local pool: every call goes to `base` but those the wrapper changes.
/// (Arming is not passed on: a wrapper's create is its capture, unless it arms itself.)
protocol WrapsLocalProvider: SnapshotProvider {
    var base: LocalProvider { get }
}

extension WrapsLocalProvider {
    var kind: String { self.base.kind }
    var capabilities: ProviderCapabilities { self.base.capabilities }
    func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup { try await self.base.createGroup(request) }
    func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup { try await self.base.waitUntilReady(groupID, timeout: timeout) }
    func describe(_ groupID: String) async throws -> SnapshotGroup { try await self.base.describe(groupID) }
    func list(tags: [String: String]) async throws -> [SnapshotGroup] { try await self.base.list(tags: tags) }
    func delete(_ groupID: String) async throws { try await self.base.delete(groupID) }
    func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String {
        try await self.base.restore(groupID, disk: disk, to: target)
    }
    func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup { try await self.base.tag(groupID, tags) }
}

/// The local provider with a delay before each create: a cloud API that is slow to answer.
struct SlowProvider: WrapsLocalProvider {
    let base: LocalProvider
    let delay: Duration
    func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup {
        try await Task.sleep(for: self.delay)
        return try await self.base.createGroup(request)
    }
}

extension CoordinatorTests {
    @Test("a provider slower than the freeze budget: the guard thaws, the thaw reply says budget, the group is recorded crash-consistent")
    func slowProvider() async throws {
        try await withLoopDevices { loops in
            let pool = try await blocking { try loops.mount("pool", fsType: "xfs", sizeMiB: 400, mkfsOptions: ["-m", "reflink=1"]).mountPoint }
            let local = try LocalProvider(pool: pool + "/quiesce")
            let image = try local.diskPath("slow-1-data")
            let mount = try await blocking {
                _ = try run("truncate", "-s", "64M", image)
                _ = try run("mkfs.ext4", "-q", "-F", image)
                return try loops.mountDevice(try loops.attach(image), at: "slow-1")
            }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try PluginPlanRunTests.writeHook(hooks + "/prescript.sh", "#!/bin/sh\nexit 0\n")
            try PluginPlanRunTests.writeHook(hooks + "/postscript.sh", "#!/bin/sh\nexit 0\n")
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let handler = BuiltinCommandHandler(
                facts: FactsCollector(hooks: HookLocations(prescript: hooks + "/prescript.sh", postscript: hooks + "/postscript.sh", hookDirectory: hooks)),
                guardExecutable: AgentProcess.buildDirectory + "/quiesce-thaw-guard")
            let runner = try await fleet.agent("slow-1", handler: handler)
            let task = Task { try await runner.run() }
            defer { task.cancel() }
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let text = """
                providers:
                  slow: { kind: local, pool: \(local.pool) }
                policies:
                  tight:
                    plugin: linux-freeze
                    wanted: application
                    minimum: crash
                    freeze_budget_ms: 1200
                    retries: 0
                    options: { prescript_timeout_ms: 200, postscript_timeout_ms: 200, freeze_timeout_ms: 300, thaw_timeout_ms: 300 }
                instances:
                  - { id: slow-1, policy: tight, disks: [slow-1-data], options: { only_mounts: [\(mount)], prescript_path: \(hooks)/prescript.sh, postscript_path: \(hooks)/postscript.sh } }
                """
            let file = try FleetFile.parse(text, path: "slow.yaml", plugins: registry)
            #expect(await fleet.engine.registry.waitFor(["slow-1"], timeout: .seconds(20)).isEmpty)
            let catalog = try SQLiteCatalog(path: loops.directory + "/catalog.db")
            let coordinator = Coordinator(
                engine: fleet.engine, plugins: registry,
                providers: ["slow": .init(provider: SlowProvider(base: local, delay: .milliseconds(1600)), bucket: TokenBucket(burst: 1, perSecond: 1))],
                catalog: catalog, fleet: file)
            let report = await coordinator.run(runID: "slow")
            let outcome = try #require(report.instances.first)
            #expect(outcome.achieved == .crash && outcome.state == .downgraded, "\(outcome.reasons)")
            #expect(outcome.reasons.contains { $0.hasPrefix("thawed-by-budget") }, "\(outcome.reasons)")
            let group = try #require(try await catalog.groups(GroupFilter(runID: "slow")).first)
            #expect(group.achievedLevel == .crash && group.reasons.contains { $0.code == "thawed-by-budget" })
            #expect(try await local.describe(group.providerGroupID).tags["quiesce:level"] == "crash")
            let writer = try Writer(mount + "/after")
            #expect(await writer.finished(within: .seconds(2)) != nil, "still frozen")
            await handler.shutdown()
        }
    }
}


/// Delays the facts an agent answers (an instance slow to plan), and otherwise is the built-in agent.
final class SlowFactsHandler: WrapsBuiltinHandler {
    let inner: BuiltinCommandHandler
    let delay: Duration
    init(_ inner: BuiltinCommandHandler, delay: Duration) { self.inner = inner; self.delay = delay }
    func perform(_ command: AgentCommand) async -> CommandResult {
        if case .facts = command.action { try? await Task.sleep(for: self.delay) }
        return await self.inner.perform(command)
    }
}

/// The local provider, with the moments each instance's create was armed and captured, and a
/// capture that takes `captureDelay` for the instances named (a long frozen window).
struct TimedArmProvider: WrapsLocalProvider {
    final class Log: Sendable {
        let marks = Mutex<[(what: String, instance: String, at: ContinuousClock.Instant)]>([])
        func mark(_ what: String, _ instance: String) { self.marks.withLock { $0.append((what, instance, .now)) } }
        func at(_ what: String, _ instance: String) -> ContinuousClock.Instant? {
            self.marks.withLock { marks in marks.last { $0.what == what && $0.instance == instance }?.at }
        }
    }
    struct Armed: ArmedCreate {
        let base: any ArmedCreate
        let instance: String
        let delay: Duration
        let log: Log
        func capture() async throws {
            self.log.mark("capture", self.instance)
            try await Task.sleep(for: self.delay)
            try await self.base.capture()
            self.log.mark("captured", self.instance)
        }
        func finish() async throws -> SnapshotGroup { try await self.base.finish() }
        func abandon() async { await self.base.abandon() }
    }
    let base: LocalProvider
    let slow: [String: Duration]
    let log = Log()
    func armCreate(_ request: CreateGroupRequest) async throws -> any ArmedCreate {
        let instance = request.tags["quiesce:instance"] ?? ""
        self.log.mark("arm", instance)
        return Armed(base: try await self.base.armCreate(request), instance: instance, delay: self.slow[instance] ?? .zero, log: self.log)
    }
}

extension ConsistencyGroupTests.Setup {
    /// A fleet file on these instances: the pool, policy `fs` (filesystem, retries 0), each instance on its disk, then `run`.
    func fsFleet(_ ids: [String], run: String, path: String) throws -> FleetFile {
        var text = """
            providers:
              pool: { kind: local, pool: \(self.provider.pool) }
            policies:
              fs: { plugin: linux-freeze, wanted: filesystem, minimum: crash, retries: 0 }
            instances:

            """
        for id in ids { text += "  - { id: \(id), policy: fs, disks: [\(id)-data], options: { only_mounts: [\(self.mounts[id]!)] } }\n" }
        return try FleetFile.parse(text + "run: \(run)\n", path: path, plugins: self.registry)
    }
}

extension CoordinatorTests {
    @Test("frozen first: another instance's work waits for a frozen one's thaw (and, with no patience, it does not)")
    func frozenFirst() async throws {
        // later-1 answers its facts 300 ms late: it arms while first-1 is frozen, unless it waits.
        try await withLoopDevices { loops in
            let setup = try await ConsistencyGroupTests.setUp(loops, ids: ["first-1", "later-1"]) { id, hooks, guardPath in
                let builtin = BuiltinCommandHandler(facts: FactsCollector(hooks: hooks), guardExecutable: guardPath)
                return id == "later-1" ? SlowFactsHandler(builtin, delay: .milliseconds(300)) : builtin
            }
            let file = try setup.fsFleet(["first-1", "later-1"], run: "{ concurrency: 2, planning: 2, max_frozen: 2 }", path: "frozen-first.yaml")
            // first-1's capture holds its window open 800 ms.
            for (patience, runID) in [(Duration.seconds(5), "waits"), (.zero, "no-patience")] {
                let provider = TimedArmProvider(base: setup.provider, slow: ["first-1": .milliseconds(800)])
                let coordinator = Coordinator(engine: setup.fleet.engine, plugins: setup.registry,
                                              providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: 2, perSecond: 10))],
                                              catalog: nil, fleet: file, frozenFirstPatience: patience)
                let report = await coordinator.run(runID: runID)
                for outcome in report.instances {
                    #expect(outcome.achieved == .filesystem && outcome.state == .succeeded, "\(runID) \(outcome.instanceID): \(outcome.reasons)")
                }
                let captured = try #require(provider.log.at("capture", "first-1")), thawedBy = try #require(provider.log.at("captured", "first-1"))
                let armed = try #require(provider.log.at("arm", "later-1"))
                #expect(captured < armed, "\(runID): later-1 armed before first-1 froze; the test shows nothing")
                if patience > .zero {
                    #expect(armed > thawedBy, "later-1 armed while first-1 was frozen (\(armed - captured) into its capture)")
                    #expect(await coordinator.frozenFirst.deferred >= 1)
                } else {
                    #expect(armed < thawedBy, "with no patience later-1 arms at once, inside first-1's window")
                    #expect(await coordinator.frozenFirst.deferred == 0)
                }
            }
            await ConsistencyGroupTests.tearDown(setup)
        }
    }
}

extension CoordinatorTests {
    @Test("paced frozen slots: short windows one at a time, long ones (a slow create) together up to max_frozen; unpaced, they overlap")
    func pacedFrozen() async throws {
        let ids = ["pace-1", "pace-2", "pace-3", "pace-4"]
        try await withLoopDevices { loops in
            let setup = try await ConsistencyGroupTests.setUp(loops, ids: ids)
            // Each instance's create holds its window open: 30 ms (short: a queue of three behind it gets through in
            // well under the pacing's 250 ms), or 400 ms (long: one at a time would take 1.6 s). Frozen first is off:
            // the four plan, arm and ask for a slot together, so only the pacing keeps their windows apart.
            for (capture, paced, runID) in [(Duration.milliseconds(30), true, "short-paced"), (.milliseconds(30), false, "short-unpaced"),
                                            (.milliseconds(400), true, "long-paced")] {
                let provider = TimedArmProvider(base: setup.provider, slow: Dictionary(uniqueKeysWithValues: ids.map { ($0, capture) }))
                let file = try setup.fsFleet(ids, run: "{ concurrency: 4, planning: 4, max_frozen: 4, pace_frozen: \(paced) }", path: "paced.yaml")
                let coordinator = Coordinator(engine: setup.fleet.engine, plugins: setup.registry,
                                              providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: 4, perSecond: 10))],
                                              catalog: nil, fleet: file, frozenFirstPatience: .zero)
                let report = await coordinator.run(runID: runID)
                for outcome in report.instances {
                    #expect(outcome.achieved == .filesystem && outcome.state == .succeeded, "\(runID) \(outcome.instanceID): \(outcome.reasons)")
                }
                // Windows that overlapped, from the provider's own marks (capture begun → captured).
                let spans = ids.compactMap { id in provider.log.at("capture", id).flatMap { begun in provider.log.at("captured", id).map { (begun, $0) } } }
                #expect(spans.count == 4, "\(runID): \(spans.count) captures")
                let overlapping = spans.map { span in spans.filter { $0.0 < span.1 && span.0 < $0.1 }.count }.max() ?? 0
                let most = await coordinator.frozenSlots.mostHeld
                switch runID {
                case "short-paced":
                    #expect(most == 1 && overlapping == 1, "short windows went \(most) at once (\(overlapping) captures overlapped)")
                case "short-unpaced":
                    // What the pacing prevents: the same run without it freezes several at once.
                    #expect(most >= 2 && overlapping >= 2, "unpaced, the four windows did not overlap (\(most)); the short-paced check shows nothing")
                default:
                    // The first goes alone (no hold known yet); the three behind it then go together.
                    #expect(most >= 3 && overlapping >= 3, "long windows went \(most) at once (\(overlapping) captures overlapped)")
                }
            }
            await ConsistencyGroupTests.tearDown(setup)
        }
    }
}
