import Foundation
import QuiesceCatalog

/// Which groups to keep: per instance, the newest `keepLast`, and every group
/// newer than `keepWithin`. A group either rule keeps is kept.
public struct PrunePolicy: Sendable, Hashable {
    public var keepLast: Int
    public var keepWithin: Duration?

    public init(keepLast: Int, keepWithin: Duration?) {
        self.keepLast = keepLast
        self.keepWithin = keepWithin
    }

    /// Splits `groups` into those to keep and those to delete, deterministically.
    public func plan(_ groups: [GroupRecord], now: Date = Date()) -> (keep: [GroupRecord], delete: [GroupRecord]) {
        let cutoff = self.keepWithin.map { now.addingTimeInterval(-Double($0.components.seconds)) }
        var keep: [GroupRecord] = []
        var delete: [GroupRecord] = []
        let byInstance = Dictionary(grouping: groups, by: \.instanceID)
        for instance in byInstance.keys.sorted() {
            let newestFirst = byInstance[instance]!.sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) }
            for (rank, group) in newestFirst.enumerated() {
                if rank < self.keepLast || (cutoff.map { group.createdAt >= $0 } ?? false) {
                    keep.append(group)
                } else {
                    delete.append(group)
                }
            }
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
