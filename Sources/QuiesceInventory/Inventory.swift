import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceLocalProvider
import QuiesceProviders

/// Snapshot groups as an operator works with them: what the catalog recorded,
/// checked against and acted on through the provider that holds them — each
/// group's own, found by the provider name it recorded, so one catalog may hold
/// groups of several providers (a local pool and an EC2 account, say).
public struct Inventory: Sendable {
    public let catalog: any CatalogStore
    public let providers: ProviderDirectory

    public init(catalog: any CatalogStore, providers: ProviderDirectory) {
        self.catalog = catalog
        self.providers = providers
    }

    /// Every local group in one pool.
    public init(catalog: any CatalogStore, provider: LocalProvider) async {
        self.init(catalog: catalog, providers: await ProviderDirectory(catalog: catalog, localPool: provider.pool, defaultPool: provider.pool))
    }

    /// The provider holding `group`.
    public func provider(of group: GroupRecord) throws -> any SnapshotProvider {
        try self.providers.provider(name: group.provider, kind: group.providerKind)
    }

    /// Where a restored disk is, for people: a local image's path, a cloud volume's id.
    public func location(ofRestored disk: String, group: GroupRecord) -> String {
        if let local = try? self.provider(of: group) as? LocalProvider, let path = try? local.diskPath(disk) { return path }
        return disk
    }

    public func groups(_ filter: GroupFilter) async throws -> [GroupRecord] { try await self.catalog.groups(filter) }

    public func group(_ id: String) async throws -> GroupRecord {
        guard let group = try await self.catalog.group(id) else {
            throw InventoryError.notFound("no snapshot group \"\(id)\" in the catalog (see `quiesce snapshots`)")
        }
        return group
    }

    /// Restores every disk of a group (or one), as new disks named `<disk>-<suffix>` or in place.
    public func restore(_ id: String, disk: String?, inPlace: Bool, newSuffix: String, zone: String? = nil) async throws -> [(disk: String, restoredAs: String)] {
        let group = try await self.group(id)
        let provider = try self.provider(of: group)
        let disks = try disk.map { name -> [String] in
            guard group.disks.contains(where: { $0.diskID == name }) else {
                throw InventoryError.notFound("group \(id) has no disk \"\(name)\"; it has \(group.disks.map(\.diskID).joined(separator: ", "))")
            }
            return [name]
        } ?? group.disks.map(\.diskID)
        var restored: [(String, String)] = []
        for name in disks {
            let target: RestoreTarget = inPlace ? .inPlace : .newDisk("\(name)-\(newSuffix)", zone: zone)
            restored.append((name, try await provider.restore(group.providerGroupID, disk: name, to: target)))
        }
        return restored
    }

    /// Deletes what `policy` does not keep (provider first, then the catalog row).
    public func prune(_ policy: PrunePolicy, instanceID: String? = nil, dryRun: Bool, now: Date = Date()) async throws
        -> (keep: [GroupRecord], delete: [GroupRecord])
    {
        let plan = policy.plan(try await self.catalog.groups(GroupFilter(instanceID: instanceID)), now: now)
        guard !dryRun else { return plan }
        for group in plan.delete {
            do {
                try await self.provider(of: group).delete(group.providerGroupID)
            } catch ProviderError.notFound {
                // Already gone from the pool: drop the record too.
            }
            try await self.catalog.deleteGroup(group.id)
        }
        return plan
    }

    /// A group a provider holds with Quiesce's tags but the catalog has no row for: an engine died
    /// between the provider's create and the record, or the catalog was lost.
    public struct Orphan: Sendable, Codable, Hashable {
        public var provider: String
        public var providerKind: String
        public var groupID: String
        public var runID: String
        public var instanceID: String
        /// What its level tag says; nil when the thaw's proof was never tagged (recorded crash on adoption).
        public var taggedLevel: ConsistencyLevel?
        public var createdAt: Date
        public var disks: Int
        /// "listed", "adopted", or "adopt-failed: why".
        public var action: String
    }

