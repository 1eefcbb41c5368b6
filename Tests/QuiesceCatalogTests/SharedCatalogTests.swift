import Foundation
import GRDB
import QuiesceCatalog
import QuiesceCatalogPostgres
import QuiesceCore
import Testing

/// Several engines on one PostgreSQL catalog: each engine is a `PostgresCatalog` of its own
/// (its own connections and engine id) on one schema, as two `quiesce serve` processes would be.
@Suite("Shared catalog (PostgreSQL)", .enabled(if: StoreKind.postgresURL != nil, "needs QUIESCE_TEST_POSTGRES (scripts/test.sh starts a server)"))
struct SharedCatalogTests {
    static func units(_ names: [String]) -> [WorkUnit] {
        names.enumerated().map { WorkUnit(key: $1, members: [$1], position: $0) }
    }

    @Test("two engines enter one run, get each unit once, and an engine that stops renewing hands its unit over")
    func leases() async throws {
        let schema = "t_\(UUID().uuidString.prefix(8).lowercased())"
        try await withPostgresCatalog(engine: "e1", lease: .seconds(2), schema: schema) { e1 in
            try await withPostgresCatalog(engine: "e2", lease: .seconds(2), schema: schema) { e2 in
                #expect(try await e1.enterRun(RunRecord(id: "r1", source: "a.yaml")) == .started)
                #expect(try await e2.enterRun(RunRecord(id: "r1", source: "a.yaml")) == .joined(engines: ["e1"]))
                // Both add the fleet's units: each is there once.
                try await e1.enqueue(runID: "r1", units: Self.units(["a", "b", "c", "d"]), reopen: false)
                try await e2.enqueue(runID: "r1", units: Self.units(["a", "b", "c", "d"]), reopen: false)
                #expect(try await e1.progress(runID: "r1") == WorkProgress(open: 4, held: 0, done: 0, othersWorking: 1))

                // Each engine gets only units whose agents it holds, in fleet order.
                #expect(try await e1.claim(runID: "r1", serving: ["b"])?.unit.key == "b")
                #expect(try await e2.claim(runID: "r1", serving: ["b"]) == nil, "b was handed out twice")
                #expect(try await e2.claim(runID: "r1", serving: ["a", "b", "c"])?.unit.key == "a")
                try await e2.complete(runID: "r1", unit: "a")
                await #expect(throws: CatalogError.self) { try await e2.complete(runID: "r1", unit: "b") }
                #expect(try await e2.progress(runID: "r1") == WorkProgress(open: 2, held: 1, done: 1, othersWorking: 1))

                // e1 stops renewing (it died): after its lease, e2 takes b over, told from whom.
                try await e2.renewLeases()
                #expect(try await e2.claim(runID: "r1", serving: ["b"]) == nil, "a live lease was taken")
                try await Task.sleep(for: .milliseconds(2300))
                try await e2.renewLeases()
                let takeover = try #require(try await e2.claim(runID: "r1", serving: ["b"]))
                #expect(takeover.unit.key == "b" && takeover.takenOverFrom == "e1")
                // The dead engine's late word is refused: the unit is e2's now.
                await #expect(throws: CatalogError.self) { try await e1.complete(runID: "r1", unit: "b") }
                try await e2.complete(runID: "r1", unit: "b")

                // The agentless rest: anyone may take it (serving nil).
                #expect(try await e2.claim(runID: "r1", serving: [])  == nil)
                #expect(try await e2.claim(runID: "r1", serving: nil)?.unit.key == "c")
                #expect(try await e2.claim(runID: "r1", serving: nil)?.unit.key == "d")
                try await e2.complete(runID: "r1", unit: "c")
                try await e2.complete(runID: "r1", unit: "d")
                #expect(try await e2.progress(runID: "r1").finished)
                try await e2.finishRun("r1", state: .succeeded, at: Date())
                #expect(try await e1.run("r1")?.state == .succeeded)
            }
        }
    }

