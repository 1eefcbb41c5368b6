import Foundation
import QuiesceCatalog
import QuiesceCore

/// `quiesce prune`'s rules: the same as a policy's `retention` (see RetentionRules).
public typealias PrunePolicy = RetentionRules

extension RetentionRules {
    /// Splits `groups` into those to keep and those to delete, deterministically.
    public func plan(_ groups: [GroupRecord], now: Date = Date()) -> (keep: [GroupRecord], delete: [GroupRecord]) {
        let (keep, _) = self.plan(groups.map(\.retentionItem), now: now)
        let newestFirst = groups.sorted { ($0.instanceID, $1.createdAt, $1.id) < ($1.instanceID, $0.createdAt, $0.id) }
        return (newestFirst.filter { keep.contains($0.id) }, newestFirst.filter { !keep.contains($0.id) })
    }
}
