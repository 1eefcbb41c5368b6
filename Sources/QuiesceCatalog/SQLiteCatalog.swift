import Foundation
import GRDB
import QuiesceCore

/// The embedded catalog: one SQLite file in WAL mode, migrated on open.
///
/// Opening also settles runs left `running` by an engine that is gone (a
/// crash or `kill -9`): they become `interrupted`. A run is still live only if
/// its engine process, identified by pid *and* start time, is still running.
public final class SQLiteCatalog: CatalogStore {
    public let path: String
    private let database: DatabasePool

    /// Runs marked interrupted when this catalog was opened.
    public let interruptedOnOpen: [String]

    public init(path: String) throws {
        self.path = path
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        let database: DatabasePool
        do {
            database = try DatabasePool(path: path, configuration: configuration)
            try Self.migrator.migrate(database)
        } catch {
            throw CatalogError.unusable(path: path, detail: "\(error)")
        }
        self.database = database
        self.interruptedOnOpen = try Self.settleInterruptedRuns(database)
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1: runs, groups, disks") { db in
            try db.execute(sql: """
                CREATE TABLE runs (
                  id TEXT PRIMARY KEY,
                  started_at REAL NOT NULL,
                  finished_at REAL,
                  state TEXT NOT NULL,
                  source TEXT NOT NULL,
                  engine_pid INTEGER NOT NULL,
                  engine_start_ticks INTEGER NOT NULL
                );
                CREATE TABLE snapshot_groups (
                  id TEXT PRIMARY KEY,
                  run_id TEXT REFERENCES runs(id),
                  instance_id TEXT NOT NULL,
                  provider TEXT NOT NULL,
                  provider_group_id TEXT NOT NULL,
                  idempotency_token TEXT NOT NULL UNIQUE,
                  wanted_level TEXT NOT NULL,
                  achieved_level TEXT NOT NULL,
                  reasons TEXT NOT NULL,
                  state TEXT NOT NULL,
                  created_at REAL NOT NULL,
                  frozen_us INTEGER,
                  application_stall_us INTEGER,
                  step_timings_us TEXT NOT NULL,
                  tags TEXT NOT NULL
                );
                CREATE INDEX snapshot_groups_instance ON snapshot_groups(instance_id, created_at);
                CREATE INDEX snapshot_groups_run ON snapshot_groups(run_id);
                CREATE TABLE disk_snapshots (
                  group_id TEXT NOT NULL REFERENCES snapshot_groups(id) ON DELETE CASCADE,
                  position INTEGER NOT NULL,
                  disk_id TEXT NOT NULL,
                  snapshot_id TEXT NOT NULL,
                  size_bytes INTEGER NOT NULL,
                  data_bytes INTEGER NOT NULL,
                  method TEXT NOT NULL,
                  duration_us INTEGER NOT NULL,
                  sha256 TEXT,
                  PRIMARY KEY (group_id, disk_id)
                );
                """)
        }
        migrator.registerMigration("v2: instances") { db in
            try db.execute(sql: """
                CREATE TABLE instances (
                  run_id TEXT NOT NULL REFERENCES runs(id),
                  instance_id TEXT NOT NULL,
                  state TEXT NOT NULL,
                  wanted_level TEXT NOT NULL,
                  minimum_level TEXT NOT NULL,
                  achieved_level TEXT,
                  reasons TEXT NOT NULL,
                  group_id TEXT,
                  duration_us INTEGER,
                  PRIMARY KEY (run_id, instance_id)
                );
                """)
        }
        migrator.registerMigration("v3: provider names and kinds") { db in
            // `provider` holds the fleet's provider name from now on; rows from before
            // hold the kind there, which is also the name the CLI gives a pool it opens.
            try db.execute(sql: """
                ALTER TABLE snapshot_groups ADD COLUMN provider_kind TEXT;
                UPDATE snapshot_groups SET provider_kind = provider WHERE provider_kind IS NULL;
                CREATE TABLE providers (
                  name TEXT PRIMARY KEY,
                  kind TEXT NOT NULL,
                  settings TEXT NOT NULL,
                  updated_at REAL NOT NULL
                );
                """)
        }
        return migrator
    }

    private static func settleInterruptedRuns(_ database: DatabasePool) throws -> [String] {
        try database.write { db in
            let rows = try Row.fetchAll(db, sql: "SELECT id, engine_pid, engine_start_ticks FROM runs WHERE state = 'running'")
            var settled: [String] = []
            for row in rows {
                let pid: Int32 = row["engine_pid"]
                let ticks: Int64 = row["engine_start_ticks"]
                if !ProcessIdentity.isAlive(pid: pid, startTicks: UInt64(ticks)) {
                    let id: String = row["id"]
                    try db.execute(sql: "UPDATE runs SET state = 'interrupted', finished_at = ? WHERE id = ?",
                                   arguments: [Date().timeIntervalSince1970, id])
                    settled.append(id)
                }
            }
            return settled
        }
    }

    // MARK: runs

    /// Records a new run, or takes up one that ended (a resume, a rerun of its id): it is
    /// running again, owned by this engine. A run another live engine is running is refused.
    public func beginRun(_ run: RunRecord) async throws {
        try await self.write { db in
            try db.execute(sql: """
                INSERT INTO runs (id, started_at, finished_at, state, source, engine_pid, engine_start_ticks)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET state = excluded.state, finished_at = NULL,
                  engine_pid = excluded.engine_pid, engine_start_ticks = excluded.engine_start_ticks
                WHERE runs.state != 'running'
                """, arguments: [run.id, run.startedAt.timeIntervalSince1970, run.finishedAt?.timeIntervalSince1970,
                                 run.state.rawValue, run.source, run.enginePID, Int64(run.engineStartTicks)])
            guard db.changesCount == 1 else {
                let pid = try Int.fetchOne(db, sql: "SELECT engine_pid FROM runs WHERE id = ?", arguments: [run.id]) ?? 0
                throw CatalogError.conflict("run \(run.id) is running in another engine (pid \(pid))")
            }
        }
    }

    public func finishRun(_ id: String, state: RunState, at date: Date = Date()) async throws {
        try await self.write { db in
            try db.execute(sql: "UPDATE runs SET state = ?, finished_at = ? WHERE id = ?",
                           arguments: [state.rawValue, date.timeIntervalSince1970, id])
            guard db.changesCount == 1 else { throw CatalogError.notFound("no run \"\(id)\"") }
        }
    }

    public func run(_ id: String) async throws -> RunRecord? {
        try await self.database.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM runs WHERE id = ?", arguments: [id]).map(Self.runRecord)
        }
    }

    public func runs() async throws -> [RunRecord] {
        try await self.database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM runs ORDER BY started_at DESC").map(Self.runRecord)
        }
    }

    static func runRecord(_ row: Row) -> RunRecord {
        let finished: Double? = row["finished_at"]
        let ticks: Int64 = row["engine_start_ticks"]
        return RunRecord(
            id: row["id"], startedAt: Date(timeIntervalSince1970: row["started_at"]),
            finishedAt: finished.map(Date.init(timeIntervalSince1970:)),
            state: RunState(rawValue: row["state"]) ?? .interrupted, source: row["source"],
            enginePID: row["engine_pid"], engineStartTicks: UInt64(ticks))
    }

    // MARK: groups

    public func record(_ group: GroupRecord) async throws {
        try await self.write { db in try Self.insert(group, db) }
    }

    /// Several groups in one transaction: one fsync for a run's worth of settled groups.
    public func record(_ groups: [GroupRecord]) async throws {
        try await self.write { db in
            for group in groups { try Self.insert(group, db) }
        }
    }

    static func insert(_ group: GroupRecord, _ db: Database) throws {
        try db.execute(sql: "DELETE FROM disk_snapshots WHERE group_id = ?", arguments: [group.id])
        try db.execute(sql: """
            INSERT INTO snapshot_groups
              (id, run_id, instance_id, provider, provider_group_id, idempotency_token, wanted_level, achieved_level,
               reasons, state, created_at, frozen_us, application_stall_us, step_timings_us, tags, provider_kind)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(id) DO UPDATE SET
              run_id = excluded.run_id, instance_id = excluded.instance_id, provider = excluded.provider,
              provider_group_id = excluded.provider_group_id, idempotency_token = excluded.idempotency_token,
              wanted_level = excluded.wanted_level, achieved_level = excluded.achieved_level, reasons = excluded.reasons,
              state = excluded.state, created_at = excluded.created_at, frozen_us = excluded.frozen_us,
              application_stall_us = excluded.application_stall_us, step_timings_us = excluded.step_timings_us,
              tags = excluded.tags, provider_kind = excluded.provider_kind
            """, arguments: [
                group.id, group.runID, group.instanceID, group.provider, group.providerGroupID, group.idempotencyToken,
                group.wantedLevel.name, group.achievedLevel.name, try Self.json(group.reasons), group.state.rawValue,
                group.createdAt.timeIntervalSince1970, group.frozenUs.map(Int64.init), group.applicationStallUs.map(Int64.init),
                try Self.json(group.stepTimingsUs), try Self.json(group.tags), group.providerKind,
            ])
        for (position, disk) in group.disks.enumerated() {
            try db.execute(sql: """
                INSERT INTO disk_snapshots (group_id, position, disk_id, snapshot_id, size_bytes, data_bytes, method, duration_us, sha256)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [group.id, position, disk.diskID, disk.snapshotID, Int64(disk.sizeBytes), Int64(disk.dataBytes),
                                 disk.method.rawValue, Int64(disk.durationUs), disk.sha256])
        }
    }

    public func group(_ id: String) async throws -> GroupRecord? {
        try await self.database.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM snapshot_groups WHERE id = ?", arguments: [id]).map { try Self.groupRecord($0, db) }
        }
    }

    public func groups(_ filter: GroupFilter) async throws -> [GroupRecord] {
        var clauses: [String] = []
        var arguments: StatementArguments = []
        if let id = filter.instanceID { clauses.append("instance_id = ?"); _ = arguments.append(contentsOf: [id]) }
        if let id = filter.runID { clauses.append("run_id = ?"); _ = arguments.append(contentsOf: [id]) }
        if let level = filter.level { clauses.append("achieved_level = ?"); _ = arguments.append(contentsOf: [level.name]) }
        if let date = filter.createdBefore { clauses.append("created_at < ?"); _ = arguments.append(contentsOf: [date.timeIntervalSince1970]) }
        if let date = filter.createdAfter { clauses.append("created_at >= ?"); _ = arguments.append(contentsOf: [date.timeIntervalSince1970]) }
        let whereClause = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let bound = arguments
        return try await self.database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM snapshot_groups \(whereClause) ORDER BY created_at DESC, id", arguments: bound)
                .map { try Self.groupRecord($0, db) }
        }
    }

    public func deleteGroup(_ id: String) async throws {
        try await self.write { db in
            try db.execute(sql: "DELETE FROM disk_snapshots WHERE group_id = ?", arguments: [id])
            try db.execute(sql: "DELETE FROM snapshot_groups WHERE id = ?", arguments: [id])
            guard db.changesCount == 1 else { throw CatalogError.notFound("no snapshot group \"\(id)\" in the catalog") }
        }
    }

    // MARK: instances

    public func record(_ instance: InstanceRecord) async throws {
        try await self.write { db in
            try db.execute(sql: """
                INSERT OR REPLACE INTO instances
                  (run_id, instance_id, state, wanted_level, minimum_level, achieved_level, reasons, group_id, duration_us)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [
                    instance.runID, instance.instanceID, instance.state.rawValue, instance.wantedLevel.name, instance.minimumLevel.name,
                    instance.achievedLevel?.name, try Self.json(instance.reasons), instance.groupID, instance.durationUs.map(Int64.init),
                ])
        }
    }

    public func instances(ofRun runID: String) async throws -> [InstanceRecord] {
        try await self.database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM instances WHERE run_id = ? ORDER BY instance_id", arguments: [runID]).map { row in
                let achieved: String? = row["achieved_level"], duration: Int64? = row["duration_us"]
                return InstanceRecord(
                    runID: row["run_id"], instanceID: row["instance_id"], state: InstanceRecord.State(rawValue: row["state"]) ?? .failed,
                    wantedLevel: ConsistencyLevel(name: row["wanted_level"]) ?? .crash,
                    minimumLevel: ConsistencyLevel(name: row["minimum_level"]) ?? .crash,
                    achievedLevel: achieved.flatMap(ConsistencyLevel.init(name:)), reasons: try Self.decode([Reason].self, row["reasons"]),
                    groupID: row["group_id"], durationUs: duration.map(UInt64.init))
            }
        }
    }

    static func groupRecord(_ row: Row, _ db: Database) throws -> GroupRecord {
        let id: String = row["id"]
        let disks = try Row.fetchAll(db, sql: "SELECT * FROM disk_snapshots WHERE group_id = ? ORDER BY position", arguments: [id]).map { disk in
            let size: Int64 = disk["size_bytes"], data: Int64 = disk["data_bytes"], duration: Int64 = disk["duration_us"]
            return DiskSnapshot(
                diskID: disk["disk_id"], snapshotID: disk["snapshot_id"], sizeBytes: UInt64(size), dataBytes: UInt64(data),
                method: SnapshotMethod(rawValue: disk["method"]) ?? .provider, durationUs: UInt64(duration), sha256: disk["sha256"])
        }
        let frozen: Int64? = row["frozen_us"], stall: Int64? = row["application_stall_us"]
        return GroupRecord(
            id: id, runID: row["run_id"], instanceID: row["instance_id"], provider: row["provider"],
            providerGroupID: row["provider_group_id"], idempotencyToken: row["idempotency_token"],
            wantedLevel: ConsistencyLevel(name: row["wanted_level"]) ?? .crash,
            achievedLevel: ConsistencyLevel(name: row["achieved_level"]) ?? .crash,
            reasons: try Self.decode([Reason].self, row["reasons"]), state: SnapshotState(rawValue: row["state"]) ?? .failed,
            createdAt: Date(timeIntervalSince1970: row["created_at"]), frozenUs: frozen.map(UInt64.init),
            applicationStallUs: stall.map(UInt64.init), stepTimingsUs: try Self.decode([String: UInt64].self, row["step_timings_us"]),
            tags: try Self.decode([String: String].self, row["tags"]), disks: disks, providerKind: row["provider_kind"])
    }

    // MARK: providers

    public func recordProvider(_ provider: ProviderRecord) async throws {
        try await self.write { db in
            try db.execute(sql: """
                INSERT INTO providers (name, kind, settings, updated_at) VALUES (?, ?, ?, ?)
                ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, settings = excluded.settings, updated_at = excluded.updated_at
                """, arguments: [provider.name, provider.kind, try Self.json(provider.settings), provider.updatedAt.timeIntervalSince1970])
        }
    }

    public func providers() async throws -> [ProviderRecord] {
        try await self.database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM providers ORDER BY name").map { row in
                ProviderRecord(name: row["name"], kind: row["kind"], settings: try Self.decode([String: String].self, row["settings"]),
                               updatedAt: Date(timeIntervalSince1970: row["updated_at"]))
            }
        }
    }

    // MARK: helpers

    private func write(_ body: @escaping @Sendable (Database) throws -> Void) async throws {
        do {
            try await self.database.write(body)
        } catch let error as CatalogError {
            throw error
        } catch let error as DatabaseError where error.resultCode == .SQLITE_CONSTRAINT {
            throw CatalogError.conflict(error.message ?? "\(error)")
        }
    }

    public static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    public static func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(text.utf8))
        } catch {
            throw CatalogError.corrupt("expected JSON for \(type), found \"\(text.prefix(60))\": \(error)")
        }
    }
}

public enum CatalogError: Error, CustomStringConvertible, Sendable {
    case unusable(path: String, detail: String)
    case notFound(String)
    case conflict(String)
    case corrupt(String)

    public var description: String {
        switch self {
        case .unusable(let path, let detail): "catalog \(path): cannot open: \(detail)"
        case .notFound(let detail): detail
        case .conflict(let detail): "conflict: \(detail)"
        case .corrupt(let detail): "catalog is damaged: \(detail)"
        }
    }
}