    @Test("claims racing from two engines: every unit handed out exactly once (FOR UPDATE SKIP LOCKED)")
    func race() async throws {
        let schema = "t_\(UUID().uuidString.prefix(8).lowercased())"
        try await withPostgresCatalog(engine: "e1", schema: schema) { e1 in
            try await withPostgresCatalog(engine: "e2", schema: schema) { e2 in
                _ = try await e1.enterRun(RunRecord(id: "r", source: "f"))
                _ = try await e2.enterRun(RunRecord(id: "r", source: "f"))
                let names = (0..<60).map { "i-\($0)" }
                try await e1.enqueue(runID: "r", units: Self.units(names), reopen: false)
                let claimed = try await withThrowingTaskGroup(of: [String].self) { group in
                    for engine in [e1, e2, e1, e2] {
                        group.addTask {
                            var mine: [String] = []
                            while let claim = try await engine.claim(runID: "r", serving: nil) { mine.append(claim.unit.key) }
                            return mine
                        }
                    }
                    var all: [[String]] = []
                    for try await mine in group { all.append(mine) }
                    return all
                }
                let every = claimed.flatMap { $0 }
                #expect(every.count == names.count && Set(every) == Set(names), "handed out twice or left out")
                #expect(claimed.filter { !$0.isEmpty }.count >= 2, "one claimer took everything: the race was not a race")
            }
        }
    }

    @Test("an instance is in one run at a time across engines; a run whose engines all stopped is interrupted, then resumed")
    func instanceLocksAndInterruption() async throws {
        let schema = "t_\(UUID().uuidString.prefix(8).lowercased())"
        try await withPostgresCatalog(engine: "e1", lease: .seconds(2), schema: schema) { e1 in
            try await withPostgresCatalog(engine: "e2", lease: .seconds(2), schema: schema) { e2 in
                _ = try await e1.enterRun(RunRecord(id: "nightly", source: "f"))
                _ = try await e2.enterRun(RunRecord(id: "adhoc", source: "g"))
                try await e1.enqueue(runID: "nightly", units: [WorkUnit(key: "group:shop", members: ["db-1", "db-2"], position: 0)], reopen: false)
                try await e2.enqueue(runID: "adhoc", units: Self.units(["db-2"]), reopen: false)
                let first = try #require(try await e1.claim(runID: "nightly", serving: ["db-1", "db-2"]))
                #expect(first.busy.isEmpty && first.unit.members == ["db-1", "db-2"])
                let second = try #require(try await e2.claim(runID: "adhoc", serving: ["db-2"]))
                #expect(second.busy == ["db-2": "nightly"])
                try await e2.complete(runID: "adhoc", unit: "db-2")
                try await e1.complete(runID: "nightly", unit: "group:shop")  // frees db-1 and db-2
                try await e2.enqueue(runID: "adhoc", units: Self.units(["db-2"]), reopen: true)
                #expect(try await e2.claim(runID: "adhoc", serving: ["db-2"])?.busy.isEmpty == true)

                // Every engine of "nightly" stops renewing: it is interrupted, and can be taken up again.
                #expect(try await e2.run("nightly")?.state == .running)
                try await Task.sleep(for: .milliseconds(2300))
                #expect(try await e2.run("nightly")?.state == .interrupted)
                #expect(try await e2.enterRun(RunRecord(id: "nightly", source: "f")) == .resumed)
                // A run with a live engine is refused to beginRun (the single-engine entry).
                await #expect(throws: CatalogError.self) { try await e1.beginRun(RunRecord(id: "nightly", source: "f")) }
            }
        }
    }

    @Test("two engines starting together migrate one schema once")
    func concurrentMigration() async throws {
        let schema = "t_\(UUID().uuidString.prefix(8).lowercased())"
        let url = try #require(StoreKind.postgresURL) + "?schema=" + schema
        let opened = try await withThrowingTaskGroup(of: PostgresCatalog.self) { group in
            for index in 0..<4 { group.addTask { try await PostgresCatalog.open(try CatalogLocation(parsing: url), engineID: "m\(index)") } }
            var all: [PostgresCatalog] = []
            for try await catalog in group { all.append(catalog) }
            return all
        }
        try await opened[0].beginRun(RunRecord(id: "r", source: "f"))
        #expect(try await opened[3].runs().map(\.id) == ["r"])
        try await opened[0].destroy()
        for catalog in opened { await catalog.close() }
    }

