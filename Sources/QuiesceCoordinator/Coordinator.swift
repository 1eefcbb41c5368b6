import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiescePluginProto
import QuiescePlugins
import QuiesceProviders
import Synchronization

/// What happened to one instance in a run.
public struct InstanceOutcome: Sendable {
    public var instanceID: String
    public var policy: String
    public var wanted: ConsistencyLevel
    public var minimum: ConsistencyLevel
    /// The level the thaw reply proved; nil when no snapshot was taken.
    public var achieved: ConsistencyLevel?
    public var state: InstanceRecord.State
    public var reasons: [String]
    public var warnings: [String]
    public var groupID: String?
    public var disks: Int
    /// The application's stall (first blocking step → last), and the filesystems' frozen window (guest clock).
    public var stall: Duration?
    public var frozen: Duration?
    /// The provider's create call, inside the frozen window (engine clock).
    public var snapshot: Duration?
    public var duration: Duration
    public var attempts: Int
    /// What the application's hold recorded under its lock (binlog position, GTID, marker), also in the group's tags.
    public var metadata: [String: String] = [:]
    /// Windows: each VSS writer's outcome ("SqlServerWriter STABLE", "Registry Writer excluded",
    /// "X FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)").
    public var vssWriters: [String] = []
    /// The consistency group across instances it was backed up in.
    public var consistencyGroup: String?
    /// Older groups of this instance its policy's retention deleted after the run.
    public var pruned: [String] = []
}

/// Progress, as it happens (for a progress bar or JSON lines).
public enum RunEvent: Sendable {
    case waitingForAgents(missing: [String], wait: Duration)
    /// The wait for agents is over: how long it took, and who is still missing (they are backed up without an agent, or fail).
    case agentsWaited(waited: Duration, arrived: Int, missing: [String])
    /// A provider's check before anything was frozen: every item, passed or not.
    case providerChecked(provider: String, kind: String, items: [ProviderCheckItem])
    /// Every freeze is over; groups still copying at their providers (their point in time
    /// fixed long ago) are waited for and their catalog rows updated.
    case settling(groups: Int)
    case instanceStarted(String)
    case instanceFinished(InstanceOutcome)
    /// A shared catalog: other engines are running this run; this one takes its share of the units.
    case joinedRun(engines: [String])
}

public struct RunReport: Sendable {
    public var runID: String
    public var instances: [InstanceOutcome]
    public var makespan: Duration
    /// How long the run waited for agents to connect before backing anything up (inside the makespan).
    public var agentWait: Duration = .zero
    /// A shared catalog: the fleet's instances other engines backed up in this run (not in `instances`).
    public var otherEngines = 0

    /// 0 every instance at its wanted level; 2 some downgraded (none below its minimum); 3 some failed.
    public var exitCode: Int32 {
        if self.instances.contains(where: { $0.state == .failed }) { return 3 }
        if self.instances.contains(where: { $0.state == .downgraded }) { return 2 }
        return 0
    }

    public var runState: RunState { RunState(outcomes: self.instances.map(\.state)) }
}

/// Runs a fleet backup: per instance, facts → plan from its plugin → a slot at
/// its provider's token bucket → quiesce → snapshot group → thaw → record. The
/// level recorded is the one the thaw reply proves (invariant 3), never the
/// planned one; instances run with bounded concurrency.
public final class Coordinator: Sendable {
    public struct Provider: Sendable {
        public var provider: any SnapshotProvider
        public var bucket: TokenBucket
        /// How the catalog remembers it (name, kind, settings), so later commands reach its groups.
        public var record: ProviderRecord?
        public init(provider: any SnapshotProvider, bucket: TokenBucket, record: ProviderRecord? = nil) {
            self.provider = provider
            self.bucket = bucket
            self.record = record
        }
    }

    let engine: Engine
    let plugins: PluginRegistry
    let providers: [String: Provider]
    let catalog: (any CatalogStore)?
    let fleet: FleetFile
    let stopping = Mutex<String?>(nil)
    /// Instances quiesced at once (`run.max_frozen`).
    public let frozenSlots: Slots
    /// Instances fetching facts and planning at once (`run.planning`): started all together,
    /// every instance's facts and plan would finish late together, the first provider slot
    /// would wait for all of them, and their CPU would stretch the freezes of the first ones.
    let planSlots: Slots
    /// While an instance is quiescing or frozen, the others' work waits (briefly) to start.
    public let frozenFirst: FrozenFirst
    struct Unsettled: Sendable {
        var providerName: String
        var groupID: String
        var timeout: Duration
        var instanceID: String
    }
    /// What each provider's one batched prepare found before the run's first freeze, by token.
    let firstPrepared = Mutex<[String: PreparedGroup]>([:])
    /// Groups recorded pending, to wait for once every freeze of the run is over.
    private let unsettled = Mutex<[Unsettled]>([])
    /// Why an instance may not start, from its provider's check before the run.
    private let checkFailures = Mutex<[String: [String]]>([:])
    /// How the coordinator waits between attempts; tests give a manual clock.
    let sleep: @Sendable (Duration) async -> Void
    /// Throttles (from prepare or create) an instance may see before it fails; they do not use up the policy's retries.
    let throttleRetries: Int
    /// Whether consistency groups' members wait for each other (always, but for the test that
    /// shows what the barriers are for).
    let groupBarriers: Bool

