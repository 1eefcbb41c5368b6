/// Exponential backoff with full jitter, for an agent re-dialling its engine.
///
/// Attempt `n` waits a random time in `[0, min(cap, base * 2^n)]` ("full jitter",
/// so a thousand agents that lost the same engine do not return in lockstep),
/// but never less than `floor`.
public struct Backoff: Sendable {
    public var base: Duration
    public var cap: Duration
    public var floor: Duration
    public private(set) var attempt: Int = 0

    public init(base: Duration = .milliseconds(200), cap: Duration = .seconds(30), floor: Duration = .milliseconds(50)) {
        precondition(base > .zero && cap >= base && floor <= cap, "backoff needs 0 < base <= cap and floor <= cap")
        self.base = base
        self.cap = cap
        self.floor = floor
    }

    /// The upper bound of the wait for the current attempt.
    public var currentCeiling: Duration {
        let factor = 1 << min(self.attempt, 30)
        let ceiling = self.base * factor
        return ceiling > self.cap ? self.cap : ceiling
    }

    /// The wait before the next attempt; advances the attempt counter.
    public mutating func next<G: RandomNumberGenerator>(using generator: inout G) -> Duration {
        let ceiling = self.currentCeiling
        self.attempt += 1
        let ceilingNs = ceiling.nanoseconds
        let floorNs = self.floor.nanoseconds
        let ns = Int64.random(in: 0...max(ceilingNs, 0), using: &generator)
        return .nanoseconds(max(ns, floorNs))
    }

    public mutating func next() -> Duration {
        var generator = SystemRandomNumberGenerator()
        return self.next(using: &generator)
    }

    /// Call after a session that lasted long enough to count as healthy.
    public mutating func reset() { self.attempt = 0 }
}

extension Duration {
    /// Whole nanoseconds, saturating at Int64.max.
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = self.components
        let (ns, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return ns &+ attoseconds / 1_000_000_000
    }

    /// Whole microseconds, saturating.
    public var microseconds: Int64 { self.nanoseconds / 1_000 }

    /// Whole milliseconds, saturating.
    public var milliseconds: Int64 { self.nanoseconds / 1_000_000 }

    /// Seconds as a Double, for display.
    public var timeInterval: Double { Double(self.nanoseconds) / 1e9 }
}
