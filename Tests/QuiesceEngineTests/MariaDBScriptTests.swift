import Foundation
import QuiesceCore
import QuiesceEngine
import QuiescePluginProto
import QuiescePlugins
import QuiesceTestSupport
import Testing

/// Debian's MariaDB with its data directory on a loop-mounted ext4 filesystem,
/// quiesced by the reference scripts in examples/mysql through real plans on a
/// real agent: while the snapshot runs, writes to the database block (the read
/// lock) and the filesystem is frozen; afterwards both go on.
@Suite(
    "MariaDB with the reference scripts",
    .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/mariadbd"),
             "needs root and Debian's mariadb-server (.ci/run installs it)"),
    .serialized)
struct MariaDBScriptTests {
    /// A MariaDB server on `datadir`, listening only on a unix socket under `directory`.
    final class Server: @unchecked Sendable {
        let process = Process()
        let socket: String
        let clientConfig: String

        convenience init(datadir: String, directory: String) throws {
            // A temporary directory of its own: a bootstrap clears the #sql temporary files it finds in
            // its tmpdir, so two servers set up at once in one /tmp (parallel tests) break each other.
            try FileManager.default.createDirectory(atPath: directory + "/tmp", withIntermediateDirectories: true)
            _ = try run("mariadb-install-db", "--no-defaults", "--datadir=\(datadir)", "--user=root",
                        "--auth-root-authentication-method=socket", "--skip-test-db", "--tmpdir=\(directory)/tmp")
            try self.init(existingDatadir: datadir, directory: directory, extra: [])
        }

        /// A server on a data directory that exists (a restored snapshot): MyISAM tables are not
        /// repaired on open, so CHECK TABLE sees them as the snapshot left them.
        convenience init(existingDatadir datadir: String, directory: String) throws {
            try self.init(existingDatadir: datadir, directory: directory, extra: ["--myisam-recover-options=OFF"])
        }

        init(existingDatadir datadir: String, directory: String, extra: [String]) throws {
            self.socket = directory + "/mysql.sock"
            self.clientConfig = directory + "/client.cnf"
            self.process.executableURL = URL(fileURLWithPath: "/usr/sbin/mariadbd")
            try FileManager.default.createDirectory(atPath: directory + "/tmp", withIntermediateDirectories: true)
            self.process.arguments = [
                "--no-defaults", "--datadir=\(datadir)", "--socket=\(self.socket)", "--skip-networking", "--user=root",
                "--pid-file=\(directory)/mysql.pid", "--log-error=\(directory)/mysql.err", "--tmpdir=\(directory)/tmp",
            ] + extra
            self.process.standardOutput = FileHandle.nullDevice
            self.process.standardError = FileHandle.nullDevice
            try self.process.run()
            try "[client]\nsocket=\(self.socket)\nuser=root\n".write(toFile: self.clientConfig, atomically: true, encoding: .utf8)
            for _ in 0..<100 where (try? self.query("SELECT 1")) == nil { usleep(100_000) }
            _ = try self.query("SELECT 1")
        }

        /// Runs `sql` with the mariadb client (blocking: for set-up on a thread of its own).
        @discardableResult
        func query(_ sql: String) throws -> String {
            try run("mariadb", "--defaults-extra-file=\(self.clientConfig)", "--batch", "--skip-column-names", "-e", sql)
        }

        /// A client running `sql` in the background (it blocks while the read lock is held).
        @discardableResult
        func query(_ sql: String) async throws -> String {
            try await blocking { try self.query(sql) }
        }

        func background(_ sql: String) throws -> Process {
            let client = Process()
            client.executableURL = URL(fileURLWithPath: "/usr/bin/mariadb")
            client.arguments = ["--defaults-extra-file=\(self.clientConfig)", "-e", sql]
            try client.run()
            return client
        }

        func stop() {
            guard self.process.isRunning else { return }
            self.process.terminate()
            self.process.waitUntilExit()
        }
    }

    /// Copies of the reference scripts, pointed at the test's client config and state directory.
    static func installScripts(into hooks: String, config: String, state: String) throws {
        let examples = PluginPlanRunTests.packageRoot + "/examples/mysql"
        try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        for name in ["prescript.sh", "postscript.sh", "db-hold"] {
            let text = try String(contentsOfFile: examples + "/" + name, encoding: .utf8)
                .replacingOccurrences(of: "/root/.quiesce-mysql.cnf", with: config)
                .replacingOccurrences(of: "/run/quiesce-mysql", with: state)
            try PluginPlanRunTests.writeHook(hooks + "/" + name, text)
        }
    }