    public init(engine: Engine, plugins: PluginRegistry, providers: [String: Provider], catalog: (any CatalogStore)?, fleet: FleetFile,
                throttleRetries: Int = 12, groupBarriers: Bool = true, frozenFirstPatience: Duration? = nil,
                sleep: @escaping @Sendable (Duration) async -> Void = { try? await Task.sleep(for: $0) }) {
        self.groupBarriers = groupBarriers
        self.sleep = sleep
        self.throttleRetries = throttleRetries
        self.engine = engine
        self.plugins = plugins
        self.providers = providers
        self.catalog = catalog
        self.fleet = fleet
        self.frozenSlots = Slots(limit: fleet.maxFrozen, paced: fleet.paceFrozen)
        self.planSlots = Slots(limit: fleet.planning ?? fleet.defaultPlanning)
        self.frozenFirst = FrozenFirst(patience: frozenFirstPatience ?? .milliseconds(fleet.frozenFirstMs))
    }

    /// Starts no further instance; those already running finish (a freeze is never cut short
    /// from here) and the rest are reported failed with `reason`.
    public func stopStarting(reason: String) {
        self.stopping.withLock { if $0 == nil { $0 = reason } }
    }

    /// - Parameter resume: take up an interrupted (or failed) run under its id: instances it
    ///   already backed up are reported from the catalog and not run again; the rest run with
    ///   the run's idempotency tokens, so a group the provider already made is adopted, never
    ///   made twice (invariant 7). Check the run first with ``resumable(_:catalog:)``.
    public func run(runID: String, agentWait: Duration? = nil, resume: Bool = false,
                    events: @escaping @Sendable (RunEvent) -> Void = { _ in }) async -> RunReport {
        // The audit trail names this run as who asked for every command it sends (and who started it).
        let outer = AuditContext.actor
        return await AuditContext.$actor.withValue("run:\(runID)" + (outer == "engine" ? "" : " by \(outer)")) {
            await self.runBody(runID: runID, agentWait: agentWait, resume: resume, events: events)
        }
    }

    /// Why a run cannot be resumed.
    public enum ResumeRefusal: Error, CustomStringConvertible, Sendable {
        case noCatalog
        case unknown(String)
        case running(String, pid: Int32)
        case finished(String, RunState)

        public var description: String {
            switch self {
            case .noCatalog: "resuming needs the catalog the run was recorded in"
            case .unknown(let id): "no run \"\(id)\" in the catalog (see `quiesce snapshots`)"
            case .running(let id, let pid): "run \(id) is still running in the engine with pid \(pid); it cannot be resumed while it runs"
            case .finished(let id, let state): "run \(id) \(state.rawValue): every instance reached its level; nothing to resume"
            }
        }
    }

    /// The run to resume, or why not: it must be in the catalog and not running; a run that
    /// succeeded has nothing left to do. (Opening a SQLite catalog marks the runs of engines
    /// that are gone `interrupted`.)
    public static func resumable(_ runID: String, catalog: (any CatalogStore)?) async throws -> RunRecord {
        guard let catalog else { throw ResumeRefusal.noCatalog }
        guard let run = try await catalog.run(runID) else { throw ResumeRefusal.unknown(runID) }
        switch run.state {
        case .running: throw ResumeRefusal.running(runID, pid: run.enginePID)
        case .succeeded: throw ResumeRefusal.finished(runID, run.state)
        case .degraded, .failed, .interrupted: return run
        }
    }

    /// On a resume, the outcomes the run already recorded for instances it need not run again: those
    /// that succeeded or were downgraded — and for a consistency group, only when every member did.
    func alreadyDone(_ runID: String) async -> [String: InstanceOutcome] {
        guard let catalog = self.catalog else { return [:] }
        var read: [(InstanceRecord, GroupRecord?)] = []
        for row in (try? await catalog.instances(ofRun: runID)) ?? [] where row.state == .succeeded || row.state == .downgraded {
            var group: GroupRecord?
            if let id = row.groupID { group = try? await catalog.group(id) }
            read.append((row, group))
        }
        var done: [String: InstanceOutcome] = [:]
        for (row, group) in read {
            guard let instance = self.fleet.instance(named: row.instanceID), let policy = self.fleet.policy(named: instance.policy) else { continue }
            done[row.instanceID] = InstanceOutcome(
                instanceID: row.instanceID, policy: policy.name, wanted: row.wantedLevel, minimum: row.minimumLevel, achieved: row.achievedLevel,
                state: row.state, reasons: row.reasons.map(\.text),
                warnings: ["already-done: backed up by an earlier attempt of run \(runID); not run again"], groupID: row.groupID,
                disks: group?.disks.count ?? instance.disks.count, stall: group?.applicationStallUs.map { .microseconds(Int64($0)) },
                frozen: group?.frozenUs.map { .microseconds(Int64($0)) }, snapshot: nil, duration: .zero, attempts: 0,
                metadata: [:], vssWriters: [], consistencyGroup: group?.consistencyGroup)
        }
        for group in self.fleet.groups where !group.members.allSatisfy({ done[$0] != nil }) {
            for member in group.members { done[member] = nil }
        }
        return done
    }

