import Foundation
import Synchronization

/// What a snapshot provider can do and how fast, so the coordinator can plan
/// before anything is frozen.
public struct ProviderCapabilities: Sendable, Hashable, Codable {
    /// Most disks one group may hold.
    public var maxDisksPerGroup: Int
    /// Creates allowed in a burst, and sustained per second.
    public var createBurst: Int
    public var createsPerSecond: Double
    /// True when the point in time is fixed by the time `createGroup` returns
    /// (a local reflink); false when the cloud keeps copying after (EBS), which
    /// still fixes the point in time at the call.
    public var pointInTimeFixedOnReturn: Bool
    /// True only when the provider itself makes a multi-disk group one point
    /// in time (EBS multi-volume snapshots); false means it is one point in time
    /// only while the guest is frozen across the whole create.
    public var atomicMultiDiskGroup: Bool
    /// True when a group keeps copying for long after its point in time is fixed (EBS: minutes
    /// to hours): the coordinator records it `pending` at once and waits for it after the
    /// run's freezes, so the wait holds none of the run's concurrency. False: waited in line.
    public var settlesLater: Bool

    public init(maxDisksPerGroup: Int, createBurst: Int, createsPerSecond: Double, pointInTimeFixedOnReturn: Bool, atomicMultiDiskGroup: Bool,
                settlesLater: Bool = false) {
        self.settlesLater = settlesLater
        self.maxDisksPerGroup = maxDisksPerGroup
        self.createBurst = createBurst
        self.createsPerSecond = createsPerSecond
        self.pointInTimeFixedOnReturn = pointInTimeFixedOnReturn
        self.atomicMultiDiskGroup = atomicMultiDiskGroup
    }
}

/// A request for one point-in-time group of disk snapshots.
public struct CreateGroupRequest: Sendable, Hashable {
    /// Provider disk ids (for `local`: image names in the pool's `disks/`).
    public var disks: [String]
    public var tags: [String: String]
    /// Derived from the run and instance: a repeat with the same token returns
    /// the existing group instead of making another (invariant 7).
    public var idempotencyToken: String
    public var description: String
    /// The provider's own instance id (an EC2 instance id), when the whole
    /// instance is snapshotted as one group by the provider (EC2 CreateSnapshots,
    /// ECS CreateSnapshotGroup); `disks` then lists what it was resolved to.
    public var instance: String?
    /// With `instance`: leave its boot disk out, and these.
    public var excludeBoot: Bool
    public var excludeDisks: [String]

    public init(disks: [String], tags: [String: String] = [:], idempotencyToken: String, description: String = "", instance: String? = nil,
                excludeBoot: Bool = false, excludeDisks: [String] = []) {
        self.excludeDisks = excludeDisks
        self.disks = disks
        self.tags = tags
        self.idempotencyToken = idempotencyToken
        self.description = description
        self.instance = instance
        self.excludeBoot = excludeBoot
    }
}

/// What one fleet instance points at in its provider.
public struct ProviderTarget: Sendable, Hashable {
    /// The fleet's instance id (web-1).
    public var instanceID: String
    /// The provider's instance id (i-0abc…), when the fleet file names one.
    public var providerInstance: String?
    /// Disk ids the fleet file lists; empty with `providerInstance`: every disk attached to it.
    public var disks: [String]
    public var excludeBoot: Bool
    public var excludeDisks: [String]

    public init(instanceID: String, providerInstance: String? = nil, disks: [String], excludeBoot: Bool = false, excludeDisks: [String] = []) {
        self.instanceID = instanceID
        self.providerInstance = providerInstance
        self.disks = disks
        self.excludeBoot = excludeBoot
        self.excludeDisks = excludeDisks
    }
}

/// One line of a provider's check: what was checked, whether it passed, and
/// what is missing when it did not ("ec2:CreateSnapshots is not allowed").
public struct ProviderCheckItem: Sendable, Hashable, Codable {
    /// The fleet instance the item is about, or nil for the provider itself (credentials, permissions).
    public var instanceID: String?
    public var item: String
    public var ok: Bool
    public var detail: String
    /// False for what only some commands need (prune's delete, restore's create):
    /// a run still starts when such an item fails; `quiesce check` reports it.
    public var blocking: Bool

    public init(instanceID: String? = nil, item: String, ok: Bool, detail: String, blocking: Bool = true) {
        self.instanceID = instanceID
        self.item = item
        self.ok = ok
        self.detail = detail
        self.blocking = blocking
    }
}

/// What a provider found before a freeze: the disks the group will hold, and a
/// group an earlier attempt already made with the same token (to adopt, not duplicate).
public struct PreparedGroup: Sendable, Hashable {
    public var disks: [String]
    public var existing: SnapshotGroup?

