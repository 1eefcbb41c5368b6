import Foundation
import QuiesceCore

/// A provider's rate limit: `burst` creates at once, `perSecond` sustained.
/// A slot is taken *before* anything is frozen (invariant 4), so a queue at the
/// provider never lengthens a freeze.
///
/// The rate adapts to what the provider says (AIMD, as TCP does): a throttle empties
/// the bucket, and a second one within 5 s takes the rate to 85 % (at most every
/// half second); creates that go
/// through add back a twentieth of the configured rate per second of them, up to
/// the configured rate. (Halving, as TCP does, costs too much here: the rate saws
/// between the cut and the API's limit, so a deep cut leaves the API idle, and a
/// rate set right still meets a throttle now and then, when freezes of different
/// lengths bunch two creates together at the API.) A fleet file's rate
/// that is higher than what the account really has (other tools share EC2's
/// limits) then costs a few throttles, not failed instances.
public actor TokenBucket {
    public let burst: Double
    /// The configured sustained rate.
    public let configuredPerSecond: Double
    /// The rate now: the configured one, or less after throttles.
    public private(set) var perSecond: Double
    /// Throttles reported, and the lowest rate they brought it to.
    public private(set) var throttles = 0
    public private(set) var lowestPerSecond: Double
    private var tokens: Double
    private var updated: ContinuousClock.Instant
    /// Callers waiting, in order (fair: first come, first served), each for its count of tokens.
    private var queue: [(count: Double, continuation: CheckedContinuation<Void, Never>)] = []
    private var draining = false

    public init(burst: Int, perSecond: Double) {
        self.burst = Double(max(burst, 1))
        self.perSecond = max(perSecond, 0.001)
        self.configuredPerSecond = max(perSecond, 0.001)
        self.lowestPerSecond = max(perSecond, 0.001)
        self.tokens = Double(max(burst, 1))
        self.updated = .now
    }

    /// When the first and the last token were handed out (for benchmarks and logs).
    public private(set) var firstGrant: ContinuousClock.Instant?
    public private(set) var lastGrant: ContinuousClock.Instant?

    private func granted() {
        let now = ContinuousClock.now
        if self.firstGrant == nil { self.firstGrant = now }
        self.lastGrant = now
    }

    /// Waits for `count` slots and takes them together (a consistency group's members, at
    /// once: never some of them now and the rest after a wait). `count` is at most the burst.
    public func acquire(count: Int = 1) async {
        let count = min(Double(max(count, 1)), self.burst)
        self.refill()
        if self.queue.isEmpty && self.tokens >= count {
            self.tokens -= count
            self.granted()
            return
        }
        await withCheckedContinuation { continuation in
            self.queue.append((count, continuation))
            if !self.draining {
                self.draining = true
                Task { await self.drain() }
            }
        }
    }

    private func drain() async {
        while !self.queue.isEmpty {
            self.refill()
            let count = self.queue[0].count
            if self.tokens >= count {
                self.tokens -= count
                self.granted()
                self.queue.removeFirst().continuation.resume()
                continue
            }
            let wait = (count - self.tokens) / self.perSecond
            try? await Task.sleep(for: .microseconds(Int64(wait * 1_000_000) + 1))
        }
        self.draining = false
    }

    /// When the rate was last cut: the throttles of calls already on their way then say nothing new.
    private var lastCut: ContinuousClock.Instant?
    /// When the previous throttle came.
    private var lastThrottle: ContinuousClock.Instant?

    /// The provider throttled a call: spend what is in the bucket, and take the rate to 85 %
    /// (not below 1/20 of the configured one) when this is the second throttle within 5 s and
    /// the rate was not cut in the last half second. A lone throttle is noise (two creates whose
    /// freezes took different times reach the API together, at a rate set right); a burst of
    /// throttles from calls sent before a cut is one signal, as TCP cuts once per round trip.
    public func throttled() {
        self.refill()
        self.throttles += 1
        self.tokens = min(self.tokens, 0)
        let now = ContinuousClock.now
        defer { self.lastThrottle = now }
        guard let previous = self.lastThrottle, now - previous < .seconds(5) else { return }
        if let last = self.lastCut, now - last < .milliseconds(500) { return }
        self.lastCut = now
        self.perSecond = max(self.configuredPerSecond / 20, self.perSecond * 0.85)
        self.lowestPerSecond = min(self.lowestPerSecond, self.perSecond)
    }

    /// A call went through: at the current rate, a twentieth of the configured rate back per second.
    public func succeeded() {
        guard self.perSecond < self.configuredPerSecond else { return }
        self.refill()
        self.perSecond = min(self.configuredPerSecond, self.perSecond + self.configuredPerSecond / (20 * self.perSecond))
    }

    private func refill() {
        let now = ContinuousClock.now
        let elapsed = now - self.updated
        self.updated = now
        self.tokens = min(self.burst, self.tokens + elapsed.timeInterval * self.perSecond)
    }
}

