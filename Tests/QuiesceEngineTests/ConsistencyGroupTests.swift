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
import Synchronization
import Testing

/// Writes a counter to two filesystems in turn, as an application spread over two instances
/// would: A gets n, then B gets n+1, then A n+2 … each a pwrite of the whole value. A cut
/// taken at one point in time across both has |A − B| = 1; a snapshot of B taken after A
/// thawed shows B far ahead of A. Runs on a thread of its own: a write to a frozen filesystem
/// blocks it there, as it blocks the application.
final class AlternatingWriter: @unchecked Sendable {
    private let stop = Atomic<Bool>(false)
    private let written = Atomic<Int>(0)
    private let done = DispatchSemaphore(value: 0)
    let paths: (String, String)

    init(_ a: String, _ b: String) throws {
        self.paths = (a, b)
        let fds = [open(a, O_WRONLY | O_CREAT | O_TRUNC, 0o644), open(b, O_WRONLY | O_CREAT | O_TRUNC, 0o644)]
        guard fds.allSatisfy({ $0 >= 0 }) else { throw CommandFailed(description: "cannot open the counters: \(String(cString: strerror(errno)))") }
        let thread = Thread { [self] in
            var n = 1
            while !self.stop.load(ordering: .relaxed) {
                for (index, fd) in fds.enumerated() {
                    let text = String(format: "%020d\n", n + index)
                    _ = text.withCString { pwrite(fd, $0, 21, 0) }
                }
                self.written.store(n + 1, ordering: .relaxed)
                n += 2
                usleep(100)
            }
            for fd in fds { close(fd) }
            self.done.signal()
        }
        thread.stackSize = 1 << 18
        thread.start()
    }

    var count: Int { self.written.load(ordering: .relaxed) }

    func finish() {
        self.stop.store(true, ordering: .relaxed)
        self.done.wait()
    }
}

