import Foundation
import QuiesceCore

/// How a run ended (or that it has not).
public enum RunState: String, Sendable, Codable, CaseIterable {
    case running
    /// Every instance reached its wanted level.
    case succeeded
    /// Some downgraded, none below its minimum.
    case degraded
    /// Some instance failed.
    case failed
    /// The engine stopped (crash, kill -9) before the run finished.
    case interrupted
}

/// One fleet backup run.
public struct RunRecord: Sendable, Codable, Hashable {
    public var id: String
    public var startedAt: Date
    public var finishedAt: Date?
    public var state: RunState
    /// Where the run came from (a fleet file path, "demo", "cli").
    public var source: String
    /// The engine process that owns the run, for telling a live run from an interrupted one.
    public var enginePID: Int32
    public var engineStartTicks: UInt64

    public init(id: String, startedAt: Date = Date(), finishedAt: Date? = nil, state: RunState = .running, source: String,
                enginePID: Int32 = getpid(), engineStartTicks: UInt64 = ProcessIdentity.startTicks(of: getpid()) ?? 0) {
        self.id = id
        self.startedAt = startedAt
        self.finishedAt = finishedAt
        self.state = state
        self.source = source
        self.enginePID = enginePID
        self.engineStartTicks = engineStartTicks
    }
}

/// A reason a group got less than it wanted, or failed: a stable code and words for people.
public struct Reason: Sendable, Codable, Hashable {
    public var code: String
    public var message: String
    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    /// From "code: detail", the form reasons travel in (reports, tags); text without a colon is its own code.
    public init(parsing text: String) {
        let parts = text.split(separator: ":", maxSplits: 1)
        self.init(code: String(parts.first ?? ""), message: parts.count > 1 ? parts[1].trimmingCharacters(in: .whitespaces) : text)
    }

    /// "code: detail".
    public var text: String { "\(self.code): \(self.message)" }
}

/// One instance's snapshot group as the catalog records it.
public struct GroupRecord: Sendable, Codable, Hashable {
    public var id: String
    public var runID: String?
    public var instanceID: String
    /// The fleet's name for the provider that holds the group ("aws", "pool").
    public var provider: String
    /// Its kind ("ec2", "local").
    public var providerKind: String
    public var providerGroupID: String
    public var idempotencyToken: String
    public var wantedLevel: ConsistencyLevel
    public var achievedLevel: ConsistencyLevel
    public var reasons: [Reason]
    public var state: SnapshotState
    public var createdAt: Date
    /// Frozen window on the guest (first freeze → last thaw), microseconds.
    public var frozenUs: UInt64?
    /// The application's stall as its freeze script reported it, microseconds.
    public var applicationStallUs: UInt64?
    /// Per-step timings, e.g. ["prescript": 1200, "freeze": 300, "snapshot": 900].
    public var stepTimingsUs: [String: UInt64]
    public var tags: [String: String]
    public var disks: [DiskSnapshot]

    /// The consistency group across instances this group was taken in (its `quiesce:consistency-group` tag).
    public var consistencyGroup: String? { self.tags["quiesce:consistency-group"] }

    /// The group as retention rules see it.
    public var retentionItem: RetentionRules.Item {
        .init(id: self.id, instanceID: self.instanceID, createdAt: self.createdAt, level: self.achievedLevel, pending: self.state == .pending)
    }

    public init(id: String, runID: String?, instanceID: String, provider: String, providerGroupID: String, idempotencyToken: String,
                wantedLevel: ConsistencyLevel, achievedLevel: ConsistencyLevel, reasons: [Reason], state: SnapshotState,
                createdAt: Date, frozenUs: UInt64? = nil, applicationStallUs: UInt64? = nil, stepTimingsUs: [String: UInt64] = [:],
                tags: [String: String] = [:], disks: [DiskSnapshot], providerKind: String? = nil) {
        self.id = id
        self.providerKind = providerKind ?? provider
        self.runID = runID
        self.instanceID = instanceID
        self.provider = provider
        self.providerGroupID = providerGroupID
        self.idempotencyToken = idempotencyToken
        self.wantedLevel = wantedLevel
        self.achievedLevel = achievedLevel
        self.reasons = reasons
        self.state = state
        self.createdAt = createdAt
        self.frozenUs = frozenUs
        self.applicationStallUs = applicationStallUs
        self.stepTimingsUs = stepTimingsUs
        self.tags = tags
        self.disks = disks
    }
}

