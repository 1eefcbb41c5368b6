import Foundation
import Logging
import NIOSSL
import PostgresNIO
import QuiesceCatalog
import QuiesceCore

/// The catalog several engines share: PostgreSQL through postgres-nio.
///
/// Runs are held by leases that expire (`now()` on the server, so engines' clocks do not
/// matter) instead of a process id; each engine renews its leases while it runs. A run's
/// work is a queue of units handed out with `FOR UPDATE SKIP LOCKED`; an instance is held
/// by one run at a time (`instance_locks`), whichever engine runs it.
public final class PostgresCatalog: SharedCatalog, @unchecked Sendable {
    public let location: CatalogLocation
    public let engineID: String
    public let lease: Duration
    private let client: PostgresClient
    private let runner: Task<Void, Never>
    private let logger: Logger

    /// Opens (and migrates) the catalog at `location`; fails with the server's reason.
    public static func open(_ location: CatalogLocation, lease: Duration = .seconds(30), engineID: String = PostgresCatalog.thisEngine()) async throws
        -> PostgresCatalog
    {
        // One direct connection first: a server that is down or refuses this user says so at
        // once (the pool would keep retrying it for a minute).
        do {
            let probe = try await PostgresConnection.connect(configuration: try location.connectionConfiguration(), id: 0, logger: Self.quiet)
            try await probe.close()
        } catch let error as CatalogError {
            throw error
        } catch {
            throw CatalogError.unusable(path: location.description, detail: PostgresCatalog.explain(error))
        }
        let catalog = try PostgresCatalog(location: location, lease: lease, engineID: engineID)
        do {
            try await catalog.migrate()
        } catch {
            await catalog.close()
            throw CatalogError.unusable(path: location.description, detail: PostgresCatalog.explain(error))
        }
        return catalog
    }

    static let quiet: Logger = {
        var logger = Logger(label: "quiesce.catalog.postgres")
        logger.logLevel = .critical
        return logger
    }()

    public static func thisEngine() -> String {
        let pid = getpid()
        return "\(ProcessInfo.processInfo.hostName):\(pid):\(ProcessIdentity.startTicks(of: pid) ?? 0)"
    }

    private init(location: CatalogLocation, lease: Duration, engineID: String) throws {
        self.location = location
        self.lease = lease
        self.engineID = engineID
        var configuration: PostgresClient.Configuration
        if let socket = location.socketDirectory {
            configuration = .init(unixSocketPath: socket + "/.s.PGSQL.\(location.port)", username: location.user,
                                  password: try location.password(), database: location.database)
        } else {
            configuration = .init(host: location.host, port: location.port, username: location.user, password: try location.password(),
                                  database: location.database, tls: location.requireTLS ? .require(.makeClientConfiguration()) : .disable)
        }
        // Every connection works in the catalog's schema.
        configuration.options.additionalStartupParameters = [("search_path", location.schema), ("application_name", "quiesce")]
        configuration.options.maximumConnections = 8
        configuration.options.connectTimeout = .seconds(10)
        self.logger = Self.quiet
        let client = PostgresClient(configuration: configuration, backgroundLogger: Self.quiet)
        self.client = client
        self.runner = Task { await client.run() }
    }

    /// Drops the catalog's schema and everything in it (tests; decommissioning a catalog).
    public func destroy() async throws {
        try await self.query("DROP SCHEMA IF EXISTS \(unescaped: Self.quoted(self.location.schema)) CASCADE")
    }

    public func close() async {
        self.runner.cancel()
        await self.runner.value
    }

    /// postgres-nio's errors say little in their description; the server's message is in them.
    static func explain(_ error: any Error) -> String {
        if let error = error as? PSQLError {
            if let message = error.serverInfo?[.message] {
                let code = error.serverInfo?[.sqlState].map { " (SQLSTATE \($0))" } ?? ""
                return message + code
            }
            if let underlying = error.underlying {
                if let io = underlying as? IOError { return io.description }
                return "\(underlying)"
            }
            return "\(error.code)"
        }
        return "\(error)"
    }

    // MARK: schema

