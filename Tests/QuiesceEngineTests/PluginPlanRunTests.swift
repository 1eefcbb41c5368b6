import Foundation
import QuiesceCore
import QuiesceEngine
import QuiescePluginProto
import QuiescePlugins
import QuiesceProto
import QuiesceTestSupport
import Testing

/// Plans from real plugins (.so through the plugin host), run by the engine's
/// PlanRunner against a real `quiesce-agent` over mutual TLS, on loop-mounted
/// filesystems. Every policy names `only_mounts`: nothing else is ever frozen.
@Suite("Plugin plans against a real agent", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct PluginPlanRunTests {
    static var packageRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    /// The C example, built by `make -C Plugins/example-c` (scripts/test.sh runs it; so does this test if needed).
    static func exampleC() async throws -> String {
        let path = Self.packageRoot + "/Plugins/example-c/build/libquiesce-plugin-db-hold.so"
        if !FileManager.default.fileExists(atPath: path) {
            _ = try await run("make", "-s", "-C", Self.packageRoot + "/Plugins/example-c")
        }
        return path
    }

    static func registry(_ extra: [String] = []) async -> PluginRegistry {
        let build = AgentProcess.buildDirectory
        return await PluginRegistry.load(
            searchPath: PluginSearchPath(entries: [.init(path: build, explicit: false, prefix: "libquiesce-plugin-")]
                + extra.map { .init(path: $0, explicit: true) }),
            hostExecutable: build + "/quiesce-plugin-host")
    }

    static func writeHook(_ path: String, _ script: String, mode: Int = 0o700) throws {
        try writeExecutable(path, script, mode: mode_t(mode))
    }

    static func policy(_ plugin: Plugin, wanted: ConsistencyLevel = .application, minimum: ConsistencyLevel = .crash,
                       budgetMs: UInt32 = 10_000, options: [String: OptionInput]) throws -> PlanPolicy {
        try PlanPolicy.with {
            $0.name = "test"
            $0.wanted = wanted.planLevel
            $0.minimum = minimum.planLevel
            $0.freezeBudgetMs = budgetMs
            $0.options = try plugin.resolveOptions(options)
        }
    }

    @Test("the C example (db-hold): its hold spans the freeze, the thaw reply proves it → application-consistent")
    func exampleCPlan() async throws {
        let library = try await Self.exampleC()
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("db", fsType: "ext4", sizeMiB: 64).mountPoint }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            // The "database client": takes its lock, says READY, holds until ended; records its pid outside the frozen mount.
            try Self.writeHook(hooks + "/db-hold", "#!/bin/sh\necho $$ > '\(loops.directory)/hold.pid'\necho READY\nexec sleep 60\n")
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let agent = try AgentProcess(engine: "\(fleet.address)", files: try await fleet.agentFiles("vm-db"), logPath: loops.directory + "/agent.log", hookDirectory: hooks)
            defer { agent.terminate() }
            #expect(await fleet.engine.registry.waitFor(Set(["vm-db"]), timeout: .seconds(20)).isEmpty, "\(agent.log)")

            let registry = await Self.registry([library])
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "db-hold"), "\(registry.failures)")
            #expect(plugin.info.levels == [.crash, .filesystem, .application] && plugin.abi == "1.0")
            let facts = try await fleet.engine.planFacts(of: "vm-db")
            let policy = try Self.policy(plugin, options: ["only_mounts": .list([mount])])
            let plan = try await plugin.plan(facts: facts, policy: policy)
            #expect(plan.expected == .application, "\(plan.reasons)")
            #expect(plan.quiesce.map(\.id) == ["hold-db", "freeze"] && plan.thaw.map(\.id) == ["thaw", "release-db"])
            #expect(plan.quiesce.first?.action.hold.hook.sha256 == facts.hooks.first { $0.name == "db-hold" }?.sha256)
            #expect(plan.quiesce.last?.action.freeze.mountPoints == [mount])

            let writer = Box<Writer>()
            let runner = PlanRunner(engine: fleet.engine, instanceID: "vm-db", policy: policy, freezeID: "run1-vm-db")
            let outcome = await runner.run(plan) {
                writer.value = try Writer(mount + "/during-snapshot")
                #expect(await writer.value!.finished(within: .milliseconds(300)) == nil, "a write completed while frozen")
                let pid = Int32((try String(contentsOfFile: loops.directory + "/hold.pid", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines))
                #expect(pid.map(processExists) == true, "the hold is not running during the snapshot")
            }
            // On a failure, the agent's own account (its log: heartbeats heard, how the freeze ended) says which side stalled.
            #expect(outcome.achieved == .application && !outcome.failed, "\(outcome.reasons) \(outcome.steps)\nagent log:\n\(agent.log.suffix(3000))")
            #expect(outcome.thaw?.cause == .command && outcome.thaw?.holds.first?.aliveAtThaw == true)
            #expect(outcome.steps.map(\.id) == ["hold-db", "freeze", "snapshot", "thaw", "release-db"])
            #expect(outcome.steps.allSatisfy { $0.ok }, "\(outcome.steps)")
            #expect(await writer.value?.finished(within: .seconds(2)) != nil, "the write did not complete after the thaw")
            let pid = Int32((try String(contentsOfFile: loops.directory + "/hold.pid", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines))!
            #expect(!processExists(pid), "the released hold is still running")
            print("measured: db-hold plan on a real agent: blocked \(outcome.blocked?.milliseconds ?? -1) ms, frozen \(outcome.frozen?.milliseconds ?? -1) ms")

            // The same hook with mode 0755: filesystem-consistent, and the plan says why.
            try Self.writeHook(hooks + "/db-hold", "#!/bin/sh\necho READY\nexec sleep 60\n", mode: 0o755)
            let loose = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-db"), policy: policy)
            #expect(loose.expected == .filesystem && loose.reasons.first?.hasPrefix("hook-wrong-mode: db-hold") == true, "\(loose.reasons)")
            #expect(loose.quiesce.map(\.id) == ["freeze"])
        }
    }

    @Test("linux-freeze with the seed scripts: prescript, freeze, snapshot, thaw, postscript; a failing prescript downgrades and the postscript still runs")
    func linuxFreezePlan() async throws {
        try await withLoopDevices { loops in
            let data = try await blocking { try loops.mount("data", fsType: "xfs", sizeMiB: 300).mountPoint }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let trace = loops.directory + "/trace"
            try Self.writeHook(hooks + "/prescript.sh", "#!/bin/sh\necho pre >> '\(trace)'\n")
            try Self.writeHook(hooks + "/postscript.sh", "#!/bin/sh\necho post >> '\(trace)'\n")
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let agent = try AgentProcess(engine: "\(fleet.address)", files: try await fleet.agentFiles("vm-lf"), logPath: loops.directory + "/agent.log", hookDirectory: hooks)
            defer { agent.terminate() }
            #expect(await fleet.engine.registry.waitFor(Set(["vm-lf"]), timeout: .seconds(20)).isEmpty, "\(agent.log)")
            let registry = await Self.registry()
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "linux-freeze"), "\(registry.failures)")
            let options: [String: OptionInput] = [
                "only_mounts": .list([data]), "prescript_path": .string(hooks + "/prescript.sh"), "postscript_path": .string(hooks + "/postscript.sh"),
            ]
            let policy = try Self.policy(plugin, options: options)

            let plan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-lf"), policy: policy)
            #expect(plan.expected == .application, "\(plan.reasons)")
            let outcome = await PlanRunner(engine: fleet.engine, instanceID: "vm-lf", policy: policy, freezeID: "r1-vm-lf").run(plan) {
                try "snapshot\n".append(to: trace)
            }
            #expect(outcome.achieved == .application && !outcome.failed, "\(outcome.reasons)")
            #expect(outcome.steps.map(\.id) == ["prescript", "freeze", "snapshot", "thaw", "postscript"])
            #expect(try String(contentsOfFile: trace, encoding: .utf8) == "pre\nsnapshot\npost\n")

            // The prescript fails: downgraded to filesystem (minimum crash), the postscript still runs.
            try Self.writeHook(hooks + "/prescript.sh", "#!/bin/sh\necho pre-failed >> '\(trace)'\necho 'mysql: cannot connect' >&2\nexit 3\n")
            try? FileManager.default.removeItem(atPath: trace)
            let failing = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-lf"), policy: policy)
            let downgraded = await PlanRunner(engine: fleet.engine, instanceID: "vm-lf", policy: policy, freezeID: "r2-vm-lf").run(failing) {
                try "snapshot\n".append(to: trace)
            }
            #expect(downgraded.achieved == .filesystem && !downgraded.failed)
            #expect(downgraded.reasons == ["prescript-failed: exit 3: mysql: cannot connect"], "\(downgraded.reasons)")
            #expect(try String(contentsOfFile: trace, encoding: .utf8) == "pre-failed\nsnapshot\npost\n")

            // With the minimum at application the same failure fails the instance: no snapshot, the postscript still runs.
            let strict = try Self.policy(plugin, minimum: .application, options: options)
            try? FileManager.default.removeItem(atPath: trace)
            let strictPlan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-lf"), policy: strict)
            let failed = await PlanRunner(engine: fleet.engine, instanceID: "vm-lf", policy: strict, freezeID: "r3-vm-lf").run(strictPlan) {
                try "snapshot\n".append(to: trace)
            }
            #expect(failed.failed && !failed.snapshotTaken && failed.achieved == .crash, "\(failed.reasons)")
            #expect(try String(contentsOfFile: trace, encoding: .utf8) == "pre-failed\npost\n")

            // A snapshot slower than the budget: the guard thaws, the thaw reply says so, the level is crash.
            try Self.writeHook(hooks + "/prescript.sh", "#!/bin/sh\nexit 0\n")
            let tight = try Self.policy(plugin, budgetMs: 1200, options: options.merging([
                "prescript_timeout_ms": .int(300), "postscript_timeout_ms": .int(300), "freeze_timeout_ms": .int(300), "thaw_timeout_ms": .int(300),
            ]) { $1 })
            let tightPlan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-lf"), policy: tight)
            let slow = await PlanRunner(engine: fleet.engine, instanceID: "vm-lf", policy: tight, freezeID: "r4-vm-lf").run(tightPlan) {
                try await Task.sleep(for: .milliseconds(1800))
            }
            #expect(slow.thaw?.cause == .budget, "\(String(describing: slow.thaw))")
            #expect(slow.achieved == .crash && slow.reasons.contains { $0.hasPrefix("thawed-by-budget") }, "\(slow.reasons)")
        }
    }
}

final class Box<T>: @unchecked Sendable {
    var value: T?
}

extension String {
    func append(to path: String) throws {
        if let handle = FileHandle(forWritingAtPath: path) {
            defer { try? handle.close() }
            handle.seekToEndOfFile()
            handle.write(Data(self.utf8))
        } else {
            try self.write(toFile: path, atomically: false, encoding: .utf8)
        }
    }
}