/// At most `limit` holders at once, first come first served: the coordinator's
/// cap on instances quiesced at the same time (`run.max_frozen`), and on instances
/// planning at once. Waiting for a slot happens before anything is frozen, like
/// waiting for a token.
///
/// Paced (the frozen slots, `run.pace_frozen`): below the cap, only as many at once
/// as the work needs. Overlapping frozen windows buy throughput only when one window
/// at a time cannot keep up with the provider; otherwise they only share the
/// engine's cores (and its provider's API) and stretch one another. By Little's law
/// the windows in flight that keep up with arrivals are λ·W (λ: slots asked for in
/// the last second; W: how long a slot is held, a moving average); the pacing allows
/// twice that, and enough for a queue of waiters to be through within
/// ``drainWithin`` (a burst of tokens at a slow provider). Until a first slot has
/// been given back, W is unknown and one goes at a time. A consistency group that
/// needs more slots than the pacing allows goes when nothing else holds one.
public actor Slots {
    public let limit: Int
    public let paced: Bool
    /// With pacing: how soon a queue of waiters should be through.
    public static let drainWithin: Duration = .milliseconds(250)
    private var held = 0
    private var queue: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    /// With pacing: when slots were asked for in the last second, and the moving average of a hold (seconds).
    private var arrivals: [ContinuousClock.Instant] = []
    private var holdSeconds: Double?
    /// The most held at once (for benchmarks and tests).
    public private(set) var mostHeld = 0

    public init(limit: Int, paced: Bool = false) {
        self.limit = max(1, limit)
        self.paced = paced
    }

    /// How many may hold a slot at once now: the cap, or with pacing what the work needs (at least 1).
    public var allowed: Int {
        guard self.paced else { return self.limit }
        guard let hold = self.holdSeconds else { return 1 }
        let now = ContinuousClock.now
        let recent = Double(self.arrivals.count { now - $0 < .seconds(1) })
        let queued = Double(self.queue.reduce(0) { $0 + $1.count })
        let needed = max(1, (2 * recent * hold).rounded(.up), (queued * hold / Self.drainWithin.timeInterval).rounded(.up))
        return Int(min(Double(self.limit), needed))
    }

    /// Waits for `count` slots and takes them together (a consistency group's members).
    public func acquire(count: Int = 1) async {
        let count = min(max(count, 1), self.limit)
        if self.paced {
            let now = ContinuousClock.now
            self.arrivals.removeAll { now - $0 >= .seconds(1) }
            self.arrivals.append(now)
        }
        if self.queue.isEmpty && self.fits(count) {
            self.take(count)
            return
        }
        await withCheckedContinuation {
            self.queue.append((count, $0))
            self.admit()  // a longer queue may allow more at once
        }
    }

    /// Gives back `count` slots; `heldFor`: how long they were held (with pacing, what W learns from).
    public func release(count: Int = 1, heldFor: Duration? = nil) {
        self.held = max(0, self.held - min(max(count, 1), self.limit))
        if self.paced, let heldFor {
            let seconds = max(heldFor.timeInterval, 0)
            self.holdSeconds = self.holdSeconds.map { 0.7 * $0 + 0.3 * seconds } ?? seconds
        }
        self.admit()
    }

    /// Runs `body` holding a slot; the slot is released however `body` ends.
    public func holding<T: Sendable>(_ body: () async throws -> T) async rethrows -> T {
        await self.acquire()
        let began = ContinuousClock.now
        defer { self.release(heldFor: .now - began) }
        return try await body()
    }

    public var inUse: Int { self.held }
    /// Callers waiting for a slot.
    public var waiting: Int { self.queue.count }

    private func fits(_ count: Int) -> Bool { self.held == 0 || self.held + count <= self.allowed }

    private func take(_ count: Int) {
        self.held += count
        self.mostHeld = max(self.mostHeld, self.held)
    }

    /// Slots pass to the waiters in order, as long as the first one's count fits.
    private func admit() {
        while let first = self.queue.first, self.fits(first.count) {
            self.take(first.count)
            self.queue.removeFirst().continuation.resume()
        }
    }
}

/// The engine's work for frozen instances goes first. While any instance is quiescing or
/// frozen, work that no frozen instance waits for (another instance's facts and plan, its
/// arming, a thawed instance's finish, tags and record) waits to start, for at most
/// `patience`: on a busy engine it would take the cores a freeze or thaw reply needs, and
/// every millisecond it took is a millisecond longer freeze for some application. Work
/// already started is never interrupted; the patience bounds what a run can lose to it
/// when windows follow each other without a gap (a cloud's create is a slow call inside
/// each window, and the run must still move on).
public actor FrozenFirst {
    public let patience: Duration
    private var frozen = 0
    private var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    private var nextWaiter = 0
    /// Times a step waited, and how long in all (for benchmarks and tests).
    public private(set) var deferred = 0
    public private(set) var deferredFor: Duration = .zero

    public init(patience: Duration = .milliseconds(20)) { self.patience = patience }

    /// An instance begins its quiesce: until `thawed()`, the others' work yields to it.
    public func quiescing() { self.frozen += 1 }

    /// It has thawed (or never froze): when it was the last, the waiting work starts.
    public func thawed() {
        self.frozen -= 1
        guard self.frozen == 0 else { return }
        let waiting = self.waiters
        self.waiters = [:]
        for continuation in waiting.values { continuation.resume() }
    }

    /// Returns once no instance is frozen, or after `patience`, whichever comes first.
    public func yield() async {
        guard self.frozen > 0, self.patience > .zero else { return }
        let id = self.nextWaiter
        self.nextWaiter += 1
        let began = ContinuousClock.now
        let timer = Task { [patience] in
            try? await Task.sleep(for: patience)
            self.expire(id)
        }
        await withCheckedContinuation { self.waiters[id] = $0 }
        timer.cancel()
        self.deferred += 1
        self.deferredFor += .now - began
    }

    private func expire(_ id: Int) {
        self.waiters.removeValue(forKey: id)?.resume()
    }

    public var frozenNow: Int { self.frozen }
}
