import Foundation
import QuiesceCatalog
import QuiesceCatalogPostgres
import QuiesceCore
import QuiesceTestSupport
import Testing

func scratchCatalog() -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-catalog-\(UUID().uuidString.prefix(8))/catalog.db").path
}

func sampleGroup(_ id: String, run: String?, instance: String, level: ConsistencyLevel, at date: Date) -> GroupRecord {
    GroupRecord(
        id: id, runID: run, instanceID: instance, provider: "local", providerGroupID: "lg-\(id)", idempotencyToken: "tok-\(id)",
        wantedLevel: .application, achievedLevel: level,
        reasons: level == .application ? [] : [Reason(code: "hook-wrong-mode", message: "/tmp/prescript.sh has mode 0755; expected 0700")],
        state: .ready, createdAt: date, frozenUs: 850, applicationStallUs: 1200, stepTimingsUs: ["freeze": 300, "snapshot": 500],
        tags: ["level": level.tagValue],
        disks: [DiskSnapshot(diskID: "root", snapshotID: "\(id)/root", sizeBytes: 1 << 30, dataBytes: 1 << 24, method: .reflink, durationUs: 400, sha256: String(repeating: "a", count: 64))])
}

/// The stores every catalog test runs on: SQLite always, PostgreSQL when scripts/test.sh started
/// one (QUIESCE_TEST_POSTGRES, a URL to its database).
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite, postgres
    var testDescription: String { self.rawValue }
    static let postgresURL = ProcessInfo.processInfo.environment["QUIESCE_TEST_POSTGRES"]
    static let available: [StoreKind] = postgresURL == nil ? [.sqlite] : [.sqlite, .postgres]
}

/// A PostgreSQL catalog in a schema of its own, dropped after `body`.
func withPostgresCatalog<T>(engine: String = "e-test", lease: Duration = .seconds(30), schema: String = "t_\(UUID().uuidString.prefix(8).lowercased())",
                            _ body: (PostgresCatalog) async throws -> T) async throws -> T {
    let url = try #require(StoreKind.postgresURL)
    let catalog = try await PostgresCatalog.open(try CatalogLocation(parsing: url + "?schema=" + schema), lease: lease, engineID: engine)
    do {
        let result = try await body(catalog)
        try? await catalog.destroy()
        await catalog.close()
        return result
    } catch {
        try? await catalog.destroy()
        await catalog.close()
        throw error
    }
}

func withCatalog<T>(_ kind: StoreKind, _ body: (any CatalogStore) async throws -> T) async throws -> T {
    switch kind {
    case .sqlite:
        let path = scratchCatalog()
        defer { try? FileManager.default.removeItem(atPath: (path as NSString).deletingLastPathComponent) }
        return try await body(try SQLiteCatalog(path: path))
    case .postgres:
        return try await withPostgresCatalog { try await body($0) }
    }
}

@Suite("Catalog")
struct CatalogTests {
    @Test("records groups with their disks and finds them by instance, run, level and age", arguments: StoreKind.available)
    func roundTrip(_ kind: StoreKind) async throws { try await withCatalog(kind) { catalog in
        try await catalog.beginRun(RunRecord(id: "r1", source: "test"))
        let now = Date()
        try await catalog.record(sampleGroup("g1", run: "r1", instance: "i-1", level: .application, at: now.addingTimeInterval(-7200)))
        try await catalog.record(sampleGroup("g2", run: "r1", instance: "i-2", level: .filesystem, at: now.addingTimeInterval(-60)))
        try await catalog.record(sampleGroup("g3", run: nil, instance: "i-1", level: .crash, at: now))
        try await catalog.finishRun("r1", state: .degraded, at: Date())

        let g2 = try #require(try await catalog.group("g2"))
        #expect(g2 == sampleGroup("g2", run: "r1", instance: "i-2", level: .filesystem, at: g2.createdAt))
        #expect(g2.reasons.first?.code == "hook-wrong-mode")
        #expect(try await catalog.groups(GroupFilter()).map(\.id) == ["g3", "g2", "g1"])
        #expect(try await catalog.groups(GroupFilter(instanceID: "i-1")).map(\.id) == ["g3", "g1"])
        #expect(try await catalog.groups(GroupFilter(runID: "r1")).map(\.id) == ["g2", "g1"])
        #expect(try await catalog.groups(GroupFilter(level: .filesystem)).map(\.id) == ["g2"])
        #expect(try await catalog.groups(GroupFilter(createdBefore: now.addingTimeInterval(-3600))).map(\.id) == ["g1"])
        #expect(try await catalog.run("r1")?.state == .degraded)

        // Re-recording replaces (e.g. pending → ready), never duplicates.
        var updated = g2
        updated.disks[0].sha256 = String(repeating: "b", count: 64)
        try await catalog.record(updated)
        #expect(try await catalog.group("g2")?.disks.map(\.sha256) == [String(repeating: "b", count: 64)])
        #expect(try await catalog.groups(GroupFilter()).count == 3)

        // The idempotency token is unique: a second group for the same token is a conflict.
        var duplicate = sampleGroup("g4", run: "r1", instance: "i-1", level: .crash, at: now)
        duplicate.idempotencyToken = "tok-g1"
        await #expect(throws: CatalogError.self) { try await catalog.record(duplicate) }

        try await catalog.deleteGroup("g1")
        #expect(try await catalog.group("g1") == nil)
        await #expect(throws: CatalogError.self) { try await catalog.deleteGroup("g1") }
        // Times keep their milliseconds (retention orders groups made in one second).
        let precise = Date(timeIntervalSince1970: 1_800_000_000.123)
        try await catalog.record(sampleGroup("g5", run: nil, instance: "i-9", level: .crash, at: precise))
        let back = try #require(try await catalog.group("g5")).createdAt.timeIntervalSince1970
        #expect(abs(back - precise.timeIntervalSince1970) < 0.001)
    } }

