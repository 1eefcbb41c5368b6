import Foundation
import QuiesceCore

/// A piece of a run's work that one engine does whole: an instance, or every member
/// of a consistency group (they freeze together, so one engine must hold all their agents).
public struct WorkUnit: Sendable, Hashable, Codable {
    /// The unit's name in the run: the instance id, or `group:NAME`.
    public var key: String
    public var members: [String]
    /// Fleet-file order: units are handed out in it.
    public var position: Int

    public init(key: String, members: [String], position: Int) {
        self.key = key
        self.members = members
        self.position = position
    }
}

/// A unit handed to this engine.
public struct WorkClaim: Sendable, Hashable {
    public var unit: WorkUnit
    /// Members another run holds (instance → that run's id): they are not backed up by this one.
    public var busy: [String: String]
    /// The engine whose lease on this unit ran out (it died or stalled mid-unit): this is a take-over,
    /// and the run's idempotency tokens adopt whatever that engine already made (invariant 7).
    public var takenOverFrom: String?

    public init(unit: WorkUnit, busy: [String: String] = [:], takenOverFrom: String? = nil) {
        self.unit = unit
        self.busy = busy
        self.takenOverFrom = takenOverFrom
    }
}

/// Where a shared run stands.
public struct WorkProgress: Sendable, Hashable {
    /// Units no engine holds: never claimed, or claimed by an engine whose lease ran out.
    public var open: Int
    /// Units an engine with a live lease is doing.
    public var held: Int
    public var done: Int
    /// Other engines in the run with a live lease that still have work they can do.
    public var othersWorking: Int

    public init(open: Int, held: Int, done: Int, othersWorking: Int) {
        self.open = open
        self.held = held
        self.done = done
        self.othersWorking = othersWorking
    }

    public var finished: Bool { self.open == 0 && self.held == 0 }
}

/// How this engine came to a run.
public enum RunEntry: Sendable, Hashable {
    /// A new run.
    case started
    /// A run that had ended (interrupted, failed): taken up again.
    case resumed
    /// A run other engines are running now: this engine takes its share of the work.
    case joined(engines: [String])
}

/// A catalog several engines share (PostgreSQL): runs are held by expiring leases rather than
/// a process id, and a run's work is handed out unit by unit (`FOR UPDATE SKIP LOCKED`), so
/// engines backing up one fleet never do an instance twice, and an engine that dies mid-run
/// leaves its units to the others once its lease runs out. An instance is in one run at a time
/// across every engine.
public protocol SharedCatalog: CatalogStore {
    /// This engine in the catalog: `host:pid:start`.
    var engineID: String { get }
    /// How long a claim outlives its engine's last renewal.
    var lease: Duration { get }

    /// Starts the run, takes it up again, or joins it where other engines run it.
    func enterRun(_ run: RunRecord) async throws -> RunEntry
    /// Adds the run's units (those already there are kept as they are; with `reopen`, units that
    /// ended are handed out again — a resume).
    func enqueue(runID: String, units: [WorkUnit], reopen: Bool) async throws
    /// The next open unit whose members all have agents here (`serving`), or any open unit
    /// when `serving` is nil (nobody else can do it); nil when none.
    func claim(runID: String, serving: Set<String>?) async throws -> WorkClaim?
    /// The unit is done (its members' outcomes are recorded); its instances are free for other runs.
    func complete(runID: String, unit: String) async throws
    /// Says whether this engine has work it can do in the run (others wait for a working engine
    /// before giving its agents' units up as agentless).
    func setWorking(runID: String, _ working: Bool) async throws
    func progress(runID: String) async throws -> WorkProgress
    /// Extends every lease this engine holds (runs, units, instances).
    func renewLeases() async throws
    /// This engine is done with the run.
    func leaveRun(_ runID: String) async throws
}

extension RunState {
    /// A run's state from its instances' outcomes: what every engine that took part did.
    public init(outcomes: [InstanceRecord.State]) {
        if outcomes.contains(where: { $0 == .failed || $0 == .running || $0 == .pending }) {
            self = .failed
        } else if outcomes.contains(.downgraded) {
            self = .degraded
        } else {
            self = .succeeded
        }
    }
}
