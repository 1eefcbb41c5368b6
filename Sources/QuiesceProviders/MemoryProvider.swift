import Foundation
import QuiesceCore
import Synchronization

/// A provider that keeps its groups in memory, for tests of the coordinator's
/// retry, throttle and adoption paths without root or a cloud: faults are
/// scripted per call, snapshots stay `pending` for a number of polls, and its
/// time is a manual clock the test advances (a throttle's `retryAfter` is in it).
/// It is a working provider — groups, tags, tokens, delete, restore — not a stub.
public final class MemoryProvider: SnapshotProvider, Sendable {
    /// What the next call of an operation does instead of (or besides) its work.
    public enum Fault: Sendable, Equatable {
        /// Refused with a throttle, before doing anything.
        case throttle(retryAfter: Duration?)
        /// Refused with a transient error, before doing anything.
        case transient
        /// Done, but the reply is lost: the caller sees a transient error (a reset after the request arrived).
        case lostReply
        /// Refused for good.
        case denied
    }

    public enum Operation: String, Sendable, Hashable { case create, describe, list, tag, delete, restore, prepare, check }

    public let kind = "memory"
    public let capabilities: ProviderCapabilities
    /// The disks that exist (a create of another is `notFound`).
    public let disks: Set<String>
    /// Polls a new group stays pending for.
    public let pendingPolls: Int

    struct State {
        var groups: [String: SnapshotGroup] = [:]
        var polls: [String: Int] = [:]
        var faults: [Operation: [Fault]] = [:]
        var calls: [Operation: Int] = [:]
        var creates = 0
        var now: Duration = .zero
    }

    private let state = Mutex(State())

    public init(disks: Set<String>, pendingPolls: Int = 0, createBurst: Int = 20, createsPerSecond: Double = 50) {
        self.disks = disks
        self.pendingPolls = pendingPolls
        self.capabilities = ProviderCapabilities(maxDisksPerGroup: 16, createBurst: createBurst, createsPerSecond: createsPerSecond,
                                                 pointInTimeFixedOnReturn: true, atomicMultiDiskGroup: true)
    }

    /// Queues faults for the next calls of `operation`, in order.
    public func script(_ operation: Operation, _ faults: [Fault]) { self.state.withLock { $0.faults[operation, default: []] += faults } }
    /// Calls made of `operation`, faulted or not.
    public func calls(_ operation: Operation) -> Int { self.state.withLock { $0.calls[operation, default: 0] } }
    /// Groups actually made (a lost reply counts: it was made).
    public var createsDone: Int { self.state.withLock { $0.creates } }
    public var groups: [SnapshotGroup] { self.state.withLock { Array($0.groups.values) }.sorted { $0.id < $1.id } }
    /// The manual clock: moves only when the test says.
    public var now: Duration { self.state.withLock { $0.now } }
    public func advance(_ by: Duration) { self.state.withLock { $0.now += by } }

    /// Counts the call and applies a scripted fault that refuses it; returns a fault that lets the work happen first.
    private func enter(_ operation: Operation) throws -> Fault? {
        let fault: Fault? = self.state.withLock { state in
            state.calls[operation, default: 0] += 1
            guard var queue = state.faults[operation], !queue.isEmpty else { return nil }
            let first = queue.removeFirst()
            state.faults[operation] = queue
            return first
        }
        switch fault {
        case .throttle(let after)?: throw ProviderError.throttled(retryAfter: after, detail: "memory: \(operation.rawValue) throttled (scripted)")
        case .transient?: throw ProviderError.transient("memory: \(operation.rawValue) failed (scripted)")
        case .denied?: throw ProviderError.permanent("memory: \(operation.rawValue) denied (scripted)")
        case .lostReply?, nil: return fault
        }
    }

    public static func groupID(forToken token: String) -> String { "mg-" + String(token.hashValueStable, radix: 16) }