    public init(disks: [String], existing: SnapshotGroup? = nil) {
        self.disks = disks
        self.existing = existing
    }
}

/// How a disk snapshot was made.
public enum SnapshotMethod: String, Sendable, Codable, Hashable {
    /// Shared extents (FICLONE): constant time, nothing copied.
    case reflink
    /// Data extents copied, holes kept (SEEK_DATA/SEEK_HOLE): time grows with data.
    case sparseCopy = "sparse-copy"
    /// Made by a cloud API.
    case provider
}

public enum SnapshotState: String, Sendable, Codable, Hashable {
    case pending, ready, failed
}

public struct DiskSnapshot: Sendable, Codable, Hashable {
    public var diskID: String
    public var snapshotID: String
    public var sizeBytes: UInt64
    /// Bytes actually holding data (the rest are holes).
    public var dataBytes: UInt64
    public var method: SnapshotMethod
    /// Time to take this disk's snapshot, in microseconds.
    public var durationUs: UInt64
    /// Hex SHA-256 of the snapshot's content, recorded after the group was made
    /// (never inside the freeze window); nil until then.
    public var sha256: String?

    public init(diskID: String, snapshotID: String, sizeBytes: UInt64, dataBytes: UInt64, method: SnapshotMethod, durationUs: UInt64, sha256: String? = nil) {
        self.diskID = diskID
        self.snapshotID = snapshotID
        self.sizeBytes = sizeBytes
        self.dataBytes = dataBytes
        self.method = method
        self.durationUs = durationUs
        self.sha256 = sha256
    }
}

extension SnapshotGroup {
    /// The tags that say what a group proved: Quiesce's, the seed's, and AWS's own VSS tooling's (`AppConsistent`).
    public static func levelTags(_ level: ConsistencyLevel, reasons: [String], metadata: [String: String]) -> [String: String] {
        var tags = ["quiesce:level": level.name, "ConsistencyLevel": level.tagValue, "AppConsistent": level == .application ? "true" : "false"]
        if let reason = reasons.first { tags["quiesce:reason"] = String(reason.prefix(255)) }
        for (key, value) in metadata { tags["quiesce:" + key] = value }
        return tags
    }
}

public struct SnapshotGroup: Sendable, Codable, Hashable {
    public var id: String
    public var provider: String
    public var idempotencyToken: String
    public var description: String
    public var tags: [String: String]
    public var state: SnapshotState
    public var createdAt: Date
    /// Time from the first disk's snapshot starting to the last one finishing: the
    /// part of a freeze window the provider is responsible for.
    public var spanUs: UInt64
    public var disks: [DiskSnapshot]

    public init(id: String, provider: String, idempotencyToken: String, description: String, tags: [String: String],
                state: SnapshotState, createdAt: Date, spanUs: UInt64, disks: [DiskSnapshot]) {
        self.id = id
        self.provider = provider
        self.idempotencyToken = idempotencyToken
        self.description = description
        self.tags = tags
        self.state = state
        self.createdAt = createdAt
        self.spanUs = spanUs
        self.disks = disks
    }
}

/// Where a restore puts the data.
public enum RestoreTarget: Sendable, Hashable {
    /// A new disk with this name (for a cloud: a new volume, named by a tag, in
    /// `zone` or the source disk's zone).
    case newDisk(String, zone: String? = nil)
    /// Over the original disk, which nothing may have attached.
    case inPlace
}

/// Typed provider errors; the coordinator retries `throttled` and `transient`
/// (with jitter, and never while frozen), and gives up on the rest.
public enum ProviderError: Error, Sendable, Hashable, CustomStringConvertible {
    case throttled(retryAfter: Duration?, detail: String)
    case transient(String)
    case notFound(String)
    case conflict(String)
    case permanent(String)

    public var isRetryable: Bool {
        switch self {
        case .throttled, .transient: true
        case .notFound, .conflict, .permanent: false
        }
    }

    public var description: String {
        switch self {
        case .throttled(let after, let detail): "throttled\(after.map { " (retry after \($0))" } ?? ""): \(detail)"
        case .transient(let detail): "transient: \(detail)"
        case .notFound(let detail): "not found: \(detail)"
        case .conflict(let detail): "conflict: \(detail)"
        case .permanent(let detail): detail
        }
    }
}

/// A place snapshots are taken: a local pool, EC2, Alibaba ECS.
public protocol SnapshotProvider: Sendable {
    /// "local", "ec2", …
    var kind: String { get }
    var capabilities: ProviderCapabilities { get }