    private func runBody(runID: String, agentWait: Duration?, resume: Bool, events: @escaping @Sendable (RunEvent) -> Void) async -> RunReport {
        let started = ContinuousClock.now
        let done = resume ? await self.alreadyDone(runID) : [:]
        let shared = self.catalog as? SharedCatalog
        let wait = agentWait ?? .seconds(self.fleet.agentWaitSeconds)
        // A consistency group starts as one unit, all its members at once, where its first member stands.
        var units: [[FleetFile.Instance]] = []
        var placed = Set<String>()
        for instance in self.fleet.instances where !placed.contains(instance.id) && done[instance.id] == nil {
            let unit = self.fleet.group(of: instance.id).map { group in group.members.compactMap { self.fleet.instance(named: $0) } } ?? [instance]
            placed.formUnion(unit.map(\.id))
            units.append(unit)
        }
        if let shared {
            return await self.runShared(shared, runID: runID, units: units, done: done, wait: wait, started: started, events: events)
        }
        let begun = await self.catalogWrite { try await $0.beginRun(RunRecord(id: runID, source: self.fleet.path)) }
        // Agents that never connect are reported, not waited on forever.
        let wanted = Set(self.fleet.instances.map(\.id)).subtracting(done.keys)
        var missing = await self.engine.registry.waitFor(wanted, timeout: .zero)
        var agentWait: Duration = .zero
        if !missing.isEmpty {
            let absent = missing.count
            events(.waitingForAgents(missing: missing.sorted(), wait: wait))
            // In slices, so that a stop (the engine shutting down) does not wait out the whole wait.
            let waitBegan = ContinuousClock.now
            let deadline = waitBegan + wait
            while !missing.isEmpty, self.stopping.withLock({ $0 == nil }), ContinuousClock.now < deadline {
                missing = await self.engine.registry.waitFor(wanted, timeout: min(.seconds(1), deadline - .now))
            }
            agentWait = .now - waitBegan
            events(.agentsWaited(waited: agentWait, arrived: absent - missing.count, missing: missing.sorted()))
        }
        await self.checkProviders(runID: runID, events: events)
        let limit = max(1, self.fleet.concurrency)
        let meanwhile = Task { await self.settleMeanwhile() }
        let rendezvous = self.rendezvous()
        let outcomes = await withTaskGroup(of: InstanceOutcome.self) { group in
            var results: [InstanceOutcome] = []
            var next = 0
            var running = 0
            func startNext() {
                guard next < units.count, running == 0 || running + units[next].count <= limit else { return }
                let unit = units[next]
                next += 1
                running += unit.count
                for instance in unit {
                    group.addTask { await self.start(instance, runID: runID, wait: wait, rendezvous: rendezvous, events: events) }
                }
            }
            while next < units.count, running == 0 || running + units[next].count <= limit { startNext() }
            for await outcome in group {
                results.append(outcome)
                running -= 1
                while next < units.count, running == 0 || running + units[next].count <= limit { startNext() }
            }
            return results
        }
        var report = RunReport(runID: runID, instances: await self.conclude(outcomes, done: done, meanwhile: meanwhile, only: nil, events: events),
                               makespan: .now - started, agentWait: agentWait)
        let state = report.runState
        let finished = await self.catalogWrite { try await $0.finishRun(runID, state: state, at: Date()) }
        // The report has no run-level warnings: a run the catalog could not record is said on every instance.
        let runErrors = [begun.map { "run \(runID) could not be recorded as started: \($0)" },
                         finished.map { "run \(runID) could not be recorded as finished: \($0)" }].compactMap { $0 }
        for index in report.instances.indices {
            report.instances[index].warnings += runErrors.map { "catalog-write-failed: " + $0 }
        }
        return report
    }

    /// After the last instance: the outcomes a resume found done join the rest, the background settling
    /// stops, the groups still copying are waited for, then each policy's retention runs (on `only` those
    /// instances, when given: a shared run prunes what this engine backed up). In fleet-file order.
    func conclude(_ outcomes: [InstanceOutcome], done: [String: InstanceOutcome], meanwhile: Task<Void, Never>, only: Set<String>?,
                  events: @escaping @Sendable (RunEvent) -> Void) async -> [InstanceOutcome] {
        var outcomes = outcomes
        for outcome in done.values {
            events(.instanceFinished(outcome))
            outcomes.append(outcome)
        }
        meanwhile.cancel()
        await meanwhile.value
        let settleWarnings = await self.settle(events: events)
        for index in outcomes.indices { outcomes[index].warnings += settleWarnings[outcomes[index].instanceID] ?? [] }
        let retention = await self.applyRetention(only: only)
        for index in outcomes.indices {
            outcomes[index].pruned = retention.pruned[outcomes[index].instanceID] ?? []
            outcomes[index].warnings += retention.warnings[outcomes[index].instanceID] ?? []
        }
        let order = Dictionary(uniqueKeysWithValues: self.fleet.instances.enumerated().map { ($1.id, $0) })
        return outcomes.sorted { order[$0.instanceID, default: 0] < order[$1.instanceID, default: 0] }
    }

    /// One instance of a unit: backed up, or reported not started when the run is stopping.
    func start(_ instance: FleetFile.Instance, runID: String, wait: Duration, rendezvous: [String: GroupRendezvous],
               events: @escaping @Sendable (RunEvent) -> Void) async -> InstanceOutcome {
        if let reason = self.stopping.withLock({ $0 }) {
            var outcome = self.notStarted(instance, reason: reason)
            await rendezvous[instance.id]?.finished(instance.id, .init(level: nil, reasons: outcome.reasons, inStep: false, failed: true))
            await self.record(&outcome, runID: runID, started: .now)
            events(.instanceFinished(outcome))
            return outcome
        }
        events(.instanceStarted(instance.id))
        let outcome = await self.backUp(instance, runID: runID, agentWait: wait, rendezvous: rendezvous[instance.id])
        events(.instanceFinished(outcome))
        return outcome
    }

    /// Waits for the groups recorded pending (a cloud still copying), each provider's all at
    /// once, and updates their catalog rows; a group still pending at its timeout stays
    /// `pending` in the catalog (`quiesce verify` looks again), with a warning on its instance.
    func settle(events: @escaping @Sendable (RunEvent) -> Void) async -> [String: [String]] {
        let waiting = self.unsettled.withLock { list in defer { list.removeAll() }; return list }
        guard !waiting.isEmpty else { return [:] }
        events(.settling(groups: waiting.count))
        return await self.settle(waiting, finally: true)
    }