    public func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup {
        let fault = try self.enter(.create)
        let unknown = request.disks.filter { !self.disks.contains($0) }
        guard unknown.isEmpty else { throw ProviderError.notFound("memory: no disk \(unknown.joined(separator: ", "))") }
        let id = Self.groupID(forToken: request.idempotencyToken)
        let group: SnapshotGroup = self.state.withLock { state in
            if let existing = state.groups[id] { return existing }
            var tags = request.tags
            tags["quiesce:token"] = request.idempotencyToken
            let group = SnapshotGroup(
                id: id, provider: self.kind, idempotencyToken: request.idempotencyToken, description: request.description, tags: tags,
                state: self.pendingPolls > 0 ? .pending : .ready, createdAt: Date(), spanUs: 1,
                disks: request.disks.enumerated().map { DiskSnapshot(diskID: $1, snapshotID: "\(id)-\($0)", sizeBytes: 1 << 20, dataBytes: 0, method: .provider, durationUs: 1) })
            state.groups[id] = group
            state.polls[id] = self.pendingPolls
            state.creates += 1
            return group
        }
        if fault == .lostReply { throw ProviderError.transient("memory: create's reply lost (scripted; the group was made)") }
        return group
    }

    public func describe(_ groupID: String) async throws -> SnapshotGroup {
        _ = try self.enter(.describe)
        return try self.state.withLock { state in
            guard var group = state.groups[groupID] else { throw ProviderError.notFound("memory: no group \(groupID)") }
            let left = state.polls[groupID, default: 0]
            if left > 0 { state.polls[groupID] = left - 1 } else { group.state = .ready }
            state.groups[groupID] = group
            return group
        }
    }

    public func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup {
        var waited: Duration = .zero
        while true {
            let group = try await self.describe(groupID)
            if group.state == .ready { return group }
            // Time passes on the manual clock only.
            self.advance(.milliseconds(100))
            waited += .milliseconds(100)
            if waited > timeout { throw ProviderError.transient("memory: \(groupID) still pending after \(timeout)") }
        }
    }

    public func list(tags: [String: String]) async throws -> [SnapshotGroup] {
        _ = try self.enter(.list)
        return self.groups.filter { group in tags.allSatisfy { group.tags[$0.key] == $0.value } }
    }

    /// A scripted `denied` for `.check` fails the provider's permission item; unknown disks fail their instance.
    public func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem] {
        var items: [ProviderCheckItem] = []
        do {
            _ = try self.enter(.check)
            items.append(ProviderCheckItem(item: "permission memory:create", ok: true, detail: "allowed"))
        } catch {
            items.append(ProviderCheckItem(item: "permission memory:create", ok: false, detail: "missing: \(error)"))
        }
        for target in targets {
            let unknown = target.disks.filter { !self.disks.contains($0) }
            items.append(ProviderCheckItem(instanceID: target.instanceID, item: "disks", ok: unknown.isEmpty,
                                           detail: unknown.isEmpty ? "\(target.disks.count) disks" : "no such disk: \(unknown.joined(separator: ", "))"))
        }
        return items
    }

    /// One call per batch, like a cloud's one DescribeSnapshots for a whole run.
    public func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup] {
        _ = try self.enter(.prepare)
        return self.state.withLock { state in
            Dictionary(uniqueKeysWithValues: requests.map {
                ($0.token, PreparedGroup(disks: $0.target.disks, existing: state.groups[Self.groupID(forToken: $0.token)]))
            })
        }
    }

    public func delete(_ groupID: String) async throws {
        _ = try self.enter(.delete)
        try self.state.withLock { state in
            guard state.groups.removeValue(forKey: groupID) != nil else { throw ProviderError.notFound("memory: no group \(groupID)") }
        }
    }

    public func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String {
        _ = try self.enter(.restore)
        guard case .newDisk(let name, _) = target else { throw ProviderError.permanent("memory: restores only to a new disk") }
        return try self.state.withLock { state in
            guard let group = state.groups[groupID], group.disks.contains(where: { $0.diskID == disk }) else {
                throw ProviderError.notFound("memory: no disk \(disk) in group \(groupID)")
            }
            return name
        }
    }

    public func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup {
        _ = try self.enter(.tag)
        return try self.state.withLock { state in
            guard var group = state.groups[groupID] else { throw ProviderError.notFound("memory: no group \(groupID)") }
            group.tags.merge(tags) { _, new in new }
            state.groups[groupID] = group
            return group
        }
    }
}

extension String {
    /// FNV-1a: the same on every run (Swift's hashValue is seeded per process).
    var hashValueStable: UInt64 {
        var hash: UInt64 = 0xcbf29ce484222325
        for byte in self.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100000001b3 }
        return hash
    }
}