    static func waitForExit(_ process: Process, within limit: Duration) async -> Bool {
        let until = ContinuousClock.now + limit
        while process.isRunning && ContinuousClock.now < until { try? await Task.sleep(for: .milliseconds(10)) }
        return !process.isRunning
    }

    @Test("linux-freeze with examples/mysql: inserts block across the snapshot, the level is application, the lock is gone after")
    func scripts() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("mysql", fsType: "ext4", sizeMiB: 256).mountPoint }
            let server = try await blocking { try Server(datadir: mount + "/data", directory: loops.directory) }
            defer { server.stop() }
            try await server.query("CREATE DATABASE shop; CREATE TABLE shop.orders (id INT) ENGINE=MyISAM; CREATE TABLE shop.items (id INT) ENGINE=InnoDB;")
            let hooks = loops.directory + "/hooks"
            try Self.installScripts(into: hooks, config: server.clientConfig, state: loops.directory + "/state")

            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let agent = try AgentProcess(engine: "\(fleet.address)", files: try await fleet.agentFiles("db-1"), logPath: loops.directory + "/agent.log", hookDirectory: hooks)
            defer { agent.terminate() }
            #expect(await fleet.engine.registry.waitFor(Set(["db-1"]), timeout: .seconds(20)).isEmpty, "\(agent.log)")
            let registry = await PluginPlanRunTests.registry([try await PluginPlanRunTests.exampleC()])
            defer { Task { await registry.shutdown() } }

            // 1. The seed's scripts with linux-freeze.
            let linux = try #require(registry.plugin(named: "linux-freeze"))
            let policy = try PluginPlanRunTests.policy(linux, options: [
                "only_mounts": .list([mount]), "prescript_path": .string(hooks + "/prescript.sh"),
                "postscript_path": .string(hooks + "/postscript.sh"), "prescript_timeout_ms": .int(4000),
            ])
            let plan = try await linux.plan(facts: try await fleet.engine.planFacts(of: "db-1"), policy: policy)
            #expect(plan.expected == .application, "\(plan.reasons)")
            let blocked = Box<Process>()
            let outcome = await PlanRunner(engine: fleet.engine, instanceID: "db-1", policy: policy, freezeID: "m1").run(plan) {
                blocked.value = try server.background("INSERT INTO shop.orders VALUES (1); INSERT INTO shop.items VALUES (1);")
                try await Task.sleep(for: .milliseconds(300))
                #expect(blocked.value!.isRunning, "an INSERT completed while the read lock should be held")
            }
            #expect(outcome.achieved == .application && !outcome.failed, "\(outcome.reasons) \(outcome.steps) \(outcome.warnings)")
            #expect(outcome.steps.allSatisfy { $0.ok }, "\(outcome.steps)")
            #expect(await Self.waitForExit(blocked.value!, within: .seconds(5)), "the INSERT is still blocked after the postscript")
            #expect(blocked.value!.terminationStatus == 0)
            let count1 = try await server.query("SELECT COUNT(*) FROM shop.orders").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(count1 == "1")
            print("measured: MariaDB via examples/mysql: application stall \(outcome.blocked?.milliseconds ?? -1) ms, filesystem frozen \(outcome.frozen?.milliseconds ?? -1) ms")

            // 2. The same lock as a hold, planned by the C example.
            let dbHold = try #require(registry.plugin(named: "db-hold"))
            let holdPolicy = try PluginPlanRunTests.policy(dbHold, options: ["only_mounts": .list([mount])])
            let holdPlan = try await dbHold.plan(facts: try await fleet.engine.planFacts(of: "db-1"), policy: holdPolicy)
            #expect(holdPlan.expected == .application, "\(holdPlan.reasons)")
            let held = await PlanRunner(engine: fleet.engine, instanceID: "db-1", policy: holdPolicy, freezeID: "m2").run(holdPlan) {
                blocked.value = try server.background("INSERT INTO shop.orders VALUES (2);")
                try await Task.sleep(for: .milliseconds(300))
                #expect(blocked.value!.isRunning, "an INSERT completed while the hold should keep the lock")
            }
            #expect(held.achieved == .application && held.thaw?.holds.first?.aliveAtThaw == true, "\(held.reasons) \(held.steps)")
            #expect(await Self.waitForExit(blocked.value!, within: .seconds(5)), "the INSERT is still blocked after the release")
            let count2 = try await server.query("SELECT COUNT(*) FROM shop.orders").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(count2 == "2")
            _ = try await blocking { server.stop() }
        }
    }
}