    /// While instances are still being backed up: every 2 s, one look at the groups recorded
    /// pending so far; those that are ready get their rows now, the rest wait for the next look
    /// (or the end of the run). The end of the run then waits only for the last few.
    func settleMeanwhile() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(2))
            if Task.isCancelled { return }
            let waiting = self.unsettled.withLock { list in defer { list.removeAll() }; return list }
            guard !waiting.isEmpty else { continue }
            _ = await self.settle(waiting, finally: false)
        }
    }

    /// - Parameter finally: wait up to each group's timeout and say what is still pending; otherwise look
    ///   once and put whatever is not ready back on the list.
    func settle(_ waiting: [Unsettled], finally: Bool) async -> [String: [String]] {
        var warnings: [String: [String]] = [:]
        for (name, items) in Dictionary(grouping: waiting, by: \.providerName) {
            guard let provider = self.providers[name] else { continue }
            let timeout = finally ? (items.map(\.timeout).max() ?? .seconds(600)) : .zero
            let results = await provider.provider.waitUntilReady(items.map(\.groupID), timeout: timeout)
            var settled: [(Unsettled, SnapshotGroup)] = []
            for item in items {
                switch results[item.groupID] {
                case .success(let ready)?:
                    settled.append((item, ready))
                case _ where !finally:
                    self.unsettled.withLock { $0.append(item) }
                case .failure(let error)?:
                    warnings[item.instanceID, default: []].append("not-ready: \(item.groupID) is still pending at the provider: \(error)")
                case nil:
                    warnings[item.instanceID, default: []].append("not-ready: \(item.groupID): the provider did not say")
                }
            }
            // Every settled row in one transaction (one fsync, not one per group).
            let done = settled
            if !done.isEmpty, let error = await self.catalogWrite({ catalog in
                var rows: [GroupRecord] = []
                for (item, ready) in done {
                    guard var row = try await catalog.group(item.groupID) else { continue }
                    row.state = ready.state
                    // The provider's view, with the create's timing the row already has.
                    row.disks = ready.disks.map { disk in
                        var disk = disk
                        disk.durationUs = row.disks.first { $0.diskID == disk.diskID }?.durationUs ?? disk.durationUs
                        return disk
                    }
                    row.tags = ready.tags
                    rows.append(row)
                }
                try await catalog.record(rows)
            }) {
                for (item, _) in settled {
                    if finally {
                        warnings[item.instanceID, default: []].append("catalog-write-failed: the state of \(item.groupID) could not be updated: \(error)")
                    } else {
                        self.unsettled.withLock { $0.append(item) }
                    }
                }
            }
        }
        return warnings
    }

    /// Records each provider the fleet uses in the catalog, then runs its check over its
    /// instances before anything is frozen: a blocking failure of the provider itself
    /// fails all of its instances, an instance's own failure fails that instance.
    func checkProviders(runID: String, events: @escaping @Sendable (RunEvent) -> Void) async {
        for spec in self.fleet.providers {
            let instances = self.fleet.instances.filter { $0.provider == spec.name }
            guard !instances.isEmpty, let provider = self.providers[spec.name] else { continue }
            if let record = provider.record { _ = await self.catalogWrite { try await $0.recordProvider(record) } }
            let items = await provider.provider.check(instances.map(ProviderKinds.target))
            events(.providerChecked(provider: spec.name, kind: provider.provider.kind, items: items))
            let failed = items.filter { !$0.ok && $0.blocking }
            // One batched look for every instance's disks and earlier group (a cloud: a call or two
            // for the whole fleet, not one per instance); an instance it misses prepares on its own.
            let fine = instances.filter { instance in !failed.contains { $0.instanceID == nil || $0.instanceID == instance.id } }
            if !fine.isEmpty, let prepared = try? await provider.provider.prepare(
                fine.map { PrepareRequest(target: ProviderKinds.target($0), token: "\(runID)/\($0.id)") }) {
                self.firstPrepared.withLock { $0.merge(prepared) { _, new in new } }
            }
            guard !failed.isEmpty else { continue }
            self.checkFailures.withLock { failures in
                for instance in instances {
                    for item in failed where item.instanceID == nil || item.instanceID == instance.id {
                        failures[instance.id, default: []].append("provider-check: \(spec.name) \(item.item): \(item.detail); nothing was frozen")
                    }
                }
            }
        }
    }

    /// One meeting place per consistency group for this run, by member.
    func rendezvous() -> [String: GroupRendezvous] {
        var byMember: [String: GroupRendezvous] = [:]
        for group in self.fleet.groups {
            var buckets: [String: TokenBucket] = [:]
            for member in group.members {
                if let provider = self.fleet.instance(named: member).flatMap({ self.providers[$0.provider] }) { buckets[member] = provider.bucket }
            }
            let meeting = GroupRendezvous(group: group, buckets: buckets, frozenSlots: self.frozenSlots, enforced: self.groupBarriers)
            for member in group.members { byMember[member] = meeting }
        }
        return byMember
    }

    /// One instance, start to record. Never throws: every failure is an outcome with its reason.
    func backUp(_ instance: FleetFile.Instance, runID: String, agentWait: Duration, rendezvous: GroupRendezvous? = nil) async -> InstanceOutcome {
        let started = ContinuousClock.now
        var outcome = await self.attempt(instance, runID: runID, agentWait: agentWait, rendezvous: rendezvous)
        if let rendezvous {
            // Ended before the verdict (refused, failed before its lease, adopted on a resume): the others hear it now.
            // A group finished earlier with this run's token (a resume) was on the group's cut if its row says so.
            let inStep = outcome.groupID != nil && outcome.consistencyGroup == rendezvous.group.name
                && !outcome.reasons.contains { $0.hasPrefix("group-incomplete:") }
            outcome.consistencyGroup = rendezvous.group.name
            await rendezvous.finished(instance.id, .init(level: outcome.groupID == nil ? nil : outcome.achieved, reasons: outcome.reasons,
                                                         inStep: inStep, failed: outcome.state == .failed))
        }
        await self.record(&outcome, runID: runID, started: started)
        return outcome
    }

    func notStarted(_ instance: FleetFile.Instance, reason: String) -> InstanceOutcome {
        var outcome = self.emptyOutcome(instance)
        outcome.reasons = ["run-stopped: \(reason); not started"]
        return outcome
    }

    func emptyOutcome(_ instance: FleetFile.Instance) -> InstanceOutcome {
        let policy = self.fleet.policy(named: instance.policy)!
        return InstanceOutcome(
            instanceID: instance.id, policy: policy.name, wanted: policy.wanted, minimum: policy.minimum, achieved: nil, state: .failed,
            reasons: [], warnings: [], groupID: nil, disks: instance.disks.count, stall: nil, frozen: nil, snapshot: nil, duration: .zero, attempts: 0)
    }

    private func attempt(_ instance: FleetFile.Instance, runID: String, agentWait: Duration, rendezvous: GroupRendezvous?) async -> InstanceOutcome {
        let policy = self.fleet.policy(named: instance.policy)!
        var outcome = self.emptyOutcome(instance)

        guard let provider = self.providers[instance.provider] else {
            outcome.reasons.append("provider-missing: provider \(instance.provider) is not configured")
            return outcome
        }
        if let failures = self.checkFailures.withLock({ $0[instance.id] }) {
            outcome.reasons = failures
            return outcome
        }
        // Two machines claim this instance id (a cloned image, a copied key): quiescing "it" could freeze the wrong one.
        if let conflict = await self.engine.registry.conflict(for: instance.id) {
            outcome.reasons.append("identity-conflict: \(conflict.claimantAddress) claims \(instance.id), whose session is held from \(conflict.holderAddress) "
                + "(\(conflict.attempts) refused attempt\(conflict.attempts == 1 ? "" : "s")); nothing was frozen")
            return outcome
        }
        let target = ProviderKinds.target(instance)
        let readyTimeout = ProviderKinds.readyTimeout(self.fleet.provider(named: instance.provider))
        // Without an agent nothing can be quiesced; a crash-consistent snapshot (an empty
        // plan: no guest action) is still taken when the policy accepts one.
        var withoutAgent: Plan?
        if await self.engine.registry.session(for: instance.id) == nil {
            let missing = "agent-not-connected: no agent session for \(instance.id) after waiting \(agentWait.components.seconds) s"
            guard policy.minimum == .crash else {
                outcome.reasons.append(missing + "; the policy needs at least \(policy.minimum.name)")
                return outcome
            }
            withoutAgent = .with {
                $0.plugin = "none"
                $0.expected = .crash
                $0.reasons = [missing + "; snapshot taken crash-consistent"]
            }
        }
        let plugin = self.plugins.plugin(named: policy.plugin)
        if plugin == nil && withoutAgent == nil {
            outcome.reasons.append("plugin-missing: plugin \(policy.plugin) is not loaded")
            return outcome
        }
        let planPolicy: PlanPolicy
        do {
            planPolicy = try PlanPolicy.with {
                $0.name = policy.name
                $0.wanted = policy.wanted.planLevel
                $0.minimum = policy.minimum.planLevel
                $0.freezeBudgetMs = policy.freezeBudgetMs
                if let plugin { $0.options = try plugin.resolveOptions(policy.options.merging(instance.options) { $1 }) }
            }
        } catch {
            outcome.reasons.append("bad-options: \(error)")
            return outcome
        }

        var backoff = Backoff(base: .milliseconds(200), cap: .seconds(5), floor: .milliseconds(50))
        // After a throttle the bucket paces the retry; the pause only spreads the retries out.
        var throttleBackoff = Backoff(base: .milliseconds(100), cap: .seconds(1), floor: .milliseconds(20))
        var attempt = 0
        var failures = 0
        var throttles = 0
        /// After a provider error: true to try again (after a pause, nothing frozen), false to give up.
        func retry(after error: ProviderError, step: String) async -> Bool {
            if case .throttled(let after, _) = error {
                await provider.bucket.throttled()
                throttles += 1
                guard throttles <= self.throttleRetries else { return false }
                outcome.warnings.append("attempt \(attempt): provider throttled at \(step); retrying after the thaw: \(error)")
                await self.sleep(max(throttleBackoff.next(), after ?? .zero))
                return true
            }
            guard error.isRetryable, failures < policy.retries else { return false }
            failures += 1
            outcome.warnings.append("attempt \(attempt): provider \(error) at \(step); retrying after the thaw")
            await self.sleep(backoff.next())
            return true
        }
        let token = "\(runID)/\(instance.id)"
        while true {
            attempt += 1
            outcome.attempts = attempt
            // Before anything is frozen: the group's disks, and a group this token already made.
            let prepared: PreparedGroup
            do {
                if attempt == 1, let first = self.firstPrepared.withLock({ $0.removeValue(forKey: token) }) {
                    prepared = first
                } else {
                    prepared = try await provider.provider.prepare(target, token: token)
                }
            } catch let error as ProviderError {
                if await retry(after: error, step: "prepare") { continue }
                outcome.reasons = ["provider-failed: \(error); nothing was frozen"]
                return outcome
            } catch {
                outcome.reasons = ["provider-failed: \(error); nothing was frozen"]
                return outcome
            }
            outcome.disks = prepared.disks.count
            if let existing = prepared.existing {
                switch await self.adopt(existing, prepared: prepared, instance: instance, policy: policy, provider: provider, runID: runID,
                                        token: token, attempt: attempt, into: &outcome) {
                case .done: return outcome
                case .discarded: break
                }
            }
            let plan: Plan
            do {
                if let withoutAgent {
                    plan = withoutAgent
                } else {
                    await self.frozenFirst.yield()
                    plan = try await self.planSlots.holding {
                        try await plugin!.plan(facts: try await self.engine.planFacts(of: instance.id), policy: planPolicy)
                    }
                }
            } catch {
                outcome.reasons = ["plan-failed: \(error)"]
                return outcome
            }
            let created = Created()
            var tags = ["quiesce:run": runID, "quiesce:instance": instance.id, "quiesce:policy": policy.name]
            if let rendezvous { tags["quiesce:consistency-group"] = rendezvous.group.name }
            let request = CreateGroupRequest(
                disks: prepared.disks, tags: tags, idempotencyToken: token, description: "quiesce run \(runID), \(instance.id)",
                instance: target.providerInstance, excludeBoot: target.excludeBoot, excludeDisks: target.excludeDisks)
            // Whatever of the create need not happen at the point in time happens now, unfrozen.
            let armed: any ArmedCreate
            await self.frozenFirst.yield()
            do {
                armed = try await provider.provider.armCreate(request)
            } catch let error as ProviderError {
                if await retry(after: error, step: "arm") { continue }
                outcome.reasons = ["provider-failed: \(error); nothing was frozen"]
                return outcome
            } catch {
                outcome.reasons = ["provider-failed: \(error); nothing was frozen"]
                return outcome
            }
            // The provider slot first: a queue at the provider never lengthens a freeze. A consistency
            // group takes every member's slot at once, and the run's frozen slots with them.
            if let rendezvous { await rendezvous.lease(instance.id) } else { await provider.bucket.acquire() }
            let runner = PlanRunner(engine: self.engine, instanceID: instance.id, policy: planPolicy, freezeID: "\(runID)-\(attempt)")
            // A quiescing plan waits for one of the run's max_frozen slots, unfrozen, like for a token.
            let quiesces = (plan.prepare + plan.quiesce).contains { $0.blocking }
            let id = instance.id
            let run = {
                await runner.run(plan, afterQuiesce: { snapshotFollows in
                    if !snapshotFollows { await rendezvous?.leave(id) }
                }) {
                    // A group member: every member quiesced before any snapshot, every snapshot cut before any thaw.
                    if let rendezvous { created.inStep = await rendezvous.arrive(id, at: .frozen) }
                    do {
                        // Inside the frozen window: the point in time alone (the rest waits for the thaw, below).
                        try await armed.capture()
                    } catch {
                        if let error = error as? ProviderError { created.setError(error) }
                        await rendezvous?.leave(id)
                        throw error
                    }
                    if let rendezvous, !(await rendezvous.arrive(id, at: .snapshotted)) { created.inStep = false }
                }
            }
            // Counted as frozen from its quiesce to its thaw: the others' work yields to it meanwhile.
            let frozenRun = {
                await self.frozenFirst.quiescing()
                let result = await run()
                await self.frozenFirst.thawed()
                return result
            }
            var result: PlanOutcome
            if let rendezvous {
                result = await frozenRun()
                await rendezvous.ran(id)
            } else if quiesces {
                result = await self.frozenSlots.holding(frozenRun)
            } else {
                result = await run()
            }
            // Thawed: the provider makes what it captured a group, or gives back what arming took.
            if result.snapshotTaken {
                await self.frozenFirst.yield()
                let began = ContinuousClock.now
                var failure: String?
                do {
                    created.set(try await armed.finish())
                } catch {
                    if let error = error as? ProviderError { created.setError(error) }
                    failure = "\(error)"
                    result.snapshotTaken = false
                    result.failed = true
                    result.reasons.append("snapshot-failed: the provider could not finish the group it captured: \(error)")
                }
                result.steps.append(.init(phase: "record", id: "finish", action: "finish", ok: failure == nil, detail: failure ?? "",
                                          elapsed: .now - began, attempt: attempt))
                // Fault injection for the resume and reconcile tests: the engine dies between the provider's create and the record.
                if failure == nil, Self.exitAfterCreate == id { _exit(70) }
            } else {
                await armed.abandon()
            }
            if let rendezvous {
                let verdict = await rendezvous.verdict(id, .init(level: result.snapshotTaken ? result.achieved : nil, reasons: result.reasons,
                                                                 inStep: created.inStep, failed: result.failed))
                Self.apply(verdict, of: rendezvous.group, to: &result, member: id, minimum: policy.minimum)
            }
            outcome.reasons = result.reasons
            outcome.warnings += result.warnings
            outcome.stall = result.blocked
            outcome.frozen = result.frozen
            outcome.snapshot = result.steps.last { $0.phase == "snapshot" }?.elapsed
            outcome.metadata = result.metadata
            outcome.vssWriters = result.vssWriters.map { PlanRunner.writer($0).outcome }
            // Throttled or transient at the provider: thawed already (the runner thaws on any snapshot error); retry after a
            // pause. Not a group member: its others have thawed too, and one member alone again is not the group's cut.
            if !result.snapshotTaken, rendezvous == nil, let error = created.error {
                if await retry(after: error, step: "create") { continue }
            }
            if let group = created.group, result.snapshotTaken {
                await provider.bucket.succeeded()
                outcome.achieved = result.achieved
                outcome.groupID = group.id
                outcome.disks = group.disks.count
                // The provider calls after the thaw, timed like the plan's steps.
                var after: [PlanOutcome.StepRecord] = []
                func timed(_ id: String, _ call: () async throws -> Void) async -> (any Error)? {
                    let began = ContinuousClock.now
                    var failure: (any Error)?
                    do { try await call() } catch { failure = error }
                    after.append(.init(phase: "record", id: id, action: id, ok: failure == nil, detail: failure.map { "\($0)" } ?? "",
                                       elapsed: .now - began, attempt: attempt))
                    return failure
                }
                await self.frozenFirst.yield()
                // The level tag only now: the thaw reply has proved it.
                if let error = await timed("tag", {
                    created.set(try await provider.provider.tag(group.id, SnapshotGroup.levelTags(result.achieved, reasons: result.reasons, metadata: result.metadata)))
                }) {
                    outcome.warnings.append("tag-failed: the level tags of \(group.id) could not be written: \(error)")
                }
                if provider.provider.capabilities.settlesLater && created.group?.state == .pending {
                    // Recorded pending now; waited for after the run's freezes (see `settle`).
                    self.unsettled.withLock { $0.append(Unsettled(providerName: instance.provider, groupID: group.id, timeout: readyTimeout, instanceID: instance.id)) }
                } else if let error = await timed("provider-ready", { created.set(try await provider.provider.waitUntilReady(group.id, timeout: readyTimeout)) }) {
                    outcome.warnings.append("not-ready: \(group.id) is still \(group.state.rawValue) at the provider: \(error)")
                }
                outcome.state = result.failed ? .failed : (result.achieved < policy.wanted ? .downgraded : .succeeded)
                if let error = await self.recordGroup(created.group!, outcome: outcome, runID: runID, token: token, policy: policy,
                                                      providerName: instance.provider, steps: result.steps + after) {
                    outcome.warnings.append("catalog-write-failed: group \(group.id) is at the provider but not in the catalog: \(error)")
                }
            } else {
                outcome.state = .failed
            }
            return outcome
        }
    }

    /// Each policy's retention, after the run: per instance, the groups its rules do not keep are
    /// deleted at their provider, then from the catalog (never the newest application-consistent
    /// one, never one still pending). Only groups of this fleet's providers are touched.
    func applyRetention(only: Set<String>? = nil, now: Date = Date()) async -> (pruned: [String: [String]], warnings: [String: [String]]) {
        guard let catalog = self.catalog else { return ([:], [:]) }
        var pruned: [String: [String]] = [:]
        var warnings: [String: [String]] = [:]
        for instance in self.fleet.instances where only?.contains(instance.id) ?? true {
            guard let rules = self.fleet.policy(named: instance.policy)?.retention else { continue }
            let groups: [GroupRecord]
            do {
                groups = try await catalog.groups(GroupFilter(instanceID: instance.id))
            } catch {
                warnings[instance.id, default: []].append("retention-failed: the catalog could not be read: \(error)")
                continue
            }
            let ours = groups.filter { self.providers[$0.provider]?.provider.kind == $0.providerKind }
            let plan = rules.plan(ours.map(\.retentionItem), now: now)
            for item in plan.delete {
                guard let group = ours.first(where: { $0.id == item.id }), let provider = self.providers[group.provider] else { continue }
                do {
                    do {
                        try await provider.provider.delete(group.providerGroupID)
                    } catch ProviderError.notFound {
                        // Gone from the provider already: the row goes too.
                    }
                    if let error = await self.catalogWrite({ try await $0.deleteGroup(group.id) }) { throw error }
                    pruned[instance.id, default: []].append(group.id)
                } catch {
                    warnings[instance.id, default: []].append("retention-failed: group \(group.id) could not be deleted: \(error)")
                }
            }
        }
        return (pruned, warnings)
    }

    /// `QUIESCE_TEST_EXIT_AFTER_CREATE=INSTANCE`: the process exits (70) right after the provider made
    /// that instance's group, before anything is recorded or thawed — an engine killed at the worst moment,
    /// for the tests of `--resume` and `reconcile`. Unset in production.
    static let exitAfterCreate = ProcessInfo.processInfo.environment["QUIESCE_TEST_EXIT_AFTER_CREATE"]

    /// A consistency group's verdict on one member: the group's level caps the member's (with the
    /// member whose reason brought it down); an incomplete group fails every member, whose
    /// snapshot, if taken, is kept with its own proven level.
    static func apply(_ verdict: GroupRendezvous.Verdict, of group: FleetFile.Group, to result: inout PlanOutcome, member: String,
                      minimum: ConsistencyLevel) {
        guard let level = verdict.level else {
            result.failed = true
            result.reasons.append("group-incomplete: consistency group \(group.name): " + (verdict.reasons.first ?? "a member is missing"))
            return
        }
        guard level < result.achieved else { return }
        result.achieved = level
        let others = verdict.reasons.filter { !$0.hasPrefix(member + ": ") }
        result.reasons.append("group-level: consistency group \(group.name) reached \(level.name)" + (others.first.map { " (\($0))" } ?? ""))
        if level < .application { result.metadata = [:] }
        if level < minimum && !result.failed {
            result.failed = true
            result.reasons.append("below-minimum: reached \(level.name) with its group, the policy needs at least \(minimum.name)")
        }
    }

    enum Adoption { case done, discarded }

    /// A group this run's token already names (invariant 7: no duplicates). With a catalog row it
    /// was finished: its outcome is the row's. Without one, an earlier attempt made it and its
    /// record was lost: its level tag, when the thaw had proved one, is adopted; a group with no
    /// level tag made by an attempt of this same run (a reply lost in the window) or holding
    /// fewer disks than asked is deleted and made again, one from an earlier process is adopted
    /// as crash-consistent, since nothing proves more.
    func adopt(_ existing: SnapshotGroup, prepared: PreparedGroup, instance: FleetFile.Instance, policy: FleetFile.Policy,
               provider: Provider, runID: String, token: String, attempt: Int, into outcome: inout InstanceOutcome) async -> Adoption {
        let complete = Set(existing.disks.map(\.diskID)).isSuperset(of: prepared.disks)
        if let row = try? await self.catalog?.group(existing.id), complete {
            outcome.achieved = row.achievedLevel
            outcome.groupID = row.id
            outcome.reasons = row.reasons.map(\.text)
            outcome.frozen = row.frozenUs.map { .microseconds(Int64($0)) }
            outcome.stall = row.applicationStallUs.map { .microseconds(Int64($0)) }
            outcome.warnings.append("already-done: group \(row.id) was made with this run's token; nothing new was taken")
            outcome.consistencyGroup = row.consistencyGroup
            outcome.state = row.achievedLevel < policy.wanted ? .downgraded : .succeeded
            return .done
        }
        let level = existing.tags["quiesce:level"].flatMap(ConsistencyLevel.init(name:))
        if !complete || (level == nil && attempt > 1) {
            do {
                try await provider.provider.delete(existing.id)
                outcome.warnings.append("discarded: group \(existing.id) from attempt \(attempt - 1) "
                    + (complete ? "had no proven level" : "held \(existing.disks.count) of \(prepared.disks.count) disks") + "; deleted, taken again")
                return .discarded
            } catch {
                outcome.warnings.append("discard-failed: group \(existing.id) could not be deleted: \(error)")
            }
        }
        let achieved = level ?? .crash
        outcome.achieved = achieved
        outcome.groupID = existing.id
        outcome.reasons = level != nil
            ? ["adopted: group \(existing.id) was made with this run's token by an earlier attempt whose record was lost; its level is from its tags"]
            : ["adopted-unproven: group \(existing.id) was made with this run's token by an earlier process, which never recorded the level it proved; recorded crash-consistent"]
        var group = existing
        if level == nil, let tagged = try? await provider.provider.tag(existing.id, SnapshotGroup.levelTags(.crash, reasons: outcome.reasons, metadata: [:])) {
            group = tagged
        }
        if let ready = try? await provider.provider.waitUntilReady(existing.id, timeout: ProviderKinds.readyTimeout(self.fleet.provider(named: instance.provider))) {
            group = ready
        }
        outcome.state = achieved < policy.minimum ? .failed : achieved < policy.wanted ? .downgraded : .succeeded
        if let error = await self.recordGroup(group, outcome: outcome, runID: runID, token: token, policy: policy, providerName: instance.provider, steps: []) {
            outcome.warnings.append("catalog-write-failed: group \(group.id) is at the provider but not in the catalog: \(error)")
        }
        return .done
    }

    /// Writes to the catalog and says what failed, if anything. A write waits for SQLite's
    /// fsync (synchronous = FULL), which a busy disk — a backup's disk — can stretch past a
    /// second; the stores do it off the cooperative pool (GRDB's writer queue, PostgreSQL's
    /// event loop), because a few blocked pool threads (instances finishing together) would
    /// hold up the heartbeats to agents frozen meanwhile: they would thaw for engine silence.
    func catalogWrite(_ write: @escaping @Sendable (any CatalogStore) async throws -> Void) async -> (any Error)? {
        guard let catalog = self.catalog else { return nil }
        do {
            try await write(catalog)
            return nil
        } catch {
            return error
        }
    }

    func recordGroup(_ group: SnapshotGroup, outcome: InstanceOutcome, runID: String, token: String, policy: FleetFile.Policy,
                     providerName: String, steps: [PlanOutcome.StepRecord]) async -> (any Error)? {
        var timings: [String: UInt64] = [:]
        for step in steps {
            // With the agent's and the kernel's shares, for the breakdown (bench-fleet, `quiesce show`).
            for (key, time) in [(step.id, step.elapsed), (step.id + ".agent", step.agent), (step.id + ".kernel", step.kernel)] {
                if let time { timings[key, default: 0] += UInt64(max(time.microseconds, 0)) }
            }
        }
        let record = GroupRecord(
            id: group.id, runID: runID, instanceID: outcome.instanceID, provider: providerName, providerGroupID: group.id,
            idempotencyToken: token, wantedLevel: policy.wanted, achievedLevel: outcome.achieved ?? .crash,
            reasons: outcome.reasons.map(Reason.init(parsing:)), state: group.state, createdAt: group.createdAt,
            frozenUs: outcome.frozen.map { UInt64(max($0.microseconds, 0)) },
            applicationStallUs: outcome.stall.map { UInt64(max($0.microseconds, 0)) },
            stepTimingsUs: timings, tags: group.tags, disks: group.disks, providerKind: group.provider)
        return await self.catalogWrite { try await $0.record(record) }
    }

    /// Records the instance's outcome; a failed write is a warning on the outcome (the report still has it).
    func record(_ outcome: inout InstanceOutcome, runID: String, started: ContinuousClock.Instant) async {
        outcome.duration = .now - started
        let row = InstanceRecord(
            runID: runID, instanceID: outcome.instanceID, state: outcome.state, wantedLevel: outcome.wanted, minimumLevel: outcome.minimum,
            achievedLevel: outcome.achieved, reasons: outcome.reasons.map(Reason.init(parsing:)), groupID: outcome.groupID,
            durationUs: UInt64(max(outcome.duration.microseconds, 0)))
        if let error = await self.catalogWrite({ try await $0.record(row) }) {
            outcome.warnings.append("catalog-write-failed: the outcome of \(outcome.instanceID) is not in the catalog: \(error)")
        }
    }
}

/// The group the snapshot closure made (or the provider's error), handed out of the closure.
final class Created: @unchecked Sendable {
    private let lock = NSLock()
    private var _group: SnapshotGroup?
    private var _error: ProviderError?
    private var _inStep = false
    /// A consistency group's member met the others at both barriers in time.
    var inStep: Bool {
        get { self.lock.withLock { self._inStep } }
        set { self.lock.withLock { self._inStep = newValue } }
    }
    var group: SnapshotGroup? { self.lock.withLock { self._group } }
    var error: ProviderError? { self.lock.withLock { self._error } }
    func set(_ group: SnapshotGroup) { self.lock.withLock { self._group = group } }
    func setError(_ error: ProviderError) { self.lock.withLock { self._error = error } }
}
