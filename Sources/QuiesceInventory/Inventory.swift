import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceLocalProvider

/// Snapshot groups as an operator works with them: what the catalog recorded,
/// checked against and acted on through the provider that holds them.
public struct Inventory: Sendable {
    public let catalog: any CatalogStore
    public let provider: LocalProvider

    public init(catalog: any CatalogStore, provider: LocalProvider) {
        self.catalog = catalog
        self.provider = provider
    }

    public func groups(_ filter: GroupFilter) throws -> [GroupRecord] { try self.catalog.groups(filter) }

    public func group(_ id: String) throws -> GroupRecord {
        guard let group = try self.catalog.group(id) else {
            throw InventoryError.notFound("no snapshot group \"\(id)\" in the catalog (see `quiesce snapshots`)")
        }
        return group
    }

    /// Restores every disk of a group (or one), as new disks named `<disk>-<suffix>` or in place.
    public func restore(_ id: String, disk: String?, inPlace: Bool, newSuffix: String) async throws -> [(disk: String, restoredAs: String)] {
        let group = try self.group(id)
        let disks = try disk.map { name -> [String] in
            guard group.disks.contains(where: { $0.diskID == name }) else {
                throw InventoryError.notFound("group \(id) has no disk \"\(name)\"; it has \(group.disks.map(\.diskID).joined(separator: ", "))")
            }
            return [name]
        } ?? group.disks.map(\.diskID)
        var restored: [(String, String)] = []
        for name in disks {
            let target: RestoreTarget = inPlace ? .inPlace : .newDisk("\(name)-\(newSuffix)")
            restored.append((name, try await self.provider.restore(group.providerGroupID, disk: name, to: target)))
        }
        return restored
    }

    /// Deletes what `policy` does not keep (provider first, then the catalog row).
    public func prune(_ policy: PrunePolicy, instanceID: String? = nil, dryRun: Bool, now: Date = Date()) async throws
        -> (keep: [GroupRecord], delete: [GroupRecord])
    {
        let plan = policy.plan(try self.catalog.groups(GroupFilter(instanceID: instanceID)), now: now)
        guard !dryRun else { return plan }
        for group in plan.delete {
            do {
                try await self.provider.delete(group.providerGroupID)
            } catch ProviderError.notFound {
                // Already gone from the pool: drop the record too.
            }
            try self.catalog.deleteGroup(group.id)
        }
        return plan
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
        let group = try self.group(id)
        let sums: [(disk: String, recorded: String?, actual: String)]
        do {
            sums = try await self.provider.verify(group.providerGroupID)
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
                let path = self.provider.snapshotPath(group: group.providerGroupID, disk: disk.diskID)
                let provider = self.provider
                checks.append(try await DedicatedThread.run(name: "quiesce-fsck") {
                    try FilesystemCheck.check(snapshot: path, scratch: provider.pool + "/.verify", disk: disk.diskID)
                })
            } else {
                checks.append(DiskCheck(disk: disk.diskID, outcome: .ok, filesystem: nil, detail: "sha256 \(sum.actual)"))
            }
        }
        return checks
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
