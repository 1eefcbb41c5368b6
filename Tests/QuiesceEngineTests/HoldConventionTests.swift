import Foundation
import QuiesceCore
import QuiesceEngine
import QuiescePluginProto
import QuiescePlugins
import QuiesceTestSupport
import Testing

/// What a hold's hook can tell the engine (docs/plugin-guide.md), driven through
/// the `mariadb` plugin's plan on a real agent with hooks that behave like a
/// database client does: metadata printed under the lock, its own failure
/// reason, and whether its lock held until the release.
@Suite("Hold conventions", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct HoldConventionTests {
    /// Runs the mariadb plugin's plan with `hook` installed as its hold hook.
    func run(_ hook: String, _ body: (PlanOutcome) throws -> Void) async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("db", fsType: "ext4", sizeMiB: 64).mountPoint }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try PluginPlanRunTests.writeHook(hooks + "/mariadb-hold", hook)
            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let agent = try AgentProcess(engine: "\(fleet.address)", files: try await fleet.agentFiles("vm-h"), logPath: loops.directory + "/agent.log",
                                         hookDirectory: hooks)
            defer { agent.terminate() }
            #expect(await fleet.engine.registry.waitFor(Set(["vm-h"]), timeout: .seconds(20)).isEmpty, "\(agent.log)")
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let plugin = try #require(registry.plugin(named: "mariadb"), "\(registry.failures)")
            let policy = try PluginPlanRunTests.policy(plugin, options: ["only_mounts": .list([mount]), "lock_wait_ms": .int(500)])
            let plan = try await plugin.plan(facts: try await fleet.engine.planFacts(of: "vm-h"), policy: policy)
            #expect(plan.expected == .application && plan.quiesce.map(\.id) == ["hold-mariadb", "freeze"], "\(plan.reasons)")
            #expect(plan.quiesce.first?.action.hold.args.contains("--lock-wait-ms") == true)
            let outcome = await PlanRunner(engine: fleet.engine, instanceID: "vm-h", policy: policy, freezeID: "h1").run(plan) {}
            try body(outcome)
        }
    }

    @Test("quiesce-meta lines printed under the lock go with the outcome; odd keys and lines are ignored")
    func metadata() async throws {
        let hook = """
            #!/bin/sh
            trap 'exit 0' TERM
            printf 'quiesce-meta db.gtid=0-1-42\\nquiesce-meta db.marker=a=b c\\nquiesce-meta bad key=x\\nnoise=1\\nREADY\\n'
            while :; do sleep 1; done
            """
        try await self.run(hook) { outcome in
            #expect(outcome.achieved == .application && !outcome.failed, "\(outcome.reasons) \(outcome.steps)")
            #expect(outcome.metadata == ["db.gtid": "0-1-42", "db.marker": "a=b c"], "\(outcome.metadata)")
            #expect((outcome.blocked ?? .zero) > .zero && (outcome.blocked ?? .seconds(9)) < .seconds(5))
        }
    }

    @Test("a hold that fails names its own reason on its last line; the instance is filesystem-consistent with it")
    func ownReason() async throws {
        let hook = """
            #!/bin/sh
            echo 'some chatter' >&2
            echo 'mariadb-lock-timeout: no lock within 500 ms; longest-running query: id=7 query=SELECT SLEEP(20)' >&2
            exit 3
            """
        try await self.run(hook) { outcome in
            #expect(outcome.achieved == .filesystem && !outcome.failed)
            #expect(outcome.reasons == ["mariadb-lock-timeout: no lock within 500 ms; longest-running query: id=7 query=SELECT SLEEP(20)"],
                    "\(outcome.reasons)")
            #expect(outcome.metadata.isEmpty)
        }
    }

    @Test("a hold that says at its release that its lock did not hold: filesystem-consistent, its metadata dropped")
    func lostAtRelease() async throws {
        let hook = """
            #!/bin/sh
            trap 'echo "mariadb-unavailable: ERROR 2006 (HY000): server has gone away" >&2; exit 1' TERM
            printf 'quiesce-meta db.gtid=0-1-42\\nREADY\\n'
            while :; do sleep 1; done
            """
        try await self.run(hook) { outcome in
            #expect(outcome.achieved == .filesystem && !outcome.failed, "\(outcome.reasons)")
            #expect(outcome.reasons.last?.hasPrefix("hold-failed-at-release: hold mariadb exited 1 when released: mariadb-unavailable: ERROR 2006") == true,
                    "\(outcome.reasons)")
            #expect(outcome.metadata.isEmpty, "\(outcome.metadata)")
        }
    }
}