    @Test("instances are recorded per run, with or without a group", arguments: StoreKind.available)
    func instances(_ kind: StoreKind) async throws { try await withCatalog(kind) { catalog in
        try await catalog.beginRun(RunRecord(id: "r1", source: "test"))
        let missing = InstanceRecord(runID: "r1", instanceID: "i-2", state: .failed, wantedLevel: .application, minimumLevel: .filesystem,
                                     reasons: [Reason(code: "agent-not-connected", message: "no session within 60 s")])
        try await catalog.record(missing)
        var done = InstanceRecord(runID: "r1", instanceID: "i-1", state: .running, wantedLevel: .application, minimumLevel: .crash)
        try await catalog.record(done)
        done.state = .downgraded
        done.achievedLevel = .filesystem
        done.groupID = "g1"
        done.durationUs = 4200
        try await catalog.record(done)
        #expect(try await catalog.instances(ofRun: "r1") == [done, missing])
        #expect(try await catalog.instances(ofRun: "r2").isEmpty)
        // Providers are remembered by name, the latest settings winning.
        try await catalog.recordProvider(ProviderRecord(name: "pool", kind: "local", settings: ["pool": "/a"]))
        try await catalog.recordProvider(ProviderRecord(name: "pool", kind: "local", settings: ["pool": "/b"]))
        #expect(try await catalog.providers().map(\.settings) == [["pool": "/b"]])
    } }

    @Test("reopening keeps everything; a finished run stays finished")
    func reopen() async throws {
        let path = scratchCatalog()
        defer { try? FileManager.default.removeItem(atPath: (path as NSString).deletingLastPathComponent) }
        do {
            let catalog = try SQLiteCatalog(path: path)
            try await catalog.beginRun(RunRecord(id: "r1", source: "test"))
            try await catalog.record(sampleGroup("g1", run: "r1", instance: "i-1", level: .application, at: Date()))
            try await catalog.finishRun("r1", state: .succeeded)
        }
        let again = try SQLiteCatalog(path: path)
        #expect(again.interruptedOnOpen.isEmpty)
        #expect(try await again.run("r1")?.state == .succeeded)
        #expect(try await again.groups(GroupFilter()).count == 1)
        // This process is alive: its own running run is not interrupted by another open.
        try await again.beginRun(RunRecord(id: "r2", source: "test"))
        #expect(try SQLiteCatalog(path: path).interruptedOnOpen.isEmpty)
    }

    @Test("a file that is not a catalog is an error naming it")
    func notACatalog() throws {
        let path = scratchCatalog()
        let directory = (path as NSString).deletingLastPathComponent
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try Data(repeating: 0x41, count: 8192).write(to: URL(fileURLWithPath: path))
        do {
            _ = try SQLiteCatalog(path: path)
            Issue.record("opened garbage as a catalog")
        } catch let error as CatalogError {
            #expect(error.description.contains(path))
        }
    }

    @Test("kill -9 of a writer mid-run: the catalog opens consistent and the run is interrupted")
    func killedWriter() async throws {
        let path = scratchCatalog()
        defer { try? FileManager.default.removeItem(atPath: (path as NSString).deletingLastPathComponent) }
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("quiesce-bench")
        writer.arguments = ["catalog-writer", "--catalog", path, "--run", "r-killed"]
        let output = Pipe()
        writer.standardOutput = output
        try writer.run()
        defer { if writer.isRunning { kill(writer.processIdentifier, SIGKILL) } }
        // Waiting for its first line takes as long as a debug binary takes to start: not on the cooperative pool.
        let started = try await blocking { output.fileHandleForReading.availableData }
        #expect(String(decoding: started, as: UTF8.self).contains("started"))
        // Let it write a while (reading alongside, as `quiesce snapshots` would), then
        // kill it, mid-transaction as likely as not.
        let deadline = ContinuousClock.now + .seconds(20)
        while try await SQLiteCatalog(path: path).groups(GroupFilter(runID: "r-killed")).count < 20, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(try SQLiteCatalog(path: path).interruptedOnOpen.isEmpty, "a live writer's run must not be marked interrupted")
        kill(writer.processIdentifier, SIGKILL)
        writer.waitUntilExit()
        #expect(writer.terminationReason == .uncaughtSignal)

        let catalog = try SQLiteCatalog(path: path)
        #expect(catalog.interruptedOnOpen == ["r-killed"])
        #expect(try await catalog.run("r-killed")?.state == .interrupted)
        let groups = try await catalog.groups(GroupFilter(runID: "r-killed"))
        #expect(groups.count > 5, "the writer wrote too little to make the test meaningful")
        #expect(groups.allSatisfy { $0.disks.map(\.diskID) == ["root", "data"] }, "a group without all its disks: a torn transaction")
    }
}