    /// Lists every orphan at every provider this inventory knows; with `adopt`, records each in
    /// the catalog: at the level its tag proves (the thaw reply had proved it before the engine
    /// tagged it), or crash-consistent, tagged so, when it has no level tag — nothing proves more.
    /// A run the catalog does not know is recorded too, as interrupted.
    public func reconcile(adopt: Bool, wanted: (_ policy: String) -> ConsistencyLevel? = { _ in nil }) async throws
        -> (orphans: [Orphan], unreachable: [String])
    {
        var orphans: [Orphan] = []
        var unreachable: [String] = []
        var seen = Set<String>()
        for (name, kind) in self.providers.known {
            let groups: [SnapshotGroup]
            let provider: any SnapshotProvider
            do {
                provider = try self.providers.provider(name: name, kind: kind)
                groups = try await provider.list(tags: [:])
            } catch {
                unreachable.append("\(name) (\(kind)): \(error)")
                continue
            }
            for group in groups {
                guard let runID = group.tags["quiesce:run"], let instanceID = group.tags["quiesce:instance"],
                      seen.insert(group.id).inserted, try await self.catalog.group(group.id) == nil else { continue }
                var orphan = Orphan(provider: name, providerKind: kind, groupID: group.id, runID: runID, instanceID: instanceID,
                                    taggedLevel: group.tags["quiesce:level"].flatMap(ConsistencyLevel.init(name:)),
                                    createdAt: group.createdAt, disks: group.disks.count, action: "listed")
                if adopt {
                    do {
                        try await self.adopt(group, orphan: orphan, provider: provider, wanted: group.tags["quiesce:policy"].flatMap(wanted))
                        orphan.action = "adopted"
                    } catch {
                        orphan.action = "adopt-failed: \(error)"
                    }
                }
                orphans.append(orphan)
            }
        }
        return (orphans.sorted { ($0.createdAt, $0.groupID) < ($1.createdAt, $1.groupID) }, unreachable)
    }

    private func adopt(_ group: SnapshotGroup, orphan: Orphan, provider: any SnapshotProvider, wanted: ConsistencyLevel?) async throws {
        var group = group
        let level = orphan.taggedLevel ?? .crash
        var reasons: [Reason]
        if orphan.taggedLevel != nil {
            reasons = [Reason(code: "adopted", message: "recorded by `quiesce reconcile` from the provider's level tag; the engine that made it never recorded it")]
            if let tagged = group.tags["quiesce:reason"] { reasons.insert(Reason(parsing: tagged), at: 0) }
        } else {
            reasons = [Reason(code: "adopted-unproven", message: "recorded by `quiesce reconcile`: the engine that made it died before the thaw reply's proof was recorded; recorded crash-consistent")]
            group = try await provider.tag(group.id, SnapshotGroup.levelTags(.crash, reasons: reasons.map(\.text), metadata: [:]))
        }
        if try await self.catalog.run(orphan.runID) == nil {
            try await self.catalog.beginRun(RunRecord(id: orphan.runID, startedAt: group.createdAt, finishedAt: Date(), state: .interrupted, source: "reconcile"))
            try await self.catalog.finishRun(orphan.runID, state: .interrupted, at: Date())
        }
        try await self.catalog.record(GroupRecord(
            id: group.id, runID: orphan.runID, instanceID: orphan.instanceID, provider: orphan.provider, providerGroupID: group.id,
            idempotencyToken: group.idempotencyToken.isEmpty ? "\(orphan.runID)/\(orphan.instanceID)" : group.idempotencyToken,
            wantedLevel: max(wanted ?? level, level), achievedLevel: level, reasons: reasons, state: group.state, createdAt: group.createdAt,
            tags: group.tags, disks: group.disks, providerKind: group.provider))
    }