    @Test("catalog URLs: what is wrong is said, with what was expected; an unreachable server names itself")
    func locations() async throws {
        let good = try CatalogLocation(parsing: "postgres://quiesce@db.example:6543/fleet?schema=prod&sslmode=require&password_file=/etc/q/pw",
                                       environment: [:])
        #expect(good.user == "quiesce" && good.host == "db.example" && good.port == 6543 && good.database == "fleet")
        #expect(good.schema == "prod" && good.requireTLS && good.passwordFile == "/etc/q/pw")
        for (text, says) in [
            ("postgres://quiesce:secret@db/fleet", "password in the URL"),
            ("postgres://db", "no database name"),
            ("postgres://db/fleet?schema=a;drop", "schema \"a;drop\""),
            ("postgres://db/fleet?sslmode=maybe", "sslmode \"maybe\""),
            ("postgres://db/fleet?colour=blue", "unknown parameter \"colour\""),
        ] {
            do {
                _ = try CatalogLocation(parsing: text, environment: [:])
                Issue.record("\(text) was accepted")
            } catch {
                #expect("\(error)".contains(says), "\(text): \(error)")
                #expect("\(error)".contains("expected postgres://"), "\(error)")
                #expect(!"\(error)".contains("secret"), "the password was echoed")
            }
        }
        // A port nobody listens on (bound, not listening).
        let socket = try ReservedPort()
        defer { socket.close() }
        do {
            _ = try await PostgresCatalog.open(try CatalogLocation(parsing: "postgres://postgres@127.0.0.1:\(socket.port)/postgres"))
            Issue.record("opened a catalog where no server listens")
        } catch let error as CatalogError {
            #expect(error.description.contains("127.0.0.1:\(socket.port)"), "\(error)")
        }
    }
}

/// A loopback port that is bound and not listening: connecting to it is refused at once.
struct ReservedPort {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = Foundation.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw POSIXError(.EADDRINUSE) }
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }
    func close() { _ = Foundation.close(self.fd) }
}

@Suite("SQLite catalog off the pool")
struct SQLiteOffPoolTests {
    @Test("writes that wait for SQLite's lock hold no cooperative thread: more writers than pool threads, and the pool still runs")
    func offPool() async throws {
        let path = scratchCatalog()
        defer { try? FileManager.default.removeItem(atPath: (path as NSString).deletingLastPathComponent) }
        let catalog = try SQLiteCatalog(path: path)
        try await catalog.beginRun(RunRecord(id: "r", source: "test"))
        // Another connection holds the write lock, as a slow fsync or another process would.
        var unsafe = Configuration()
        unsafe.allowsUnsafeTransactions = true
        let other = try DatabaseQueue(path: path, configuration: unsafe)
        let release = try await other.writeWithoutTransaction { db -> Bool in try db.execute(sql: "BEGIN IMMEDIATE"); return true }
        #expect(release)
        let writers = ProcessInfo.processInfo.activeProcessorCount + 2
        let started = ContinuousClock.now
        let writes = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<writers {
                    group.addTask {
                        try await catalog.record(InstanceRecord(runID: "r", instanceID: "i-\(index)", state: .succeeded, wantedLevel: .crash, minimumLevel: .crash))
                    }
                }
                try await group.waitForAll()
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        // Every writer is waiting for the lock now. Only this task, on the cooperative pool, can
        // release it: were the writers holding the pool's threads, it would never run, and they
        // would fail at SQLite's busy timeout (10 s) instead of all being written.
        #expect(await Task.detached { true }.value)
        try await other.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
        try await writes.value
        #expect(ContinuousClock.now - started >= .milliseconds(300))
        #expect(try await catalog.instances(ofRun: "r").count == writers)
    }
}
