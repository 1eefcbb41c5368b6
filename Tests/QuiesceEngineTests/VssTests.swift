import Foundation
import QuiesceAgent
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePluginProto
import QuiescePlugins
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Testing

/// Windows instances end to end: the windows-vss plugin's plans, run by the engine over mutual TLS
/// against agents playing Windows with the VSS simulator. Every volume is a loop-mounted filesystem
/// the test made; the hold of writes is a real FIFREEZE through the thaw guard.
@Suite("Windows: windows-vss against the VSS simulator", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct VssTests {
    /// One simulated Windows instance: its volumes (C:\ and D:\ on loop mounts), a scenario, an agent.
    struct Windows {
        let fleet: Fleet
        let id: String
        let volumes: [String: String]
        let handler: BuiltinCommandHandler
        let task: Task<Void, any Error>
        let plugin: Plugin

        func plan(_ options: [String: OptionInput] = [:], wanted: ConsistencyLevel = .application,
                  minimum: ConsistencyLevel = .crash) async throws -> (PlanPolicy, Plan) {
            let policy = try PluginPlanRunTests.policy(self.plugin, wanted: wanted, minimum: minimum, options: options)
            return (policy, try await self.plugin.plan(facts: try await self.fleet.engine.planFacts(of: self.id), policy: policy))
        }

        /// Runs the plan; during the snapshot, a write to D:\ must stay blocked (the hold is real).
        func run(_ plan: Plan, policy: PlanPolicy, freezeID: String, snapshotTakes: Duration = .zero) async -> (PlanOutcome, blockedDuringSnapshot: Bool?) {
            let blocked = Box<Bool>()
            let data = self.volumes["D:\\"]!
            let outcome = await PlanRunner(engine: self.fleet.engine, instanceID: self.id, policy: policy, freezeID: freezeID).run(plan) {
                if snapshotTakes > .zero { try await Task.sleep(for: snapshotTakes) }
                let writer = try Writer(data + "/during-\(freezeID)")
                blocked.value = await writer.finished(within: .milliseconds(200)) == nil
            }
            return (outcome, blocked.value)
        }
    }

    static func scenario(volumes: [String: String], writers: String, extra: String = "") -> String {
        let list = volumes.keys.sorted().map { name in
            "{\"name\": \"\(name.replacingOccurrences(of: "\\", with: "\\\\"))\", \"fs_type\": \"\(name == "C:\\" ? "NTFS" : "ReFS")\", \"path\": \"\(volumes[name]!)\"}"
        }
        return "{\"hostname\": \"win-test\", \(extra) \"volumes\": [\(list.joined(separator: ", "))], \"writers\": \(writers)}"
    }

    static let healthyWriters = """
        [{"name": "SqlServerWriter", "id": "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a", "components": ["master", "sales"]},
         {"name": "Registry Writer", "id": "afbab4a2-367d-4d15-a586-71dbb18f8485"}]
        """

    /// Starts an engine and one in-process agent playing Windows with `writers`.
    static func withWindows<T: Sendable>(_ id: String, writers: String, extra: String = "",
                                         _ body: (Windows, LoopDevices) async throws -> T) async throws -> T {
        try await withLoopDevices { loops in
            let c = try await loops.mount("c", fsType: "ext4", sizeMiB: 64).mountPoint
            let d = try await loops.mount("d", fsType: "ext4", sizeMiB: 64).mountPoint
            let volumes = ["C:\\": c, "D:\\": d]
            let scenario = try VssScenario.parse(Data(Self.scenario(volumes: volumes, writers: writers, extra: extra).utf8), source: "test")
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let handler = BuiltinCommandHandler(guardExecutable: AgentProcess.buildDirectory + "/quiesce-thaw-guard", vssScenario: scenario)
            let runner = try await fleet.agent(id, handler: handler)
            let task = Task { try await runner.run() }
            defer { task.cancel() }
            #expect(await fleet.engine.registry.waitFor([id], timeout: .seconds(20)).isEmpty)
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "windows-vss"), "\(registry.failures)")
            let windows = Windows(fleet: fleet, id: id, volumes: volumes, handler: handler, task: task, plugin: plugin)
            let result = try await body(windows, loops)
            await handler.shutdown()
            return result
        }
    }

    @Test("all writers healthy → application: writers freeze, writes to the volumes held across the snapshot, every writer STABLE after BackupComplete")
    func healthy() async throws {
        try await Self.withWindows("win-ok", writers: Self.healthyWriters) { windows, _ in
            // Facts as Windows reports them.
            let facts = try await windows.fleet.engine.facts(of: "win-ok")
            #expect(facts.osFamily == "windows" && facts.osName.contains("Windows Server") && facts.vssService == "running")
            #expect(facts.mounts.map(\.mountPoint).sorted() == ["C:\\", "D:\\"] && facts.mounts.allSatisfy(\.freezable))
            #expect(Set(facts.mounts.map(\.fsType)) == ["NTFS", "ReFS"])
            #expect(facts.vssWriters.map(\.name) == ["SqlServerWriter", "Registry Writer"] && facts.vssWriters.allSatisfy { $0.state == "STABLE" })
            #expect(facts.vssWriters.first?.components == ["master", "sales"])
            let session = try #require(await windows.fleet.engine.registry.session(for: "win-ok"))
            #expect(session.capabilities == ["facts", "vss"])

            let (policy, plan) = try await windows.plan()
            #expect(plan.expected == .application && plan.reasons.isEmpty, "\(plan.reasons)")
            #expect(plan.quiesce.map(\.id) == ["vss-freeze"] && plan.thaw.map(\.id) == ["vss-thaw"])
            #expect(plan.quiesce[0].action.vssFreeze.includeWriters && plan.quiesce[0].action.vssFreeze.backupType == "copy")
            #expect(PlanValidator.problems(in: plan, policy: policy).isEmpty)
            #expect(plan.quiesce[0].actionSummary.hasPrefix("vss-freeze C:\\, D:\\ (writers, copy"), "\(plan.quiesce[0].actionSummary)")

            let (outcome, blocked) = await windows.run(plan, policy: policy, freezeID: "ok-1")
            #expect(blocked == true, "a write to D:\\ completed while its writes were held")
            #expect(outcome.achieved == .application && !outcome.failed && outcome.reasons.isEmpty, "\(outcome.reasons) \(outcome.steps)")
            #expect(outcome.steps.map(\.id) == ["vss-freeze", "snapshot", "vss-thaw"])
            #expect(outcome.thaw?.cause == .command && outcome.thaw?.withinBudget == true)
            #expect(outcome.vssWriters.count == 2 && outcome.vssWriters.allSatisfy { $0.state == "STABLE" && !$0.excluded }, "\(outcome.vssWriters)")
            #expect(!outcome.vssSetID.isEmpty && (outcome.frozen ?? .zero) > .zero)
            print("measured: VSS set on the simulator: held \(outcome.frozen?.milliseconds ?? -1) ms, stall \(outcome.blocked?.milliseconds ?? -1) ms")

            // A Windows agent drives VSS only: a Linux freeze is not its action.
            let refused = try await windows.fleet.engine.freeze(.with { $0.freezeID = "x"; $0.mountPoints = [windows.volumes["C:\\"]!] }, on: "win-ok")
            #expect(refused.status.reason == "not-implemented")
        }
    }

    @Test("writers off → filesystem (the seed's rule); a writer excluded by name stays out and its failure does not count")
    func writersOffAndExcluded() async throws {
        let writers = """
            [{"name": "SqlServerWriter"},
             {"name": "FlakyWriter", "phases": {"freeze": {"fail": "VSS_E_WRITERERROR_NONRETRYABLE"}}}]
            """
        try await Self.withWindows("win-off", writers: writers) { windows, _ in
            let (policy, plan) = try await windows.plan(["vss_writers": .bool(false)])
            #expect(plan.expected == .filesystem && plan.reasons.first?.hasPrefix("vss-writers-off: ") == true, "\(plan.reasons)")
            #expect(!plan.quiesce[0].action.vssFreeze.includeWriters)
            let (outcome, blocked) = await windows.run(plan, policy: policy, freezeID: "off-1")
            #expect(blocked == true)
            #expect(outcome.achieved == .filesystem && !outcome.failed, "\(outcome.reasons)")
            #expect(outcome.vssWriters.allSatisfy { $0.excluded }, "\(outcome.vssWriters)")

            let (policy2, excluded) = try await windows.plan(["exclude_writers": .list(["FlakyWriter"])])
            #expect(excluded.expected == .application)
            let (outcome2, _) = await windows.run(excluded, policy: policy2, freezeID: "ex-1")
            #expect(outcome2.achieved == .application && outcome2.reasons.isEmpty, "\(outcome2.reasons)")
            #expect(outcome2.vssWriters.first { $0.name == "FlakyWriter" }?.excluded == true)
            #expect(outcome2.vssWriters.first { $0.name == "SqlServerWriter" }?.state == "STABLE")

            // include_writers naming a writer the instance lacks: filesystem, with the writers it has.
            let (_, missing) = try await windows.plan(["include_writers": .list(["ExchangeWriter"])])
            #expect(missing.expected == .filesystem && missing.reasons.first?.hasPrefix("vss-writer-missing: ExchangeWriter not on this instance") == true, "\(missing.reasons)")
        }
    }

    @Test("a writer RETRYABLE at freeze once → a new snapshot set → application; NONRETRYABLE → filesystem with the writer's reason, failed at minimum application")
    func writerFailures() async throws {
        let writers = """
            [{"name": "SqlServerWriter", "phases": {"freeze": {"fail": "VSS_E_WRITERERROR_RETRYABLE", "times": 1}}},
             {"name": "Registry Writer"}]
            """
        try await Self.withWindows("win-retry", writers: writers) { windows, _ in
            let (policy, plan) = try await windows.plan()
            #expect(plan.quiesceRetries == 1)
            let (outcome, _) = await windows.run(plan, policy: policy, freezeID: "rt-1")
            #expect(outcome.achieved == .application && outcome.reasons.isEmpty, "\(outcome.reasons) \(outcome.warnings)")
            #expect(outcome.steps.map(\.id) == ["vss-freeze", "vss-thaw", "vss-freeze", "snapshot", "vss-thaw"], "\(outcome.steps.map(\.id))")
            #expect(outcome.warnings.first?.contains("vss-writer-failed: SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_RETRYABLE (0x800423F3)") == true,
                    "\(outcome.warnings)")
        }
        let bad = """
            [{"name": "SqlServerWriter", "phases": {"freeze": {"fail": "VSS_E_WRITERERROR_NONRETRYABLE"}}}, {"name": "Registry Writer"}]
            """
        try await Self.withWindows("win-bad", writers: bad) { windows, _ in
            let (policy, plan) = try await windows.plan()
            let (outcome, blocked) = await windows.run(plan, policy: policy, freezeID: "nr-1")
            #expect(blocked == true, "the hold stands when a writer fails: the set is filesystem-consistent")
            #expect(outcome.achieved == .filesystem && !outcome.failed)
            #expect(outcome.reasons == ["vss-writer-failed: SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)"], "\(outcome.reasons)")
            #expect(outcome.steps.filter { $0.id == "vss-freeze" }.count == 1, "a non-retryable error is not retried")

            let (strict, strictPlan) = try await windows.plan(minimum: .application)
            let (failed, _) = await windows.run(strictPlan, policy: strict, freezeID: "nr-2")
            #expect(failed.failed && failed.reasons.last?.hasPrefix("below-minimum: reached filesystem") == true, "\(failed.reasons)")
        }
    }

    @Test("writers slower than their window and writers that stop responding: FAILED_AT_<phase> with TIMEOUT / NOT_RESPONDING → filesystem")
    func slowAndHungWriters() async throws {
        let writers = """
            [{"name": "SlowWriter", "phases": {"prepare_snapshot": {"delay_ms": 2500}}},
             {"name": "HungWriter", "phases": {"post_snapshot": {"hang": true}}},
             {"name": "Registry Writer", "phases": {"freeze": {"delay_ms": 50}}}]
            """
        // The writers' window (1 s) leaves a loaded test machine room between the freeze and the thaw.
        try await Self.withWindows("win-slow", writers: writers, extra: "\"writer_timeout_ms\": 1000,") { windows, _ in
            let (policy, plan) = try await windows.plan(["retries": .int(0)])
            let (outcome, _) = await windows.run(plan, policy: policy, freezeID: "slow-1")
            #expect(outcome.achieved == .filesystem, "\(outcome.reasons)")
            #expect(outcome.reasons.contains("vss-writer-failed: SlowWriter FAILED_AT_PREPARE_SNAPSHOT VSS_E_WRITERERROR_TIMEOUT (0x800423F2)"), "\(outcome.reasons)")
            #expect(outcome.reasons.contains("vss-writer-failed: HungWriter FAILED_AT_POST_SNAPSHOT VSS_E_WRITER_NOT_RESPONDING (0x80042319)"), "\(outcome.reasons)")
            #expect(outcome.vssWriters.first { $0.name == "Registry Writer" }?.state == "STABLE")

            // The writers' own window from their freeze to their thaw (VSS: 60 s, here 1 s): a snapshot longer than that.
            let (late, _) = await windows.run(plan, policy: policy, freezeID: "slow-2", snapshotTakes: .milliseconds(1500))
            #expect(late.achieved == .filesystem)
            #expect(late.reasons.contains("vss-writer-failed: Registry Writer FAILED_AT_THAW VSS_E_WRITERERROR_TIMEOUT (0x800423F2)"), "\(late.reasons)")
        }
    }

    /// Passes everything to a real Windows agent's handler, but rewrites its VSS thaw replies.
    final class ForgingHandler: WrapsBuiltinHandler {
        let inner: BuiltinCommandHandler
        let forge: @Sendable (inout Quiesce_Agent_V1_VssThawResult) -> Void
        init(_ inner: BuiltinCommandHandler, forge: @escaping @Sendable (inout Quiesce_Agent_V1_VssThawResult) -> Void) {
            self.inner = inner
            self.forge = forge
        }
        func perform(_ command: AgentCommand) async -> CommandResult {
            var result = await self.inner.perform(command)
            if case .vssThaw(var thaw)? = result.payload {
                self.forge(&thaw)
                result.vssThaw = thaw
            }
            return result
        }
    }

    @Test("invariant 3 for VSS: a thaw reply naming another set, saying writes were not held, naming another freeze, or a writer not STABLE is never application")
    func forgedProof() async throws {
        try await withLoopDevices { loops in
            let c = try await loops.mount("c", fsType: "ext4", sizeMiB: 64).mountPoint
            let scenario = try VssScenario.parse(Data(Self.scenario(volumes: ["C:\\": c], writers: Self.healthyWriters).utf8), source: "test")
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "windows-vss"))
            let policy = try PluginPlanRunTests.policy(plugin, options: [:])
            let forgeries: [(String, ConsistencyLevel, String, @Sendable (inout Quiesce_Agent_V1_VssThawResult) -> Void)] = [
                ("another set", .crash, "vss-set-mismatch: ", { $0.snapshotSetID = "00000000-0000-0000-0000-000000000000" }),
                ("writes not held", .crash, "vss-hold-lost: ", { $0.writesHeld = false }),
                ("another freeze", .crash, "thaw-mismatch: ", { $0.thaw.freezeID = "someone-else" }),
                ("thawed by the budget", .crash, "thawed-by-budget: ", { $0.thaw.cause = .budget }),
                ("a writer failed at BackupComplete", .filesystem, "vss-writer-failed: Registry Writer FAILED_AT_BACKUP_COMPLETE", {
                    $0.writers[1].state = "FAILED_AT_BACKUP_COMPLETE"
                    $0.writers[1].stateCode = 12
                }),
            ]
            for (index, (label, level, reason, forge)) in forgeries.enumerated() {
                let id = "forge-\(index)"
                let handler = BuiltinCommandHandler(guardExecutable: AgentProcess.buildDirectory + "/quiesce-thaw-guard", vssScenario: scenario)
                let runner = try await fleet.agent(id, handler: ForgingHandler(handler, forge: forge))
                let task = Task { try await runner.run() }
                #expect(await fleet.engine.registry.waitFor([id], timeout: .seconds(20)).isEmpty)
                let plan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: id), policy: policy)
                let outcome = await PlanRunner(engine: fleet.engine, instanceID: id, policy: policy, freezeID: id).run(plan) {}
                #expect(outcome.achieved == level, "\(label): \(outcome.reasons)")
                #expect(outcome.reasons.contains { $0.hasPrefix(reason) }, "\(label): \(outcome.reasons)")
                task.cancel()
                await handler.shutdown()
            }
        }
    }

    @Test("the engine's snapshot slower than the 10 s hold: VSS_E_HOLD_WRITES_TIMEOUT, crash-consistent, volumes thawed by the hold limit")
    func holdTimeout() async throws {
        try await Self.withWindows("win-slowsnap", writers: Self.healthyWriters) { windows, _ in
            let (policy, plan) = try await windows.plan()
            let began = ContinuousClock.now
            let (outcome, blocked) = await windows.run(plan, policy: policy, freezeID: "ht-1", snapshotTakes: .milliseconds(10_300))
            #expect(blocked == false, "writes were still held after 10 s")
            #expect(ContinuousClock.now - began < .seconds(20))
            #expect(outcome.achieved == .crash, "\(outcome.reasons)")
            #expect(outcome.reasons.contains { $0.hasPrefix("vss-hold-timeout: VSS_E_HOLD_WRITES_TIMEOUT (0x80042314)") }, "\(outcome.reasons)")
            #expect(outcome.thaw?.cause == .budget && (outcome.frozen ?? .zero) <= .milliseconds(10_200), "\(String(describing: outcome.frozen))")
            let status = try await windows.fleet.engine.freezeStatus(of: "win-slowsnap")
            #expect(status.payload?.frozen == false)
        }
    }

    @Test("the agent SIGKILLed inside DoSnapshotSet: its guard releases the hold within 200 ms; recorded crash-consistent")
    func agentKilled() async throws {
        try await withLoopDevices { loops in
            let c = try await loops.mount("c", fsType: "ext4", sizeMiB: 64).mountPoint
            let d = try await loops.mount("d", fsType: "xfs", sizeMiB: 300).mountPoint
            let path = loops.directory + "/scenario.json"
            try Self.scenario(volumes: ["C:\\": c, "D:\\": d], writers: Self.healthyWriters).write(toFile: path, atomically: true, encoding: .utf8)
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let agent = try AgentProcess(engine: "\(fleet.address)", files: try await fleet.agentFiles("win-kill"), logPath: loops.directory + "/agent.log",
                                         hookDirectory: loops.directory, extraArguments: ["--vss-simulator", path])
            defer { agent.terminate() }
            #expect(await fleet.engine.registry.waitFor(["win-kill"], timeout: .seconds(20)).isEmpty, "\(agent.log)")
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "windows-vss"))
            let policy = try PluginPlanRunTests.policy(plugin, options: [:])
            let plan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "win-kill"), policy: policy)
            #expect(plan.expected == .application, "\(plan.reasons)")
            let guards = agent.children
            #expect(guards.count == 1)
            let measured = Box<Duration>()
            let outcome = await PlanRunner(engine: fleet.engine, instanceID: "win-kill", policy: policy, freezeID: "kill-1").run(plan) {
                let writer = try Writer(d + "/during")
                guard await writer.finished(within: .milliseconds(300)) == nil else { throw TestFailure("a write completed while held") }
                let killed = ContinuousClock.now
                kill(agent.pid, SIGKILL)
                if let done = await writer.finished(within: .seconds(3)) { measured.value = done - killed }
            }
            let thawedAfter = try #require(measured.value, "still held 3 s after the agent was killed")
            #expect(thawedAfter < .milliseconds(200), "released \(thawedAfter) after SIGKILL")
            print("measured: a write blocked by a VSS hold completed \(thawedAfter.milliseconds) ms after SIGKILL of the agent")
            #expect(outcome.achieved == .crash, "\(outcome.reasons)")
            #expect(outcome.reasons.contains { $0.hasPrefix("thaw-unproven") }, "\(outcome.reasons)")
            for pid in guards {
                for _ in 0..<100 where processExists(pid) { try? await Task.sleep(for: .milliseconds(10)) }
                #expect(!processExists(pid), "the guard outlived its agent")
            }
        }
    }

    @Test("a mixed fleet in one run: Linux (linux-freeze) and Windows (windows-vss) instances, levels, writers and tags in the report and the catalog")
    func mixedFleet() async throws {
        try await withLoopDevices { loops in
            let pool = try await loops.mount("pool", fsType: "xfs", sizeMiB: 400, mkfsOptions: ["-m", "reflink=1"]).mountPoint
            let provider = try LocalProvider(pool: pool + "/quiesce", createBurst: 20, createsPerSecond: 50)
            var mounts: [String: String] = [:]
            for disk in ["lin-1-data", "win-1-c", "win-1-d", "win-2-c"] {
                let image = try provider.diskPath(disk)
                mounts[disk] = try await blocking {
                    _ = try run("truncate", "-s", "64M", image)
                    _ = try run("mkfs.ext4", "-q", "-F", image)
                    return try loops.mountDevice(try loops.attach(image), at: disk)
                }
            }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try PluginPlanRunTests.writeHook(hooks + "/prescript.sh", "#!/bin/sh\nexit 0\n")
            try PluginPlanRunTests.writeHook(hooks + "/postscript.sh", "#!/bin/sh\nexit 0\n")
            let auditPath = loops.directory + "/audit.jsonl"
            let fleet = try await Fleet.start { $0.auditLogPath = auditPath }
            defer { fleet.discard() }
            let guardPath = AgentProcess.buildDirectory + "/quiesce-thaw-guard"
            let win1 = try VssScenario.parse(Data(Self.scenario(volumes: ["C:\\": mounts["win-1-c"]!, "D:\\": mounts["win-1-d"]!], writers: Self.healthyWriters).utf8), source: "win-1")
            let win2 = try VssScenario.parse(Data(Self.scenario(volumes: ["C:\\": mounts["win-2-c"]!], writers: """
                [{"name": "Exchange Writer", "phases": {"freeze": {"fail": "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT"}}}]
                """).utf8), source: "win-2")
            let handlers = [
                "lin-1": BuiltinCommandHandler(facts: FactsCollector(hooks: HookLocations(prescript: hooks + "/prescript.sh", postscript: hooks + "/postscript.sh", hookDirectory: hooks)),
                                               guardExecutable: guardPath),
                "win-1": BuiltinCommandHandler(guardExecutable: guardPath, vssScenario: win1),
                "win-2": BuiltinCommandHandler(guardExecutable: guardPath, vssScenario: win2),
            ]
            var tasks: [Task<Void, any Error>] = []
            for (id, handler) in handlers {
                let runner = try await fleet.agent(id, handler: handler)
                tasks.append(Task { try await runner.run() })
            }
            defer { for task in tasks { task.cancel() } }
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let text = """
                providers:
                  pool: { kind: local, pool: \(provider.pool), burst: 20, per_second: 50 }
                policies:
                  linux: { plugin: linux-freeze, wanted: application }
                  windows: { plugin: windows-vss, wanted: application }
                instances:
                  - { id: lin-1, policy: linux, disks: [lin-1-data], options: { only_mounts: [\(mounts["lin-1-data"]!)], prescript_path: \(hooks)/prescript.sh, postscript_path: \(hooks)/postscript.sh } }
                  - { id: win-1, policy: windows, disks: [win-1-c, win-1-d] }
                  - { id: win-2, policy: windows, disks: [win-2-c] }
                """
            let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: registry)
            #expect(await fleet.engine.registry.waitFor(["lin-1", "win-1", "win-2"], timeout: .seconds(20)).isEmpty)
            let catalog = try SQLiteCatalog(path: loops.directory + "/catalog.db")
            let coordinator = Coordinator(
                engine: fleet.engine, plugins: registry,
                providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: catalog, fleet: file)
            let report = await coordinator.run(runID: "mixed")
            let byID = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })
            #expect(byID["lin-1"]?.achieved == .application, "\(byID["lin-1"]?.reasons ?? [])")
            let w1 = try #require(byID["win-1"])
            #expect(w1.achieved == .application && w1.state == .succeeded && w1.disks == 2, "\(w1.reasons) \(w1.warnings)")
            #expect(w1.vssWriters == ["SqlServerWriter STABLE", "Registry Writer STABLE"], "\(w1.vssWriters)")
            let w2 = try #require(byID["win-2"])
            #expect(w2.achieved == .filesystem && w2.state == .downgraded)
            #expect(w2.reasons == ["vss-writer-failed: Exchange Writer FAILED_AT_FREEZE VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT (0x800423F0)"], "\(w2.reasons)")
            #expect(report.renderTable().contains("win-2 VSS writers:\n  Exchange Writer FAILED_AT_FREEZE"), "\(report.renderTable())")
            // The seed's tags on the groups.
            for (id, tag) in [("win-1", "APPConsistent"), ("win-2", "FsConsistent")] {
                let group = try #require(try await catalog.groups(GroupFilter(runID: "mixed")).first { $0.instanceID == id })
                let stored = try await provider.describe(group.providerGroupID)
                #expect(stored.tags["ConsistencyLevel"] == tag && group.disks.count == (id == "win-1" ? 2 : 1), "\(stored.tags)")
            }
            // The audit trail of the run: every command the run sent, to which instance, with its result, named as the run's.
            fleet.engine.audit?.flush()
            let trail = try AuditLog.read(path: auditPath).filter { $0.kind == "command" }
            let byRun = trail.filter { $0.actor == "run:mixed" }
            #expect(Set(byRun.map(\.instance)) == ["lin-1", "win-1", "win-2"], "\(trail.map { "\($0.actor) \($0.action) \($0.instance)" })")
            #expect(byRun.filter { $0.instance == "win-1" }.map(\.action) == ["facts", "vss-freeze", "vss-thaw"])
            #expect(byRun.filter { $0.instance == "lin-1" }.map(\.action) == ["facts", "run-hook", "freeze", "thaw", "run-hook"])
            #expect(byRun.allSatisfy { $0.result == "ok" && ($0.durationMs ?? -1) >= 0 })
            for handler in handlers.values { await handler.shutdown() }
        }
    }

    @Test("scenario files: every mistake named with its field, nothing half-read")
    func scenarioErrors() throws {
        func problems(_ text: String) -> [String] {
            do {
                _ = try VssScenario.parse(Data(text.utf8), source: "s.json")
                return []
            } catch let error as VssScenarioError {
                return error.problems
            } catch {
                return ["\(error)"]
            }
        }
        #expect(problems("not json").first?.hasPrefix("s.json: expected a JSON object, found text that is not JSON") == true)
        #expect(problems("{\"volumes\": []}") == ["s.json: volumes: expected a non-empty list of volumes, found a list"])
        let bad = problems("""
            {"vss_service": "paused", "colour": 1, "volumes": [{"name": "C:", "path": "rel"}],
             "writers": [{"name": "W", "phases": {"freeze": {"fail": "E_FAIL"}, "thaw": {"delay_ms": 5, "hang": true}, "melt": {}}}]}
            """)
        #expect(bad.contains("s.json: scenario: unknown key \"colour\" (expected one of hostname, os_name, os_version, volumes, vss_service, writer_timeout_ms, writers)"), "\(bad)")
        #expect(bad.contains("s.json: vss_service: expected running, stopped or disabled, found \"paused\""))
        #expect(bad.contains("s.json: volumes[0].name: expected a volume name such as C:\\ or D:\\, found \"C:\""))
        #expect(bad.contains("s.json: volumes[0].path: expected an absolute path (the mounted filesystem that plays this volume), found \"rel\""))
        #expect(bad.contains { $0.hasPrefix("s.json: writers[0].phases.freeze.fail: expected a VSS error such as VSS_E_WRITERERROR_RETRYABLE") && $0.hasSuffix("found \"E_FAIL\"") })
        #expect(bad.contains("s.json: writers[0].phases.thaw: expected exactly one of fail, delay_ms or hang, found delay_ms and hang"))
        #expect(bad.contains { $0.hasPrefix("s.json: writers[0].phases: unknown key \"melt\"") })
        let good = try VssScenario.parse(Data(#"{"volumes": [{"name": "C:\\", "path": "/x"}], "writers": [{"name": "W"}]}"#.utf8), source: "s.json")
        #expect(good.volumes == [.init(name: "C:\\", fsType: "NTFS", path: "/x")] && good.writers[0].id == VssScenario.uuid(from: "writer:W"))
    }
}
