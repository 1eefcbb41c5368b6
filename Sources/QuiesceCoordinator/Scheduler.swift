import Foundation
import Logging
import QuiesceCore
import QuiesceFleet
import Synchronization

/// Runs the fleet files' schedules inside `quiesce serve` (`--fleet FILE`, repeatable).
///
/// * A schedule fires at its cron times, in its time zone, and starts a run like
///   `quiesce backup --engine` would (through ``FleetRunService``: a run that shares an instance
///   with a run in progress is refused, the refusal logged).
/// * **No overlapping runs of one schedule**: when it fires while its previous run is still
///   going, that firing is skipped (logged and counted), not queued.
/// * **A missed schedule runs once, not N times**: the last firing of every schedule is kept in
///   a state file; an engine that starts after one or more firings were missed (it was down)
///   runs that schedule once, at once. A schedule seen for the first time does not catch up.
public final class Scheduler: Sendable {
    public struct Entry: Sendable {
        public var fleet: FleetFile
        public var schedule: FleetFile.Schedule
        /// "FILE#NAME": the state file's key.
        public var key: String { "\(self.fleet.path)#\(self.schedule.name)" }

        public init(fleet: FleetFile, schedule: FleetFile.Schedule) {
            self.fleet = fleet
            self.schedule = schedule
        }
    }

    /// What happened at one firing (for logs, tests and metrics).
    public enum Firing: Sendable, Equatable {
        case started(schedule: String, runID: String, missed: Bool)
        case skippedOverlap(schedule: String, runningRun: String)
        case refused(schedule: String, reason: String)
    }

    public let entries: [Entry]
    let runs: FleetRunService
    let statePath: String
    let logger: Logger
    let now: @Sendable () -> Date
    /// How often a sleep looks at the clock again (a clock step is noticed within it).
    let tick: Duration
    /// Called at every firing, after it was handled.
    let observe: @Sendable (Firing) -> Void
    private let active = Mutex<[String: (runID: String, task: Task<RunReport, Never>)]>([:])

    public init(fleets: [FleetFile], runs: FleetRunService, statePath: String, logger: Logger = Logger(label: "quiesce.schedules"),
                now: @escaping @Sendable () -> Date = { Date() }, tick: Duration = .seconds(1),
                observe: @escaping @Sendable (Firing) -> Void = { _ in }) {
        self.tick = tick
        self.entries = fleets.flatMap { fleet in fleet.schedules.map { Entry(fleet: fleet, schedule: $0) } }
        self.runs = runs
        self.statePath = statePath
        self.logger = logger
        self.now = now
        self.observe = observe
    }

    // MARK: - State (the last firing of each schedule)

    struct State: Codable {
        var lastFired: [String: Date] = [:]
    }

    func readState() -> State {
        guard let data = FileManager.default.contents(atPath: self.statePath) else { return State() }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do {
            return try decoder.decode(State.self, from: data)
        } catch {
            self.logger.warning("schedule state unreadable; starting fresh (no catch-up)", metadata: ["path": "\(self.statePath)", "error": "\(error)"])
            return State()
        }
    }

    func write(_ state: State) {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? encoder.encode(state) else { return }
        let temporary = self.statePath + ".tmp"
        if FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o600]) {
            _ = rename(temporary, self.statePath)
        }
    }

    func recordFired(_ key: String, at date: Date) {
        var state = self.readState()
        state.lastFired[key] = date
        self.write(state)
    }

    // MARK: - Running

    /// The next firing of every schedule after `date`, soonest first.
    public func upcoming(after date: Date) -> [(entry: Entry, at: Date)] {
        self.entries.compactMap { entry in entry.schedule.cron.next(after: date).map { (entry, $0) } }.sorted { $0.at < $1.at }
    }

    /// Until cancelled: catches up the schedules missed while the engine was down (once each),
    /// then fires each schedule at its times.
    public func run() async {
        guard !self.entries.isEmpty else { return }
        let started = self.now()
        var state = self.readState()
        for entry in self.entries {
            if let last = state.lastFired[entry.key] {
                if let due = entry.schedule.cron.next(after: last), due <= started {
                    self.logger.info("schedule missed while the engine was down: running it once now", metadata: [
                        "schedule": "\(entry.schedule.name)", "last_fired": "\(last)", "missed_firing": "\(due)"])
                    self.fire(entry, at: started, missed: true)
                }
            } else {
                // First sight: no catch-up; counted from now.
                state.lastFired[entry.key] = started
            }
        }
        self.write(state.merging(self.readState()))
        var cursor = started
        while !Task.isCancelled {
            guard let next = self.upcoming(after: cursor).first else { return }
            // Sleep in slices, so a clock step (or a test's clock) is noticed within a tick.
            while !Task.isCancelled, self.now() < next.at {
                let wait = min(next.at.timeIntervalSince(self.now()), self.tick.timeInterval)
                try? await Task.sleep(for: .milliseconds(Int64(max(wait, 0.001) * 1000)))
            }
            if Task.isCancelled { return }
            for due in self.upcoming(after: cursor) where due.at == next.at { self.fire(due.entry, at: due.at, missed: false) }
            cursor = next.at
        }
    }

    /// Starts the schedule's run, unless its previous run is still going.
    func fire(_ entry: Entry, at date: Date, missed: Bool) {
        self.recordFired(entry.key, at: date)
        let name = entry.schedule.name
        if let running = self.active.withLock({ $0[entry.key] }) {
            self.logger.warning("schedule skipped: its previous run is still going", metadata: ["schedule": "\(name)", "run": "\(running.runID)"])
            self.observe(.skippedOverlap(schedule: name, runningRun: running.runID))
            return
        }
        let runID = Self.runID(name, date)
        do {
            let task = try self.runs.startScheduled(fleet: entry.fleet.only(entry.schedule), runID: runID, schedule: name) { [weak self] _ in
                _ = self?.active.withLock { $0.removeValue(forKey: entry.key) }
            }
            self.active.withLock { $0[entry.key] = (runID, task) }
            self.logger.info("scheduled run started", metadata: ["schedule": "\(name)", "run": "\(runID)", "missed": "\(missed)"])
            self.observe(.started(schedule: name, runID: runID, missed: missed))
        } catch {
            self.logger.warning("scheduled run refused", metadata: ["schedule": "\(name)", "error": "\(error)"])
            self.observe(.refused(schedule: name, reason: "\(error)"))
        }
    }

    /// "nightly-20261207-0230": the schedule's name and the firing's time (UTC, to the minute; seconds when not on a minute).
    static func runID(_ name: String, _ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.dateFormat = date.timeIntervalSince1970.truncatingRemainder(dividingBy: 60) == 0 ? "yyyyMMdd-HHmm" : "yyyyMMdd-HHmmss"
        return String(name.prefix(44)) + "-" + formatter.string(from: date)
    }

    /// The runs the scheduler started that are still going, by schedule key.
    public var running: [String: String] { self.active.withLock { $0.mapValues(\.runID) } }
}

extension Scheduler.State {
    /// Later firings win (another writer may have recorded one meanwhile).
    func merging(_ other: Scheduler.State) -> Scheduler.State {
        var merged = self
        for (key, date) in other.lastFired where (merged.lastFired[key] ?? .distantPast) < date { merged.lastFired[key] = date }
        return merged
    }
}