    /// Snapshots every disk of `request` at one point in time (as far as the
    /// provider can; see ``ProviderCapabilities/atomicMultiDiskGroup``).
    func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup
    /// A create split around the guest's frozen window, which is what the coordinator uses:
    /// called unfrozen, it does everything that need not happen at the point in time
    /// (checks, opening the sources, making the targets); ``ArmedCreate/capture()``,
    /// inside the window, only fixes the point in time; ``ArmedCreate/finish()``, after
    /// the thaw, makes the group what `createGroup` returns. The default arms nothing
    /// and captures with the whole `createGroup` (a cloud's create call is its point in time).
    func armCreate(_ request: CreateGroupRequest) async throws -> any ArmedCreate
    /// Waits until every disk snapshot is usable.
    func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup
    func describe(_ groupID: String) async throws -> SnapshotGroup
    /// Groups carrying every one of `tags` (all groups for an empty filter).
    func list(tags: [String: String]) async throws -> [SnapshotGroup]
    func delete(_ groupID: String) async throws
    /// Restores one disk of a group; returns the id of the disk written.
    func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String
    /// Adds (or replaces) tags on a group: the level tag is set once the thaw reply has proved it.
    func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup

    /// Checks, before anything is frozen, everything a run of `targets` needs:
    /// credentials, permissions, that each instance and its disks exist and are
    /// attached, the provider's own limits. Returns every item, passed or not.
    func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem]
    /// Before any freeze: for each request, the disks of its group and the group its token
    /// already names, if any, by token. Batched, so that a run asks once, not once per instance.
    func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup]
    /// Waits for several groups at once (a cloud polls them in one call); each group's result by id.
    func waitUntilReady(_ groupIDs: [String], timeout: Duration) async -> [String: Result<SnapshotGroup, ProviderError>]
}

/// One instance to prepare: what it points at, and its run's token.
public struct PrepareRequest: Sendable, Hashable {
    public var target: ProviderTarget
    public var token: String
    public init(target: ProviderTarget, token: String) {
        self.target = target
        self.token = token
    }
}

/// One create, armed before the freeze (``SnapshotProvider/armCreate(_:)``). Exactly one of
/// `finish` (after a `capture` that succeeded) or `abandon` (no capture, or a failed one) ends it.
public protocol ArmedCreate: Sendable {
    /// Inside the frozen window: the point in time, and nothing that can wait for the thaw.
    func capture() async throws
    /// After the thaw: the group the capture cut, as `createGroup` would have returned it.
    func finish() async throws -> SnapshotGroup
    /// Nothing will be captured, or the capture failed: gives back what arming took.
    func abandon() async
}

/// The default arming: the provider's whole `createGroup` is the capture.
final class WholeCreate<Provider: SnapshotProvider>: ArmedCreate {
    let provider: Provider
    let request: CreateGroupRequest
    private let made = Mutex<SnapshotGroup?>(nil)

    init(provider: Provider, request: CreateGroupRequest) {
        self.provider = provider
        self.request = request
    }

    func capture() async throws {
        let group = try await self.provider.createGroup(self.request)
        self.made.withLock { $0 = group }
    }

    func finish() async throws -> SnapshotGroup {
        guard let group = self.made.withLock({ $0 }) else { throw ProviderError.permanent("finish without a capture that succeeded") }
        return group
    }

    func abandon() async {}
}

extension SnapshotProvider {
    public func armCreate(_ request: CreateGroupRequest) async throws -> any ArmedCreate {
        WholeCreate(provider: self, request: request)
    }

    /// Providers without an outside service: nothing to check but the disk list's length.
    public func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem] {
        targets.filter { $0.disks.count > self.capabilities.maxDisksPerGroup }.map {
            ProviderCheckItem(instanceID: $0.instanceID, item: "disks", ok: false,
                              detail: "a group holds at most \(self.capabilities.maxDisksPerGroup) disks, found \($0.disks.count)")
        }
    }

    /// The fleet file's disks, and the group tagged with each token.
    public func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup] {
        var prepared: [String: PreparedGroup] = [:]
        for request in requests {
            prepared[request.token] = PreparedGroup(disks: request.target.disks, existing: try await self.list(tags: ["quiesce:token": request.token]).first)
        }
        return prepared
    }

    /// One instance.
    public func prepare(_ target: ProviderTarget, token: String) async throws -> PreparedGroup {
        try await self.prepare([PrepareRequest(target: target, token: token)])[token] ?? PreparedGroup(disks: target.disks)
    }

    /// One group after the other.
    public func waitUntilReady(_ groupIDs: [String], timeout: Duration) async -> [String: Result<SnapshotGroup, ProviderError>] {
        var results: [String: Result<SnapshotGroup, ProviderError>] = [:]
        for id in groupIDs {
            do {
                results[id] = .success(try await self.waitUntilReady(id, timeout: timeout))
            } catch let error as ProviderError {
                results[id] = .failure(error)
            } catch {
                results[id] = .failure(.transient("\(error)"))
            }
        }
        return results
    }
}