    /// One disk's verification.
    public struct DiskCheck: Sendable, Hashable {
        public enum Outcome: String, Sendable, Hashable {
            /// Checksum matches (and, deep, the filesystem checks clean).
            case ok
            /// Deep: clean only after replaying the journal/log on a copy: crash-consistent content.
            case okAfterRecovery = "ok-after-recovery"
            case checksumMismatch = "checksum-mismatch"
            case filesystemErrors = "filesystem-errors"
            case missing
        }
        public var disk: String
        public var outcome: Outcome
        public var filesystem: String?
        public var detail: String
    }

    /// Checks each disk's checksum against the one recorded at creation; with
    /// `deep`, also checks the filesystem on a throw-away copy (read-only on the snapshot).
    public func verify(_ id: String, deep: Bool) async throws -> [DiskCheck] {
        let group = try await self.group(id)
        let found = try self.provider(of: group)
        guard let local = found as? LocalProvider else { return try await self.verifyAtProvider(group, provider: found, deep: deep) }
        let sums: [(disk: String, recorded: String?, actual: String)]
        do {
            sums = try await local.verify(group.providerGroupID)
        } catch ProviderError.notFound(let detail) {
            return group.disks.map { DiskCheck(disk: $0.diskID, outcome: .missing, filesystem: nil, detail: detail) }
        }
        var checks: [DiskCheck] = []
        for disk in group.disks {
            guard let sum = sums.first(where: { $0.disk == disk.diskID }) else {
                checks.append(DiskCheck(disk: disk.diskID, outcome: .missing, filesystem: nil, detail: "not in the provider's group"))
                continue
            }
            let expected = disk.sha256 ?? sum.recorded
            guard let expected, expected == sum.actual else {
                checks.append(DiskCheck(
                    disk: disk.diskID, outcome: .checksumMismatch, filesystem: nil,
                    detail: "expected sha256 \(expected ?? "(none recorded)"), found \(sum.actual)"))
                continue
            }
            if deep {
                let path = local.snapshotPath(group: group.providerGroupID, disk: disk.diskID)
                checks.append(try await DedicatedThread.run(name: "quiesce-fsck") {
                    try FilesystemCheck.check(snapshot: path, scratch: local.pool + "/.verify", disk: disk.diskID)
                })
            } else {
                checks.append(DiskCheck(disk: disk.diskID, outcome: .ok, filesystem: nil, detail: "sha256 \(sum.actual)"))
            }
        }
        return checks
    }
}

extension Inventory {
    /// A cloud's snapshots cannot be read here: each recorded snapshot must still exist at the
    /// provider, be the one recorded, and be usable (completed).
    func verifyAtProvider(_ group: GroupRecord, provider: any SnapshotProvider, deep: Bool) async throws -> [DiskCheck] {
        let live: SnapshotGroup
        do {
            live = try await provider.describe(group.providerGroupID)
        } catch ProviderError.notFound(let detail) {
            return group.disks.map { DiskCheck(disk: $0.diskID, outcome: .missing, filesystem: nil, detail: detail) }
        }
        let note = deep ? " (a deep check needs the data: restore it and check the volume)" : ""
        return group.disks.map { disk in
            guard let now = live.disks.first(where: { $0.diskID == disk.diskID }) else {
                return DiskCheck(disk: disk.diskID, outcome: .missing, filesystem: nil, detail: "no snapshot of \(disk.diskID) at \(provider.kind) any more")
            }
            guard now.snapshotID == disk.snapshotID else {
                return DiskCheck(disk: disk.diskID, outcome: .checksumMismatch, filesystem: nil,
                                 detail: "expected snapshot \(disk.snapshotID), found \(now.snapshotID)")
            }
            let usable = live.state == .ready
            return DiskCheck(disk: disk.diskID, outcome: usable ? .ok : .missing, filesystem: nil,
                             detail: "\(now.snapshotID) \(usable ? "completed" : live.state.rawValue) at \(provider.kind)\(note)")
        }
    }
}

public enum InventoryError: Error, CustomStringConvertible, Sendable {
    case notFound(String)
    case tool(String)

    public var description: String {
        switch self {
        case .notFound(let detail), .tool(let detail): detail
        }
    }
}