@Suite("Consistency groups across instances", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct ConsistencyGroupTests {
    /// The counter in a snapshot's ext4 image (read with debugfs, nothing mounted).
    static func counter(in image: String) throws -> Int {
        let text = try run("debugfs", "-R", "cat /counter", image)
        guard let value = text.split(separator: "\n").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }).last else {
            throw CommandFailed(description: "no counter in \(image): \(text)")
        }
        return value
    }

    struct Setup {
        var provider: LocalProvider
        var mounts: [String: String]
        var fleet: Fleet
        var registry: PluginRegistry
        var tasks: [Task<Void, any Error>]
        var handlers: [any CommandHandling]
        var locations: [String: HookLocations]
    }

    /// Two (or more) instances with an ext4 data disk each (`ID-data`, mounted) in a reflink pool, an agent
    /// each (its handler from `handler`, given its hook locations and the thaw guard's path), connected.
    static func setUp(_ loops: LoopDevices, ids: [String],
                      handler: (_ id: String, _ hooks: HookLocations, _ guardPath: String) -> any CommandHandling = { _, hooks, guardPath in
                          BuiltinCommandHandler(facts: FactsCollector(hooks: hooks), guardExecutable: guardPath)
                      }) async throws -> Setup {
        let pool = try await blocking { try loops.mount("pool", fsType: "xfs", sizeMiB: 400, mkfsOptions: ["-m", "reflink=1"]).mountPoint }
        let provider = try LocalProvider(pool: pool + "/quiesce", createBurst: 20, createsPerSecond: 50)
        var mounts: [String: String] = [:]
        var locations: [String: HookLocations] = [:]
        for id in ids {
            let image = try provider.diskPath("\(id)-data")
            mounts[id] = try await blocking {
                _ = try run("truncate", "-s", "64M", image)
                _ = try run("mkfs.ext4", "-q", "-F", image)
                return try loops.mountDevice(try loops.attach(image), at: id)
            }
            let dir = loops.directory + "/hooks-" + id
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            locations[id] = HookLocations(prescript: dir + "/prescript.sh", postscript: dir + "/postscript.sh", hookDirectory: dir)
        }
        let fleet = try await Fleet.start()
        var tasks: [Task<Void, any Error>] = []
        var handlers: [any CommandHandling] = []
        for id in ids {
            let handler = handler(id, locations[id]!, AgentProcess.buildDirectory + "/quiesce-thaw-guard")
            handlers.append(handler)
            let runner = try await fleet.agent(id, handler: handler)
            tasks.append(Task { try await runner.run() })
        }
        #expect(await fleet.engine.registry.waitFor(Set(ids), timeout: .seconds(20)).isEmpty)
        return Setup(provider: provider, mounts: mounts, fleet: fleet, registry: await PluginPlanRunTests.registry(), tasks: tasks,
                     handlers: handlers, locations: locations)
    }

    static func tearDown(_ setup: Setup) async {
        for task in setup.tasks { task.cancel() }
        for handler in setup.handlers { await handler.shutdown() }
        await setup.registry.shutdown()
        setup.fleet.discard()
    }

    static func fleetText(_ setup: Setup, members: [String], barrierMs: Int, scripts: Set<String>, extra: String = "") -> String {
        var text = """
            providers:
              pool: { kind: local, pool: \(setup.provider.pool), burst: 20, per_second: 50 }
            policies:
              app: { plugin: linux-freeze, wanted: application, minimum: crash, freeze_budget_ms: 10000 }
            instances:

            """
        for id in members {
            var options = "only_mounts: [\(setup.mounts[id]!)]"
            if scripts.contains(id) {
                options += ", prescript_path: \(setup.locations[id]!.prescript), postscript_path: \(setup.locations[id]!.postscript)"
            }
            text += "  - { id: \(id), policy: app, disks: [\(id)-data], options: { \(options) } }\n"
        }
        text += "groups:\n  shop: { members: [\(members.joined(separator: ", "))], barrier_ms: \(barrierMs) }\n"
        return text + "run: { concurrency: 4, agent_wait_s: 5 }\n" + extra
    }

    /// Runs the group `runs` times under the writer; the counters each run's snapshots hold.
    static func cuts(_ setup: Setup, barriers: Bool, runs: Int, tag: String) async throws -> [(a: Int, b: Int, report: RunReport)] {
        let text = Self.fleetText(setup, members: ["a", "b"], barrierMs: 3000, scripts: ["b"])
        let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: setup.registry)
        let coordinator = Coordinator(
            engine: setup.fleet.engine, plugins: setup.registry,
            providers: ["pool": .init(provider: setup.provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: nil, fleet: file,
            groupBarriers: barriers)
        let writer = try AlternatingWriter(setup.mounts["a"]! + "/counter", setup.mounts["b"]! + "/counter")
        var cuts: [(Int, Int, RunReport)] = []
        for index in 1...runs {
            let before = writer.count
            while writer.count < before + 200 { try await Task.sleep(for: .milliseconds(5)) }
            let report = await coordinator.run(runID: "\(tag)-\(index)", agentWait: .seconds(5))
            let groups = report.instances.compactMap(\.groupID)
            guard groups.count == 2 else {
                writer.finish()
                Issue.record("run \(index): \(report.instances.map { "\($0.instanceID) \($0.reasons)" })")
                return cuts
            }
            let a = try Self.counter(in: setup.provider.snapshotPath(group: report.instances[0].groupID!, disk: "a-data"))
            let b = try Self.counter(in: setup.provider.snapshotPath(group: report.instances[1].groupID!, disk: "b-data"))
            cuts.append((a, b, report))
        }
        writer.finish()
        return cuts
    }

    @Test("an application across two instances, written alternately: every group snapshot is one point in time (|A − B| = 1); the group's level is the lowest member's")
    func alternatingWriter() async throws {
        try await withLoopDevices { loops in
            let setup = try await Self.setUp(loops, ids: ["a", "b"])
            // b's freeze script takes 400 ms: without a barrier, a would be snapshotted and thawed long before b.
            try PluginPlanRunTests.writeHook(setup.locations["b"]!.prescript, "#!/bin/sh\nsleep 0.4\n")
            try PluginPlanRunTests.writeHook(setup.locations["b"]!.postscript, "#!/bin/sh\nexit 0\n")
            do {
                let cuts = try await Self.cuts(setup, barriers: true, runs: 3, tag: "with")
                #expect(cuts.count == 3)
                for (a, b, report) in cuts {
                    #expect(abs(a - b) == 1, "a=\(a) b=\(b): not one point in time")
                    #expect(a > 0 && b > 0)
                    let outcomes = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })
                    // a has no freeze script (filesystem), b has one (application): the group is filesystem, b says why.
                    #expect(outcomes["a"]?.achieved == .filesystem && outcomes["b"]?.achieved == .filesystem, "\(report.instances.map(\.reasons))")
                    #expect(outcomes["b"]?.reasons.contains { $0.hasPrefix("group-level: consistency group shop reached filesystem (a: ") } == true,
                            "\(outcomes["b"]?.reasons ?? [])")
                    #expect(outcomes["a"]?.consistencyGroup == "shop" && report.consistencyGroups == [
                        ConsistencyGroupOutcome(name: "shop", members: ["a", "b"], level: .filesystem)])
                    // a waited frozen for b's script: its window holds b's 400 ms, well inside the budget.
                    #expect((outcomes["a"]?.frozen ?? .zero) >= .milliseconds(300) && (outcomes["a"]?.frozen ?? .seconds(99)) < .seconds(3))
                    let tags = try await setup.provider.describe(outcomes["a"]!.groupID!).tags
                    #expect(tags["quiesce:consistency-group"] == "shop" && tags["quiesce:level"] == "filesystem")
                }
                // The same test without the barrier fails: b's snapshot is taken after a thawed.
                let loose = try await Self.cuts(setup, barriers: false, runs: 3, tag: "without")
                print("measured: group cuts (A, B) with the barrier \(cuts.map { ($0.a, $0.b) }), without \(loose.map { ($0.a, $0.b) }); "
                    + "a frozen \(cuts.map { $0.report.instances[0].frozen ?? .zero })")
                #expect(loose.count == 3)
                #expect(loose.contains { abs($0.a - $0.b) > 1 }, "without the barrier every cut still looked consistent: \(loose.map { ($0.a, $0.b) })")
                for (a, b, _) in loose where abs(a - b) > 1 { #expect(b > a, "b is snapshotted later, so it is ahead") }
            } catch {
                Issue.record("\(error)")
            }
            // Everything thawed.
            for (id, mount) in setup.mounts {
                let writer = try Writer(mount + "/after")
                #expect(await writer.finished(within: .seconds(2)) != nil, "\(id) is still frozen")
            }
            await Self.tearDown(setup)
        }
    }

    @Test("a member late to the barrier: the others wait at most barrier_ms frozen, then go on; the group is incomplete and says who and why")
    func lateMember() async throws {
        try await withLoopDevices { loops in
            let setup = try await Self.setUp(loops, ids: ["fast", "slow"])
            try PluginPlanRunTests.writeHook(setup.locations["slow"]!.prescript, "#!/bin/sh\nsleep 1.5\n")
            try PluginPlanRunTests.writeHook(setup.locations["slow"]!.postscript, "#!/bin/sh\nexit 0\n")
            let text = Self.fleetText(setup, members: ["fast", "slow"], barrierMs: 300, scripts: ["slow"])
            let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: setup.registry)
            let catalog = try SQLiteCatalog(path: loops.directory + "/catalog.db")
            let coordinator = Coordinator(
                engine: setup.fleet.engine, plugins: setup.registry,
                providers: ["pool": .init(provider: setup.provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: catalog, fleet: file)
            let report = await coordinator.run(runID: "late", agentWait: .seconds(5))
            let outcomes = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })
            let fast = try #require(outcomes["fast"]), slow = try #require(outcomes["slow"])
            #expect((fast.frozen ?? .seconds(99)) < .milliseconds(1000), "fast waited \(fast.frozen ?? .zero) frozen; the barrier is 300 ms")
            for outcome in [fast, slow] {
                #expect(outcome.state == .failed && outcome.groupID != nil, "each snapshot is kept, labelled")
                #expect(outcome.reasons.contains { $0.hasPrefix("group-incomplete: consistency group shop: barrier before the snapshots broken: slow not quiesced within 300 ms") },
                        "\(outcome.instanceID): \(outcome.reasons)")
            }
            #expect(fast.achieved == .filesystem && slow.achieved == .application, "each its own proven level")
            #expect(report.consistencyGroups.first?.level == nil && report.exitCode == 3)
            let rows = try await catalog.groups(GroupFilter(runID: "late"))
            #expect(rows.count == 2 && rows.allSatisfy { $0.consistencyGroup == "shop" && $0.reasons.contains { $0.code == "group-incomplete" } })
            for (id, mount) in setup.mounts {
                let writer = try Writer(mount + "/after")
                #expect(await writer.finished(within: .seconds(2)) != nil, "\(id) is still frozen")
            }
            await Self.tearDown(setup)
        }
    }

    @Test("a member whose agent is gone and whose policy needs filesystem: refused before anything freezes; the others are not left waiting; the group fails")
    func missingMember() async throws {
        try await withLoopDevices { loops in
            let setup = try await Self.setUp(loops, ids: ["m1", "m2"])
            // m3 has a disk but never an agent.
            #expect(FileManager.default.createFile(atPath: try setup.provider.diskPath("m3-data"), contents: Data(count: 4096)))
            var text = Self.fleetText(setup, members: ["m1", "m2"], barrierMs: 2000, scripts: [])
            text = text.replacingOccurrences(of: "groups:\n  shop: { members: [m1, m2]", with: "  - { id: m3, policy: strict, disks: [m3-data] }\ngroups:\n  shop: { members: [m1, m2, m3]")
            text = text.replacingOccurrences(of: "policies:\n", with: "policies:\n  strict: { plugin: linux-freeze, wanted: application, minimum: filesystem }\n")
            let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: setup.registry)
            let coordinator = Coordinator(
                engine: setup.fleet.engine, plugins: setup.registry,
                providers: ["pool": .init(provider: setup.provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: nil, fleet: file)
            let began = ContinuousClock.now
            let report = await coordinator.run(runID: "missing", agentWait: .milliseconds(200))
            #expect(ContinuousClock.now - began < .seconds(8))
            let outcomes = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })
            #expect(outcomes["m3"]?.reasons.first?.hasPrefix("agent-not-connected") == true)
            for id in ["m1", "m2"] {
                let outcome = try #require(outcomes[id])
                #expect(outcome.state == .failed && outcome.reasons.contains { $0.hasPrefix("group-incomplete: consistency group shop: m3 took no snapshot") },
                        "\(id): \(outcome.reasons)")
                #expect((outcome.frozen ?? .zero) < .seconds(1))
            }
            await Self.tearDown(setup)
        }
    }
}