    static let migrations: [String] = [
        """
        CREATE TABLE runs (
          id TEXT PRIMARY KEY,
          started_at TIMESTAMPTZ NOT NULL,
          finished_at TIMESTAMPTZ,
          state TEXT NOT NULL,
          source TEXT NOT NULL,
          engine_pid INTEGER NOT NULL,
          engine_start_ticks BIGINT NOT NULL,
          engine_id TEXT NOT NULL
        );
        CREATE TABLE snapshot_groups (
          id TEXT PRIMARY KEY,
          run_id TEXT REFERENCES runs(id),
          instance_id TEXT NOT NULL,
          provider TEXT NOT NULL,
          provider_kind TEXT NOT NULL,
          provider_group_id TEXT NOT NULL,
          idempotency_token TEXT NOT NULL UNIQUE,
          wanted_level TEXT NOT NULL,
          achieved_level TEXT NOT NULL,
          reasons TEXT NOT NULL,
          state TEXT NOT NULL,
          created_at TIMESTAMPTZ NOT NULL,
          frozen_us BIGINT,
          application_stall_us BIGINT,
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
          size_bytes BIGINT NOT NULL,
          data_bytes BIGINT NOT NULL,
          method TEXT NOT NULL,
          duration_us BIGINT NOT NULL,
          sha256 TEXT,
          PRIMARY KEY (group_id, disk_id)
        );
        CREATE TABLE instances (
          run_id TEXT NOT NULL REFERENCES runs(id),
          instance_id TEXT NOT NULL,
          state TEXT NOT NULL,
          wanted_level TEXT NOT NULL,
          minimum_level TEXT NOT NULL,
          achieved_level TEXT,
          reasons TEXT NOT NULL,
          group_id TEXT,
          duration_us BIGINT,
          PRIMARY KEY (run_id, instance_id)
        );
        CREATE TABLE providers (
          name TEXT PRIMARY KEY,
          kind TEXT NOT NULL,
          settings TEXT NOT NULL,
          updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE run_engines (
          run_id TEXT NOT NULL REFERENCES runs(id),
          engine_id TEXT NOT NULL,
          state TEXT NOT NULL,
          lease_expires_at TIMESTAMPTZ NOT NULL,
          PRIMARY KEY (run_id, engine_id)
        );
        CREATE TABLE run_units (
          run_id TEXT NOT NULL REFERENCES runs(id),
          unit_key TEXT NOT NULL,
          members TEXT[] NOT NULL,
          position INTEGER NOT NULL,
          state TEXT NOT NULL,
          engine_id TEXT,
          lease_expires_at TIMESTAMPTZ,
          claims INTEGER NOT NULL DEFAULT 0,
          PRIMARY KEY (run_id, unit_key)
        );
        CREATE INDEX run_units_open ON run_units(run_id, state, position);
        CREATE TABLE instance_locks (
          instance_id TEXT PRIMARY KEY,
          run_id TEXT NOT NULL,
          engine_id TEXT NOT NULL,
          lease_expires_at TIMESTAMPTZ NOT NULL
        );
        """,
    ]

