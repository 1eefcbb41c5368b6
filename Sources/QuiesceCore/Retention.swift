import Foundation

/// Which snapshot groups an instance keeps (a policy's `retention`, `quiesce prune`). A group
/// any rule keeps is kept:
///
/// * `keepLast` — the newest N;
/// * `keepWithin` — every group newer than that;
/// * `daily` / `weekly` / `monthly` — the newest group of each of the last N days, ISO weeks,
///   months that have one (in `timeZone`), as restic's and borg's `forget` do.
///
/// Whatever the rules say, an instance's newest application-consistent group and every group
/// still pending at its provider are never deleted.
public struct RetentionRules: Sendable, Hashable, CustomStringConvertible {
    public var keepLast: Int
    public var keepWithin: Duration?
    public var daily: Int
    public var weekly: Int
    public var monthly: Int
    public var timeZone: TimeZone

    public init(keepLast: Int = 0, keepWithin: Duration? = nil, daily: Int = 0, weekly: Int = 0, monthly: Int = 0,
                timeZone: TimeZone = TimeZone(identifier: "UTC")!) {
        self.keepLast = keepLast
        self.keepWithin = keepWithin
        self.daily = daily
        self.weekly = weekly
        self.monthly = monthly
        self.timeZone = timeZone
    }

    /// Whether the rules keep anything by themselves (all zero keeps only the protected groups).
    public var keepsSomething: Bool { self.keepLast > 0 || self.keepWithin != nil || self.daily > 0 || self.weekly > 0 || self.monthly > 0 }

    public var description: String {
        var parts: [String] = []
        if self.keepLast > 0 { parts.append("last \(self.keepLast)") }
        if let within = self.keepWithin { parts.append("within \(within.components.seconds / 3600) h") }
        if self.daily > 0 { parts.append("\(self.daily) daily") }
        if self.weekly > 0 { parts.append("\(self.weekly) weekly") }
        if self.monthly > 0 { parts.append("\(self.monthly) monthly") }
        return parts.joined(separator: ", ")
    }

    /// One group as the rules see it.
    public struct Item: Sendable, Hashable {
        public var id: String
        public var instanceID: String
        public var createdAt: Date
        public var level: ConsistencyLevel
        public var pending: Bool

        public init(id: String, instanceID: String, createdAt: Date, level: ConsistencyLevel, pending: Bool = false) {
            self.id = id
            self.instanceID = instanceID
            self.createdAt = createdAt
            self.level = level
            self.pending = pending
        }
    }

    /// The ids to keep, and why each deleted one is not kept — deterministic, per instance.
    public func plan(_ items: [Item], now: Date = Date()) -> (keep: Set<String>, delete: [Item]) {
        var calendar = Calendar(identifier: .iso8601)
        calendar.timeZone = self.timeZone
        let cutoff = self.keepWithin.map { now.addingTimeInterval(-$0.timeInterval) }
        var keep = Set<String>()
        var delete: [Item] = []
        for (_, list) in Dictionary(grouping: items, by: \.instanceID).sorted(by: { $0.key < $1.key }) {
            let newestFirst = list.sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) }
            var kept = Set<String>()
            for item in newestFirst.prefix(self.keepLast) { kept.insert(item.id) }
            if let cutoff { for item in newestFirst where item.createdAt >= cutoff { kept.insert(item.id) } }
            // The newest of each period, for the last N periods that have a group.
            for (count, components) in [(self.daily, [Calendar.Component.year, .month, .day]), (self.weekly, [.yearForWeekOfYear, .weekOfYear]),
                                        (self.monthly, [.year, .month])] where count > 0 {
                var periods: [DateComponents] = []
                for item in newestFirst {
                    let period = calendar.dateComponents(Set(components), from: item.createdAt)
                    if periods.contains(period) { continue }
                    guard periods.count < count else { break }
                    periods.append(period)
                    kept.insert(item.id)
                }
            }
            if let newestApp = newestFirst.first(where: { $0.level == .application }) { kept.insert(newestApp.id) }
            for item in newestFirst where item.pending { kept.insert(item.id) }
            keep.formUnion(kept)
            delete += newestFirst.filter { !kept.contains($0.id) }
        }
        return (keep, delete)
    }
}

/// Parses durations as operators write them: 90s, 30m, 12h, 7d, 2w.
public func parseDuration(_ text: String) -> Duration? {
    let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800]
    guard let unit = text.last, let factor = units[unit], let value = Int64(text.dropLast()), value >= 0 else { return nil }
    return .seconds(value * factor)
}
