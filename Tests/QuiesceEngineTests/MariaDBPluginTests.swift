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
import Testing

/// The `mariadb` plugin with examples/mariadb/hold, as a user runs it: Debian's
/// MariaDB with its data directory on an ext4 disk of a local reflink pool, a
/// writer that never stops, a fleet run through the coordinator with a real
/// agent; then the snapshot restored as a new disk and a second MariaDB
/// started on it. What an application-consistent snapshot of MariaDB must be:
/// every CHECK TABLE clean, the MyISAM pair (one statement updates both) equal,
/// the InnoDB counter exactly the marker recorded under the lock, no
/// transaction rolled back. And the bad paths: a long query in the way of the
/// lock, and the database down.
@Suite(
    "MariaDB through the mariadb plugin",
    .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/mariadbd"),
             "needs root and Debian's mariadb-server (.ci/run installs it)"),
    .serialized)
struct MariaDBPluginTests {
    /// Everything a run needs: pool, disk, server, hooks, agent, fleet.
    struct Setup {
        let loops: LoopDevices
        let provider: LocalProvider
        let mount: String
        let server: MariaDBScriptTests.Server
        let hooks: String
        let fleet: Fleet
        let registry: PluginRegistry
        let catalog: SQLiteCatalog

        func run(_ runID: String, options: String, minimum: String = "crash") async throws -> (RunReport, InstanceOutcome) {
            let text = """
                providers:
                  pool: { kind: local, pool: \(self.provider.pool), burst: 20, per_second: 50 }
                policies:
                  db: { plugin: mariadb, wanted: application, minimum: \(minimum), freeze_budget_ms: 10000 }
                instances:
                  - { id: db-1, policy: db, disks: [db-1-data], options: { only_mounts: [\(self.mount)], defaults_file: \(self.server.clientConfig), \(options) } }
                run: { agent_wait_s: 20 }

                """
            let file = try FleetFile.parse(text, path: "fleet.yaml", plugins: self.registry)
            let coordinator = Coordinator(
                engine: self.fleet.engine, plugins: self.registry,
                providers: ["pool": .init(provider: self.provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: self.catalog, fleet: file)
            let report = await coordinator.run(runID: runID)
            return (report, try #require(report.instances.first))
        }
    }

    static func withSetup(_ body: (Setup) async throws -> Void) async throws {
        try await withLoopDevices { loops in
            let pool = try await blocking { try loops.mount("pool", fsType: "xfs", sizeMiB: 700, mkfsOptions: ["-m", "reflink=1"]).mountPoint }
            let provider = try LocalProvider(pool: pool + "/quiesce", createBurst: 20, createsPerSecond: 50)
            let image = try provider.diskPath("db-1-data")
            let mount = try await blocking {
                _ = try run("truncate", "-s", "256M", image)
                _ = try run("mkfs.ext4", "-q", "-F", image)
                return try loops.mountDevice(try loops.attach(image), at: "db")
            }
            let server = try await blocking { try MariaDBScriptTests.Server(datadir: mount + "/data", directory: loops.directory) }
            defer { server.stop() }
            let hooks = loops.directory + "/hooks"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let hook = try String(contentsOfFile: PluginPlanRunTests.packageRoot + "/examples/mariadb/hold", encoding: .utf8)
            try PluginPlanRunTests.writeHook(hooks + "/mariadb-hold", hook)

            let fleet = try await Fleet.start()
            defer { fleet.discard() }
            let handler = BuiltinCommandHandler(
                facts: FactsCollector(hooks: HookLocations(prescript: hooks + "/none-pre", postscript: hooks + "/none-post", hookDirectory: hooks)),
                guardExecutable: AgentProcess.buildDirectory + "/quiesce-thaw-guard")
            let agent = Task { try await fleet.agent("db-1", handler: handler).run() }
            defer { agent.cancel() }
            #expect(await fleet.engine.registry.waitFor(["db-1"], timeout: .seconds(20)).isEmpty)
            let registry = await PluginPlanRunTests.registry()
            defer { Task { await registry.shutdown() } }
            let catalog = try SQLiteCatalog(path: loops.directory + "/catalog.db")
            try await body(Setup(loops: loops, provider: provider, mount: mount, server: server, hooks: hooks, fleet: fleet,
                                 registry: registry, catalog: catalog))
            #expect(!handler.freezer.isFrozen, "the agent is still frozen after the runs")
        }
    }

    /// Tables and a writer that keeps all of them busy: an InnoDB counter (one
    /// autocommit INSERT each), a MyISAM pair updated together by one
    /// statement, an Aria table.
    static func startWriter(_ server: MariaDBScriptTests.Server) async throws -> Process {
        try await server.query("""
            CREATE DATABASE app;
            CREATE TABLE app.counter (n INT PRIMARY KEY) ENGINE=InnoDB;
            CREATE TABLE app.pair_a (id INT PRIMARY KEY, n INT, pad VARCHAR(200)) ENGINE=MyISAM;
            CREATE TABLE app.pair_b (id INT PRIMARY KEY, n INT, pad VARCHAR(200)) ENGINE=MyISAM;
            CREATE TABLE app.log (n INT, pad VARCHAR(200)) ENGINE=Aria;
            INSERT INTO app.pair_a VALUES (1, 0, ''); INSERT INTO app.pair_b VALUES (1, 0, '');
            """)
        try await server.query("""
            DELIMITER //
            CREATE PROCEDURE app.work(IN rounds INT)
            BEGIN
              DECLARE i INT DEFAULT 0;
              WHILE i < rounds DO
                SET i = i + 1;
                INSERT INTO app.counter VALUES (i);
                UPDATE app.pair_a a JOIN app.pair_b b ON a.id = b.id SET a.n = i, b.n = i, a.pad = REPEAT('a', i % 200), b.pad = REPEAT('b', i % 200);
                INSERT INTO app.log VALUES (i, REPEAT('x', 100));
              END WHILE;
            END //
            """)
        let writer = try server.background("CALL app.work(100000000)")
        // Let it write for a while before the first snapshot.
        try await Task.sleep(for: .milliseconds(500))
        #expect(writer.isRunning, "the writer stopped before the snapshot")
        return writer
    }

    /// Restores the group's disk as a new disk, mounts it and starts a second MariaDB on it.
    static func restored(_ setup: Setup, group: String, name: String) async throws -> (MariaDBScriptTests.Server, String) {
        let disk = try await setup.provider.restore(group, disk: "db-1-data", to: .newDisk(name))
        let directory = setup.loops.directory + "/" + name
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let mount = try await blocking { try setup.loops.mountDevice(try setup.loops.attach(try setup.provider.diskPath(disk)), at: name + "-mnt") }
        let server = try await blocking { try MariaDBScriptTests.Server(existingDatadir: mount + "/data", directory: directory) }
        return (server, directory)
    }

    @Test("application: FTWRL held across the freeze; the restored copy starts clean, the pair equal, the counter exactly the marker")
    func applicationLevel() async throws {
        try await Self.withSetup { setup in
            let writer = try await Self.startWriter(setup.server)
            defer { writer.terminate() }
            let (report, outcome) = try await setup.run("app-1", options: "mode: ftwrl, marker_query: 'SELECT MAX(n) FROM app.counter'")
            #expect(outcome.achieved == .application && outcome.state == .succeeded, "\(outcome.reasons) \(outcome.warnings)")
            #expect(report.exitCode == 0)
            let marker = try #require(outcome.metadata["mariadb.marker"], "\(outcome.metadata)")
            #expect(Int(marker).map { $0 > 0 } == true, "marker \(marker)")
            #expect(outcome.metadata["mariadb.mode"] == "ftwrl")
            #expect(writer.isRunning, "the writer stopped: the lock was not released")
            print("measured: mariadb plugin (ftwrl) under a writer: application stall \(outcome.stall.map { "\($0)" } ?? "-"), frozen \(outcome.frozen.map { "\($0)" } ?? "-")")

            // The level and the metadata are in the catalog and the provider's tags.
            let group = try #require(try await setup.catalog.groups(GroupFilter(runID: "app-1")).first)
            #expect(group.achievedLevel == .application && group.tags["quiesce:mariadb.marker"] == marker, "\(group.tags)")

            let (copy, directory) = try await Self.restored(setup, group: group.id, name: "restored-app")
            defer { copy.stop() }
            let checks = try await copy.query("CHECK TABLE app.counter, app.pair_a, app.pair_b, app.log EXTENDED")
            for line in checks.split(separator: "\n") {
                let fields = line.split(separator: "\t")
                #expect(fields.count == 4 && fields[2] == "status" && fields[3] == "OK", "CHECK TABLE said: \(line)")
            }
            let pair = try await copy.query("SELECT a.n, b.n FROM app.pair_a a JOIN app.pair_b b ON a.id = b.id").split(separator: "\t").map {
                $0.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            #expect(pair.count == 2 && pair[0] == pair[1], "the MyISAM pair differs in the restored copy: \(pair)")
            let counted = try await copy.query("SELECT MAX(n) FROM app.counter").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(counted == marker, "the restored counter is \(counted), the marker under the lock \(marker)")
            let log = (try? String(contentsOfFile: directory + "/mysql.err", encoding: .utf8)) ?? ""
            #expect(!log.contains("Rolling back") && !log.contains("rolled back"), "InnoDB rolled back a transaction:\n\(log)")
            #expect(!log.contains("marked as crashed") && !log.contains("not closed properly"), "\(log)")
        }
    }

    @Test("a long query in the way of the lock: downgraded to filesystem with mariadb-lock-timeout naming it; thawed; writers go on")
    func lockTimeout() async throws {
        try await Self.withSetup { setup in
            try await setup.server.query("CREATE DATABASE app; CREATE TABLE app.t (n INT, pad INT) ENGINE=MyISAM; INSERT INTO app.t VALUES (1, 0);")
            // A MyISAM write that runs for 20 s: FTWRL and BACKUP STAGE both wait for it.
            let long = try setup.server.background("UPDATE app.t SET pad = SLEEP(20)")
            defer { long.terminate() }
            try await Task.sleep(for: .milliseconds(300))
            let started = ContinuousClock.now
            let (_, outcome) = try await setup.run("slow-1", options: "lock_wait_ms: 500")
            #expect(outcome.achieved == .filesystem && outcome.state == .downgraded, "\(outcome.reasons)")
            let reason = outcome.reasons.first ?? ""
            #expect(reason.hasPrefix("mariadb-lock-timeout: ") && reason.contains("SLEEP(20)"), "\(outcome.reasons)")
            #expect(ContinuousClock.now - started < .seconds(10), "the run waited for the long query")
            #expect(outcome.metadata.isEmpty)
            // Nothing of ours left waiting on the server: a new write to another table goes through at once.
            try await setup.server.query("CREATE TABLE app.u (n INT) ENGINE=MyISAM; INSERT INTO app.u VALUES (1)")
        }
    }

    @Test("the database down: downgraded to filesystem with mariadb-unavailable; with minimum application the instance fails")
    func databaseDown() async throws {
        try await Self.withSetup { setup in
            _ = try await blocking { setup.server.stop() }
            let (_, outcome) = try await setup.run("down-1", options: "lock_wait_ms: 500")
            #expect(outcome.achieved == .filesystem && outcome.state == .downgraded, "\(outcome.reasons)")
            #expect(outcome.reasons.first?.hasPrefix("mariadb-unavailable: ") == true, "\(outcome.reasons)")
            let (_, strict) = try await setup.run("down-2", options: "lock_wait_ms: 500", minimum: "application")
            #expect(strict.state == .failed && strict.reasons.first?.hasPrefix("mariadb-unavailable: ") == true, "\(strict.reasons)")
            // Failed before its snapshot: the create armed for it was abandoned, and nothing of it is left in the pool.
            #expect(strict.groupID == nil)
            let left = try FileManager.default.contentsOfDirectory(atPath: setup.provider.snapshotsDirectory)
            #expect(!left.contains { $0.hasPrefix(".") } && left.count == 1, "\(left)")
        }
    }
}