    /// Creates the schema and applies what is missing, under an advisory lock so that engines
    /// starting together do not race.
    func migrate() async throws {
        try await self.client.withTransaction(logger: self.logger) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(7291032)", logger: self.logger)
            try await connection.query("CREATE SCHEMA IF NOT EXISTS \(unescaped: Self.quoted(self.location.schema))", logger: self.logger)
            try await connection.query("CREATE TABLE IF NOT EXISTS quiesce_schema (version INTEGER NOT NULL)", logger: self.logger)
            var version = 0
            for try await value in try await connection.query("SELECT max(version) FROM quiesce_schema", logger: self.logger).decode(Int?.self) {
                version = value ?? 0
            }
            guard version <= Self.migrations.count else {
                throw CatalogError.corrupt("schema version \(version) is newer than this quiesce knows (\(Self.migrations.count)): upgrade quiesce")
            }
            for (index, migration) in Self.migrations.enumerated().dropFirst(version) {
                for statement in migration.split(separator: ";").map({ $0.trimmingCharacters(in: .whitespacesAndNewlines) }) where !statement.isEmpty {
                    try await connection.query(PostgresQuery(unsafeSQL: statement), logger: self.logger)
                }
                try await connection.query("INSERT INTO quiesce_schema (version) VALUES (\(index + 1))", logger: self.logger)
            }
        }
    }

    static func quoted(_ identifier: String) -> String { "\"" + identifier.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }

    // MARK: plumbing

    private func query(_ query: PostgresQuery) async throws -> PostgresRowSequence {
        do {
            return try await self.client.query(query, logger: self.logger)
        } catch {
            throw Self.mapped(error)
        }
    }

    private func transaction<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        do {
            return try await self.client.withTransaction(logger: self.logger) { connection in try await body(connection) }
        } catch let error as CatalogError {
            throw error
        } catch {
            throw Self.mapped(error)
        }
    }

    static func mapped(_ error: any Error) -> any Error {
        if error is CatalogError { return error }
        if let error = error as? PSQLError, let state = error.serverInfo?[.sqlState], state.hasPrefix("23") {
            return CatalogError.conflict(Self.explain(error))
        }
        return CatalogError.unusable(path: "postgresql", detail: Self.explain(error))
    }

    private func rows(_ query: PostgresQuery) async throws -> [PostgresRow] {
        var rows: [PostgresRow] = []
        do {
            for try await row in try await self.client.query(query, logger: self.logger) { rows.append(row) }
        } catch {
            throw Self.mapped(error)
        }
        return rows
    }

    private static func rows(_ query: PostgresQuery, on connection: PostgresConnection, _ logger: Logger) async throws -> [PostgresRow] {
        var rows: [PostgresRow] = []
        for try await row in try await connection.query(query, logger: logger) { rows.append(row) }
        return rows
    }

    private var leaseSeconds: Double { Double(self.lease.components.seconds) + Double(self.lease.components.attoseconds) / 1e18 }

    // MARK: runs

    public func beginRun(_ run: RunRecord) async throws {
        switch try await self.enterRun(run) {
        case .started, .resumed: return
        case .joined(let engines):
            try await self.leaveRun(run.id)
            throw CatalogError.conflict("run \(run.id) is running in another engine (\(engines.joined(separator: ", ")))")
        }
    }

    public func enterRun(_ run: RunRecord) async throws -> RunEntry {
        let me = self.engineID, lease = self.leaseSeconds, logger = self.logger
        return try await self.transaction { connection in
            // One engine at a time decides a run's fate.
            try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\(run.id)))", logger: logger)
            let existing = try await Self.rows("SELECT state FROM runs WHERE id = \(run.id)", on: connection, logger)
            let others = try await Self.rows("""
                SELECT engine_id FROM run_engines
                WHERE run_id = \(run.id) AND engine_id <> \(me) AND state <> 'left' AND lease_expires_at > now()
                ORDER BY engine_id
                """, on: connection, logger).map { try $0.decode(String.self) }
            let entry: RunEntry
            if existing.isEmpty {
                try await connection.query("""
                    INSERT INTO runs (id, started_at, finished_at, state, source, engine_pid, engine_start_ticks, engine_id)
                    VALUES (\(run.id), \(run.startedAt), NULL, 'running', \(run.source), \(Int(run.enginePID)), \(Int64(run.engineStartTicks)), \(me))
                    """, logger: logger)
                entry = .started
            } else if try existing[0].decode(String.self) == RunState.running.rawValue && !others.isEmpty {
                entry = .joined(engines: others)
            } else {
                try await connection.query("""
                    UPDATE runs SET state = 'running', finished_at = NULL, engine_pid = \(Int(run.enginePID)),
                      engine_start_ticks = \(Int64(run.engineStartTicks)), engine_id = \(me) WHERE id = \(run.id)
                    """, logger: logger)
                entry = .resumed
            }
            try await connection.query("""
                INSERT INTO run_engines (run_id, engine_id, state, lease_expires_at)
                VALUES (\(run.id), \(me), 'working', now() + make_interval(secs => \(lease)))
                ON CONFLICT (run_id, engine_id) DO UPDATE SET state = 'working', lease_expires_at = excluded.lease_expires_at
                """, logger: logger)
            return entry
        }
    }

    public func finishRun(_ id: String, state: RunState, at date: Date) async throws {
        let rows = try await self.rows("UPDATE runs SET state = \(state.rawValue), finished_at = \(date) WHERE id = \(id) RETURNING id")
        guard !rows.isEmpty else { throw CatalogError.notFound("no run \"\(id)\"") }
        try await self.leaveRun(id)
    }

    public func leaveRun(_ runID: String) async throws {
        try await self.query("UPDATE run_engines SET state = 'left' WHERE run_id = \(runID) AND engine_id = \(self.engineID)")
    }

    /// A run is live while some engine in it holds a lease; one whose engines all stopped renewing is interrupted.
    public func run(_ id: String) async throws -> RunRecord? {
        try await self.settleInterrupted()
        return try await self.rows("SELECT id, started_at, finished_at, state, source, engine_pid, engine_start_ticks FROM runs WHERE id = \(id)")
            .first.map(Self.runRecord)
    }

    public func runs() async throws -> [RunRecord] {
        try await self.settleInterrupted()
        return try await self.rows("SELECT id, started_at, finished_at, state, source, engine_pid, engine_start_ticks FROM runs ORDER BY started_at DESC")
            .map(Self.runRecord)
    }

    /// Marks interrupted the runs no engine holds a live lease on any more.
    @discardableResult
    func settleInterrupted() async throws -> [String] {
        try await self.rows("""
            UPDATE runs SET state = 'interrupted', finished_at = now()
            WHERE state = 'running' AND NOT EXISTS (
              SELECT 1 FROM run_engines e WHERE e.run_id = runs.id AND e.state <> 'left' AND e.lease_expires_at > now())
            RETURNING id
            """).map { try $0.decode(String.self) }
    }

    static func runRecord(_ row: PostgresRow) throws -> RunRecord {
        let (id, started, finished, state, source, pid, ticks) = try row.decode((String, Date, Date?, String, String, Int, Int64).self)
        return RunRecord(id: id, startedAt: started, finishedAt: finished, state: RunState(rawValue: state) ?? .interrupted, source: source,
                         enginePID: Int32(truncatingIfNeeded: pid), engineStartTicks: UInt64(max(0, ticks)))
    }

    // MARK: work

    public func enqueue(runID: String, units: [WorkUnit], reopen: Bool) async throws {
        let logger = self.logger
        try await self.transaction { connection in
            for unit in units {
                try await connection.query("""
                    INSERT INTO run_units (run_id, unit_key, members, position, state) VALUES (\(runID), \(unit.key), \(unit.members), \(unit.position), 'open')
                    ON CONFLICT (run_id, unit_key) DO UPDATE SET state = 'open', engine_id = NULL, lease_expires_at = NULL
                    WHERE \(reopen) AND run_units.state = 'done'
                    """, logger: logger)
            }
        }
    }

    public func claim(runID: String, serving: Set<String>?) async throws -> WorkClaim? {
        let me = self.engineID, lease = self.leaseSeconds, logger = self.logger
        let anyUnit = serving == nil
        let servable = Array(serving ?? [])
        return try await self.transaction { connection -> WorkClaim? in
            let picked = try await Self.rows("""
                WITH candidate AS (
                  SELECT unit_key, engine_id AS previous, (state = 'claimed') AS expired FROM run_units
                  WHERE run_id = \(runID) AND (state = 'open' OR (state = 'claimed' AND lease_expires_at < now()))
                    AND (\(anyUnit) OR members <@ \(servable)::text[])
                  ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED)
                UPDATE run_units u SET state = 'claimed', engine_id = \(me), lease_expires_at = now() + make_interval(secs => \(lease)),
                  claims = u.claims + 1
                FROM candidate c WHERE u.run_id = \(runID) AND u.unit_key = c.unit_key
                RETURNING u.unit_key, u.members, u.position, c.previous, c.expired
                """, on: connection, logger)
            guard let row = picked.first else { return nil }
            let (key, members, position, previous, expired) = try row.decode((String, [String], Int, String?, Bool).self)
            // Hold the members for this run; another run's live hold wins.
            let held = try await Self.rows("""
                INSERT INTO instance_locks (instance_id, run_id, engine_id, lease_expires_at)
                SELECT m, \(runID), \(me), now() + make_interval(secs => \(lease)) FROM unnest(\(members)::text[]) AS m
                ON CONFLICT (instance_id) DO UPDATE SET run_id = excluded.run_id, engine_id = excluded.engine_id,
                  lease_expires_at = excluded.lease_expires_at
                WHERE instance_locks.run_id = excluded.run_id OR instance_locks.lease_expires_at < now()
                RETURNING instance_id
                """, on: connection, logger).map { try $0.decode(String.self) }
            var busy: [String: String] = [:]
            if held.count < members.count {
                for row in try await Self.rows("""
                    SELECT instance_id, run_id FROM instance_locks WHERE instance_id = ANY(\(members)::text[]) AND run_id <> \(runID)
                    """, on: connection, logger) {
                    let (instance, other) = try row.decode((String, String).self)
                    busy[instance] = other
                }
            }
            return WorkClaim(unit: WorkUnit(key: key, members: members, position: position), busy: busy,
                             takenOverFrom: expired && previous != me ? previous : nil)
        }
    }

    public func complete(runID: String, unit: String) async throws {
        let me = self.engineID, logger = self.logger
        try await self.transaction { connection in
            let members = try await Self.rows("""
                UPDATE run_units SET state = 'done', lease_expires_at = NULL WHERE run_id = \(runID) AND unit_key = \(unit) AND engine_id = \(me)
                RETURNING members
                """, on: connection, logger)
            guard let row = members.first else {
                throw CatalogError.conflict("unit \(unit) of run \(runID) is no longer held by this engine (its lease ran out and another engine took it)")
            }
            let names = try row.decode([String].self)
            try await connection.query("DELETE FROM instance_locks WHERE run_id = \(runID) AND instance_id = ANY(\(names)::text[])", logger: logger)
        }
    }

    public func setWorking(runID: String, _ working: Bool) async throws {
        try await self.query("""
            UPDATE run_engines SET state = \(working ? "working" : "idle") WHERE run_id = \(runID) AND engine_id = \(self.engineID) AND state <> 'left'
            """)
    }

    public func progress(runID: String) async throws -> WorkProgress {
        let me = self.engineID
        guard let row = try await self.rows("""
            SELECT
              count(*) FILTER (WHERE state = 'open' OR (state = 'claimed' AND lease_expires_at < now())),
              count(*) FILTER (WHERE state = 'claimed' AND lease_expires_at >= now()),
              count(*) FILTER (WHERE state = 'done'),
              (SELECT count(*) FROM run_engines e WHERE e.run_id = \(runID) AND e.engine_id <> \(me) AND e.state = 'working'
                 AND e.lease_expires_at > now())
            FROM run_units WHERE run_id = \(runID)
            """).first else { return WorkProgress(open: 0, held: 0, done: 0, othersWorking: 0) }
        let (open, held, done, others) = try row.decode((Int, Int, Int, Int).self)
        return WorkProgress(open: open, held: held, done: done, othersWorking: others)
    }

    public func renewLeases() async throws {
        let me = self.engineID, lease = self.leaseSeconds, logger = self.logger
        try await self.transaction { connection in
            try await connection.query("""
                UPDATE run_engines SET lease_expires_at = now() + make_interval(secs => \(lease)) WHERE engine_id = \(me) AND state <> 'left'
                """, logger: logger)
            try await connection.query("""
                UPDATE run_units SET lease_expires_at = now() + make_interval(secs => \(lease)) WHERE engine_id = \(me) AND state = 'claimed'
                """, logger: logger)
            try await connection.query("""
                UPDATE instance_locks SET lease_expires_at = now() + make_interval(secs => \(lease)) WHERE engine_id = \(me)
                """, logger: logger)
        }
    }

    // MARK: groups

    public func record(_ group: GroupRecord) async throws {
        try await self.record([group])
    }

    public func record(_ groups: [GroupRecord]) async throws {
        let logger = self.logger
        try await self.transaction { connection in
            for group in groups { try await Self.insert(group, connection, logger) }
        }
    }

    static func insert(_ group: GroupRecord, _ connection: PostgresConnection, _ logger: Logger) async throws {
        try await connection.query("DELETE FROM disk_snapshots WHERE group_id = \(group.id)", logger: logger)
        let reasons = try SQLiteCatalog.json(group.reasons), timings = try SQLiteCatalog.json(group.stepTimingsUs), tags = try SQLiteCatalog.json(group.tags)
        try await connection.query("""
            INSERT INTO snapshot_groups
              (id, run_id, instance_id, provider, provider_kind, provider_group_id, idempotency_token, wanted_level, achieved_level,
               reasons, state, created_at, frozen_us, application_stall_us, step_timings_us, tags)
            VALUES (\(group.id), \(group.runID), \(group.instanceID), \(group.provider), \(group.providerKind), \(group.providerGroupID),
                    \(group.idempotencyToken), \(group.wantedLevel.name), \(group.achievedLevel.name), \(reasons), \(group.state.rawValue),
                    \(group.createdAt), \(group.frozenUs.map { Int64($0) }), \(group.applicationStallUs.map { Int64($0) }), \(timings), \(tags))
            ON CONFLICT (id) DO UPDATE SET
              run_id = excluded.run_id, instance_id = excluded.instance_id, provider = excluded.provider, provider_kind = excluded.provider_kind,
              provider_group_id = excluded.provider_group_id, idempotency_token = excluded.idempotency_token,
              wanted_level = excluded.wanted_level, achieved_level = excluded.achieved_level, reasons = excluded.reasons,
              state = excluded.state, created_at = excluded.created_at, frozen_us = excluded.frozen_us,
              application_stall_us = excluded.application_stall_us, step_timings_us = excluded.step_timings_us, tags = excluded.tags
            """, logger: logger)
        for (position, disk) in group.disks.enumerated() {
            try await connection.query("""
                INSERT INTO disk_snapshots (group_id, position, disk_id, snapshot_id, size_bytes, data_bytes, method, duration_us, sha256)
                VALUES (\(group.id), \(position), \(disk.diskID), \(disk.snapshotID), \(Int64(disk.sizeBytes)), \(Int64(disk.dataBytes)),
                        \(disk.method.rawValue), \(Int64(disk.durationUs)), \(disk.sha256))
                """, logger: logger)
        }
    }

    static let groupColumns = """
        id, run_id, instance_id, provider, provider_kind, provider_group_id, idempotency_token, wanted_level, achieved_level,
        reasons, state, created_at, frozen_us, application_stall_us, step_timings_us, tags
        """

    public func group(_ id: String) async throws -> GroupRecord? {
        guard let row = try await self.rows("SELECT \(unescaped: Self.groupColumns) FROM snapshot_groups WHERE id = \(id)").first else { return nil }
        return try await self.groupRecords([row]).first
    }

    public func groups(_ filter: GroupFilter) async throws -> [GroupRecord] {
        var query: PostgresQuery = "SELECT \(unescaped: Self.groupColumns) FROM snapshot_groups WHERE TRUE"
        var text = query.sql
        var bindings = query.binds
        func add(_ clause: String, _ value: some PostgresEncodable & Sendable) throws {
            try bindings.append(value, context: .default)
            text += " AND \(clause) $\(bindings.count)"
        }
        if let id = filter.instanceID { try add("instance_id =", id) }
        if let id = filter.runID { try add("run_id =", id) }
        if let level = filter.level { try add("achieved_level =", level.name) }
        if let date = filter.createdBefore { try add("created_at <", date) }
        if let date = filter.createdAfter { try add("created_at >=", date) }
        text += " ORDER BY created_at DESC, id"
        query = PostgresQuery(unsafeSQL: text, binds: bindings)
        return try await self.groupRecords(try await self.rows(query))
    }

    private func groupRecords(_ rows: [PostgresRow]) async throws -> [GroupRecord] {
        var groups: [GroupRecord] = []
        for row in rows {
            let cells = row.makeRandomAccess()
            let id = try cells[0].decode(String.self)
            let disks = try await self.rows("""
                SELECT disk_id, snapshot_id, size_bytes, data_bytes, method, duration_us, sha256 FROM disk_snapshots WHERE group_id = \(id) ORDER BY position
                """).map { disk in
                let (diskID, snapshotID, size, data, method, duration, sha) = try disk.decode((String, String, Int64, Int64, String, Int64, String?).self)
                return DiskSnapshot(diskID: diskID, snapshotID: snapshotID, sizeBytes: UInt64(size), dataBytes: UInt64(data),
                                    method: SnapshotMethod(rawValue: method) ?? .provider, durationUs: UInt64(duration), sha256: sha)
            }
            let frozen = try cells[12].decode(Int64?.self), stall = try cells[13].decode(Int64?.self)
            groups.append(GroupRecord(
                id: id, runID: try cells[1].decode(String?.self), instanceID: try cells[2].decode(String.self), provider: try cells[3].decode(String.self),
                providerGroupID: try cells[5].decode(String.self), idempotencyToken: try cells[6].decode(String.self),
                wantedLevel: ConsistencyLevel(name: try cells[7].decode(String.self)) ?? .crash,
                achievedLevel: ConsistencyLevel(name: try cells[8].decode(String.self)) ?? .crash,
                reasons: try SQLiteCatalog.decode([Reason].self, try cells[9].decode(String.self)),
                state: SnapshotState(rawValue: try cells[10].decode(String.self)) ?? .failed, createdAt: try cells[11].decode(Date.self),
                frozenUs: frozen.map(UInt64.init), applicationStallUs: stall.map(UInt64.init),
                stepTimingsUs: try SQLiteCatalog.decode([String: UInt64].self, try cells[14].decode(String.self)),
                tags: try SQLiteCatalog.decode([String: String].self, try cells[15].decode(String.self)), disks: disks,
                providerKind: try cells[4].decode(String.self)))
        }
        return groups
    }

    public func deleteGroup(_ id: String) async throws {
        let deleted = try await self.rows("DELETE FROM snapshot_groups WHERE id = \(id) RETURNING id")
        guard !deleted.isEmpty else { throw CatalogError.notFound("no snapshot group \"\(id)\" in the catalog") }
    }

    // MARK: instances

    public func record(_ instance: InstanceRecord) async throws {
        try await self.query("""
            INSERT INTO instances (run_id, instance_id, state, wanted_level, minimum_level, achieved_level, reasons, group_id, duration_us)
            VALUES (\(instance.runID), \(instance.instanceID), \(instance.state.rawValue), \(instance.wantedLevel.name), \(instance.minimumLevel.name),
                    \(instance.achievedLevel?.name), \(try SQLiteCatalog.json(instance.reasons)), \(instance.groupID), \(instance.durationUs.map { Int64($0) }))
            ON CONFLICT (run_id, instance_id) DO UPDATE SET state = excluded.state, wanted_level = excluded.wanted_level,
              minimum_level = excluded.minimum_level, achieved_level = excluded.achieved_level, reasons = excluded.reasons,
              group_id = excluded.group_id, duration_us = excluded.duration_us
            """)
    }

    public func instances(ofRun runID: String) async throws -> [InstanceRecord] {
        try await self.rows("""
            SELECT run_id, instance_id, state, wanted_level, minimum_level, achieved_level, reasons, group_id, duration_us
            FROM instances WHERE run_id = \(runID) ORDER BY instance_id
            """).map { row in
            let (run, instance, state, wanted, minimum, achieved, reasons, group, duration) =
                try row.decode((String, String, String, String, String, String?, String, String?, Int64?).self)
            return InstanceRecord(
                runID: run, instanceID: instance, state: InstanceRecord.State(rawValue: state) ?? .failed,
                wantedLevel: ConsistencyLevel(name: wanted) ?? .crash, minimumLevel: ConsistencyLevel(name: minimum) ?? .crash,
                achievedLevel: achieved.flatMap(ConsistencyLevel.init(name:)), reasons: try SQLiteCatalog.decode([Reason].self, reasons),
                groupID: group, durationUs: duration.map(UInt64.init))
        }
    }

    // MARK: providers

    public func recordProvider(_ provider: ProviderRecord) async throws {
        try await self.query("""
            INSERT INTO providers (name, kind, settings, updated_at) VALUES (\(provider.name), \(provider.kind), \(try SQLiteCatalog.json(provider.settings)), \(provider.updatedAt))
            ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, settings = excluded.settings, updated_at = excluded.updated_at
            """)
    }

    public func providers() async throws -> [ProviderRecord] {
        try await self.rows("SELECT name, kind, settings, updated_at FROM providers ORDER BY name").map { row in
            let (name, kind, settings, updated) = try row.decode((String, String, String, Date).self)
            return ProviderRecord(name: name, kind: kind, settings: try SQLiteCatalog.decode([String: String].self, settings), updatedAt: updated)
        }
    }
}
