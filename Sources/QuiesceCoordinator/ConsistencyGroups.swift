import QuiesceCore
import QuiesceFleet

/// One consistency group's members meeting in one run. Every member runs its own plan, and meets
/// the others four times:
///
/// 1. **lease** — before anything freezes, the group's provider slots and frozen slots are taken
///    at once, for every member still in the run (so a queue at the provider never holds one
///    member frozen while another waits for its token);
/// 2. **frozen** — each member, quiesced, waits until every member is quiesced: only then does
///    any member's snapshot start;
/// 3. **snapshotted** — each member, its snapshot cut, waits until every member's is: only then
///    does any member thaw;
/// 4. **verdict** — after the thaw replies, the group's level is the lowest member's, with each
///    member's reasons, and every member records it.
///
/// Barriers 2 and 3 have a deadline (`barrier_ms`, at most half the freeze budget): a member that
/// does not arrive in time breaks the barrier, and one that leaves (refused, its plan failed, its
/// create failed) is no longer waited for; either way the others go on at once — they are never
/// left frozen waiting for it — and the group is incomplete: its members' snapshots are each what
/// they proved, but not a group.
actor GroupRendezvous {
    enum Phase: Int, CaseIterable, Sendable {
        case frozen, snapshotted

        var word: String { self == .frozen ? "quiesced" : "snapshotted" }
    }

    /// What a member brings to the verdict.
    struct MemberResult: Sendable {
        /// Its proven level, nil when it took no snapshot.
        var level: ConsistencyLevel?
        var reasons: [String]
        /// It met the others at both barriers in time (its snapshot is on the group's cut).
        var inStep: Bool
        var failed: Bool
    }

    /// The group's outcome, the same for every member.
    struct Verdict: Sendable {
        /// The lowest member's level; nil when the group is incomplete.
        var level: ConsistencyLevel?
        /// "member: code: detail" for every member's reason, and why the group is incomplete.
        var reasons: [String]
    }

    let group: FleetFile.Group
    let barrier: Duration
    /// Off only in the test that shows what the barriers are for.
    let enforced: Bool
    private let buckets: [String: TokenBucket]
    private let frozenSlots: Slots

    private var live: Set<String>
    private var leaseWaiters: [CheckedContinuation<Void, Never>] = []
    private var leaseArrived: Set<String> = []
    private var leased = 0
    private var leaseTaken = false
    /// When the lease took the frozen slots (how long the group held them, for the pacing).
    private var leasedAt: ContinuousClock.Instant?
    private var ranToEnd = 0

    private var arrived: [Phase: Set<String>] = [:]
    private var broken: [Phase: String] = [:]
    private var waiters: [Phase: [CheckedContinuation<Bool, Never>]] = [:]
    private var deadlines: [Phase: Task<Void, Never>] = [:]

    private var results: [String: MemberResult] = [:]
    private var verdictWaiters: [CheckedContinuation<Verdict, Never>] = []

    /// - Parameter buckets: each member's provider bucket.
    init(group: FleetFile.Group, buckets: [String: TokenBucket], frozenSlots: Slots, enforced: Bool = true) {
        self.group = group
        self.barrier = .milliseconds(group.barrierMs)
        self.enforced = enforced
        self.buckets = buckets
        self.frozenSlots = frozenSlots
        self.live = Set(group.members)
    }

    // MARK: 1. lease

    /// Waits until every member still in the run wants its slots, then takes them all at once
    /// (provider tokens by provider, and the run's frozen slots); the slots are the group's
    /// until every leased member has run its plan (`ran`).
    func lease(_ member: String) async {
        guard !self.leaseTaken else { return }
        self.leaseArrived.insert(member)
        if self.leaseArrived.isSuperset(of: self.live) && !self.leaseTaken {
            await self.takeLease()
            return
        }
        await withCheckedContinuation { self.leaseWaiters.append($0) }
    }

    private func takeLease() async {
        self.leaseTaken = true
        let members = self.leaseArrived
        self.leased = members.count
        var byBucket: [ObjectIdentifier: (TokenBucket, Int)] = [:]
        for member in members {
            guard let bucket = self.buckets[member] else { continue }
            byBucket[ObjectIdentifier(bucket), default: (bucket, 0)].1 += 1
        }
        for (bucket, count) in byBucket.values { await bucket.acquire(count: count) }
        await self.frozenSlots.acquire(count: members.count)
        self.leasedAt = .now
        for waiter in self.leaseWaiters { waiter.resume() }
        self.leaseWaiters = []
    }

    /// A leased member's plan has run (thawed): when all have, the frozen slots go back.
    func ran(_ member: String) async {
        self.ranToEnd += 1
        if self.ranToEnd == self.leased {
            await self.frozenSlots.release(count: self.leased, heldFor: self.leasedAt.map { .now - $0 })
        }
    }

    // MARK: 2–3. barriers

    /// Arrives at a barrier; true when every member arrived in time. A broken barrier (a member
    /// late or gone) answers false at once, to everyone, from then on.
    func arrive(_ member: String, at phase: Phase) async -> Bool {
        guard self.enforced else { return true }
        // Once the group missed its cut, no one waits at the next barrier for nothing.
        if self.broken[phase] != nil || (phase == .snapshotted && self.broken[.frozen] != nil) { return false }
        self.arrived[phase, default: []].insert(member)
        if self.arrived[phase]!.isSuperset(of: self.live) {
            self.open(phase)
            return true
        }
        if self.deadlines[phase] == nil {
            let limit = self.barrier
            self.deadlines[phase] = Task { [weak self] in
                try? await Task.sleep(for: limit)
                if !Task.isCancelled { await self?.expire(phase) }
            }
        }
        return await withCheckedContinuation { self.waiters[phase, default: []].append($0) }
    }

    private func open(_ phase: Phase) {
        self.deadlines[phase]?.cancel()
        for waiter in self.waiters[phase] ?? [] { waiter.resume(returning: true) }
        self.waiters[phase] = []
    }

    private func breakBarrier(_ phase: Phase, _ why: String) {
        guard self.broken[phase] == nil else { return }
        self.broken[phase] = why
        self.deadlines[phase]?.cancel()
        for waiter in self.waiters[phase] ?? [] { waiter.resume(returning: false) }
        self.waiters[phase] = []
    }

    private func expire(_ phase: Phase) {
        let missing = self.live.subtracting(self.arrived[phase] ?? []).sorted()
        guard !missing.isEmpty, self.broken[phase] == nil else { return }
        self.breakBarrier(phase, "\(missing.joined(separator: ", ")) not \(phase.word) within \(self.group.barrierMs) ms")
    }

    /// A member that will not reach the barriers still ahead of it (refused, its plan failed
    /// before the snapshot, its create failed): the others no longer wait for it — a barrier or
    /// a lease that only it held back opens now. The group is incomplete all the same: its
    /// result (no snapshot, failed) says so at the verdict.
    func leave(_ member: String) {
        guard self.live.remove(member) != nil else { return }
        for phase in Phase.allCases where self.broken[phase] == nil {
            if let arrived = self.arrived[phase], !arrived.isEmpty, arrived.isSuperset(of: self.live) { self.open(phase) }
        }
        if !self.leaseTaken && !self.leaseArrived.isEmpty && self.leaseArrived.isSuperset(of: self.live) {
            Task { await self.takeLeaseIfNeeded() }
        }
    }

    private func takeLeaseIfNeeded() async {
        guard !self.leaseTaken else { return }
        await self.takeLease()
    }

    // MARK: 4. verdict

    /// Posts a member's result and waits for every member's; the group's verdict.
    func verdict(_ member: String, _ result: MemberResult) async -> Verdict {
        if self.results[member] == nil { self.results[member] = result }
        if let verdict = self.decided() { return verdict }
        return await withCheckedContinuation { self.verdictWaiters.append($0) }
    }

    /// A member that ended without reaching the verdict (refused, failed before its lease) posts here.
    func finished(_ member: String, _ result: MemberResult) {
        guard self.results[member] == nil else { return }
        self.leave(member)
        self.results[member] = result
        _ = self.decided()
    }

    private func decided() -> Verdict? {
        guard self.results.count == self.group.members.count else { return nil }
        var reasons: [String] = []
        var incomplete: [String] = []
        for phase in Phase.allCases { if let why = self.broken[phase] { incomplete.append("barrier \(phase == .frozen ? "before the snapshots" : "before the thaws") broken: \(why)") } }
        for member in self.group.members {
            let result = self.results[member]!
            reasons += result.reasons.map { "\(member): \($0)" }
            if result.level == nil { incomplete.append("\(member) took no snapshot") } else if !result.inStep { incomplete.append("\(member) was not on the group's cut") }
            if result.failed { incomplete.append("\(member) failed") }
        }
        let verdict: Verdict
        if !incomplete.isEmpty {
            var seen = Set<String>()
            verdict = Verdict(level: nil, reasons: incomplete.filter { seen.insert($0).inserted } + reasons)
        } else {
            verdict = Verdict(level: self.group.members.compactMap { self.results[$0]?.level }.min(), reasons: reasons)
        }
        for waiter in self.verdictWaiters { waiter.resume(returning: verdict) }
        self.verdictWaiters = []
        return verdict
    }
}