/// What happened to one instance in one run, with or without a snapshot group
/// (an agent that never connected still gets a record, with its reason).
public struct InstanceRecord: Sendable, Codable, Hashable {
    public enum State: String, Sendable, Codable, CaseIterable {
        case pending, running
        /// At the wanted level.
        case succeeded
        /// Below the wanted level, at or above the minimum.
        case downgraded
        case failed
        case skipped
    }

    public var runID: String
    public var instanceID: String
    public var state: State
    public var wantedLevel: ConsistencyLevel
    public var minimumLevel: ConsistencyLevel
    public var achievedLevel: ConsistencyLevel?
    public var reasons: [Reason]
    public var groupID: String?
    public var durationUs: UInt64?

    public init(runID: String, instanceID: String, state: State, wantedLevel: ConsistencyLevel, minimumLevel: ConsistencyLevel,
                achievedLevel: ConsistencyLevel? = nil, reasons: [Reason] = [], groupID: String? = nil, durationUs: UInt64? = nil) {
        self.runID = runID
        self.instanceID = instanceID
        self.state = state
        self.wantedLevel = wantedLevel
        self.minimumLevel = minimumLevel
        self.achievedLevel = achievedLevel
        self.reasons = reasons
        self.groupID = groupID
        self.durationUs = durationUs
    }
}

/// Which groups to list.
public struct GroupFilter: Sendable, Hashable {
    public var instanceID: String?
    public var runID: String?
    public var level: ConsistencyLevel?
    public var createdBefore: Date?
    public var createdAfter: Date?

    public init(instanceID: String? = nil, runID: String? = nil, level: ConsistencyLevel? = nil, createdBefore: Date? = nil, createdAfter: Date? = nil) {
        self.instanceID = instanceID
        self.runID = runID
        self.level = level
        self.createdBefore = createdBefore
        self.createdAfter = createdAfter
    }
}

/// Where the catalog lives: SQLite here, PostgreSQL when several engines share a fleet.
///
/// Every call is async: a store does its I/O off Swift's cooperative pool (GRDB's own
/// queues for SQLite, NIO's event loops for PostgreSQL), so an engine whose other
/// instances are frozen is never held up by the catalog (invariant 9).
public protocol CatalogStore: Sendable {
    func beginRun(_ run: RunRecord) async throws
    func finishRun(_ id: String, state: RunState, at date: Date) async throws
    func run(_ id: String) async throws -> RunRecord?
    func runs() async throws -> [RunRecord]
    /// Inserts or replaces a group (and its disks) in one transaction.
    func record(_ group: GroupRecord) async throws
    func group(_ id: String) async throws -> GroupRecord?
    /// Newest first.
    func groups(_ filter: GroupFilter) async throws -> [GroupRecord]
    func deleteGroup(_ id: String) async throws
    /// Inserts or replaces one instance's outcome in a run.
    func record(_ instance: InstanceRecord) async throws
    /// The instances of a run, by id.
    func instances(ofRun runID: String) async throws -> [InstanceRecord]
    /// Remembers how a fleet provider was configured (never its secrets), so that
    /// `quiesce snapshots|restore|prune|verify` reach its groups without the fleet file.
    func recordProvider(_ provider: ProviderRecord) async throws
    func providers() async throws -> [ProviderRecord]
}

extension CatalogStore {
    /// Several groups; a store that can writes them in one transaction.
    public func record(_ groups: [GroupRecord]) async throws {
        for group in groups { try await self.record(group) }
    }

    public func recordProvider(_ provider: ProviderRecord) async throws {}
    public func providers() async throws -> [ProviderRecord] { [] }
}

/// A fleet provider as the catalog remembers it: name, kind and the settings
/// that locate it (a pool's path; a region, a profile name, an endpoint). Credentials are never among them.
public struct ProviderRecord: Sendable, Codable, Hashable {
    public var name: String
    public var kind: String
    public var settings: [String: String]
    public var updatedAt: Date

    public init(name: String, kind: String, settings: [String: String], updatedAt: Date = Date()) {
        self.name = name
        self.kind = kind
        self.settings = settings
        self.updatedAt = updatedAt
    }
}

/// Identifies a process across pid reuse: its start time in clock ticks since boot.
public enum ProcessIdentity {
    public static func startTicks(of pid: Int32) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // Fields after the command name: state is field 3, starttime is field 22.
        let fields = text[text.index(after: close)...].split(separator: " ")
        return fields.count > 19 ? UInt64(fields[19]) : nil
    }

    public static func isAlive(pid: Int32, startTicks: UInt64) -> Bool {
        guard let ticks = self.startTicks(of: pid) else { return false }
        return ticks == startTicks
    }
}
