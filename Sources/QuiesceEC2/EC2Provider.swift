import Crypto
import Foundation
import QuiesceCore
import Synchronization

/// The `ec2` provider: EBS snapshots through the EC2 Query API.
///
/// A group is every snapshot tagged `quiesce:group=<id>`; the id is derived from
/// the run's token, and each snapshot also carries `quiesce:token`, so a group
/// is found again after a lost reply or an engine that died between create and
/// record (CreateSnapshot(s) take no client token). With the instance named
/// (`ec2_instance`), one CreateSnapshots call snapshots every volume of it at
/// one point in time; otherwise each listed volume gets its own CreateSnapshot,
/// all started at once while the guest is frozen.
///
/// Reads (Describe*) are retried with jittered backoff on throttling and 5xx,
/// honouring `Retry-After`; creates never are: inside a freeze a throttle is
/// reported at once, so the coordinator thaws first and retries later.
public struct EC2Provider: SnapshotProvider {
    /// Groups this process made or found, so that tagging one after the thaw needs no describe first.
    /// And instances described in the last minute, so that the run's prepare does not describe again what its check just did.
    final class Cache: Sendable {
        private let groups = Mutex<[String: SnapshotGroup]>([:])
        private let instances = Mutex<[String: (InstanceInfo, ContinuousClock.Instant)]>([:])
        func remember(_ group: SnapshotGroup) { self.groups.withLock { $0[group.id] = group } }
        func group(_ id: String) -> SnapshotGroup? { self.groups.withLock { $0[id] } }
        func remember(_ id: String, _ info: InstanceInfo) { self.instances.withLock { $0[id] = (info, .now) } }
        func instance(_ id: String) -> InstanceInfo? {
            self.instances.withLock { $0[id].flatMap { ContinuousClock.now - $0.1 < .seconds(60) ? $0.0 : nil } }
        }
    }

    let cache = Cache()
    public let kind = "ec2"
    public let capabilities: ProviderCapabilities
    public let client: EC2Client
    /// Between DescribeSnapshots polls while waiting for `completed` (doubling up to 15 s).
    public var pollInterval: Duration
    /// Attempts for a read before its error is returned.
    public var readAttempts = 6

    public init(client: EC2Client, createBurst: Int, createsPerSecond: Double, pollInterval: Duration = .seconds(2)) {
        self.client = client
        self.pollInterval = pollInterval
        self.capabilities = ProviderCapabilities(
            maxDisksPerGroup: 40, createBurst: createBurst, createsPerSecond: createsPerSecond,
            pointInTimeFixedOnReturn: true, atomicMultiDiskGroup: true, settlesLater: true)
    }

    /// "eg-" and 20 hex digits of the token's SHA-256: the same token always names the same group.
    public static func groupID(forToken token: String) -> String {
        "eg-" + SHA256.hash(data: Data(token.utf8)).prefix(10).map { String(format: "%02x", $0) }.joined()
    }

    // MARK: calls

    /// A call that may be repeated (a read, CreateTags, DeleteSnapshot, CreateVolume with a client
    /// token, a check's DryRun), retried on throttling and transient errors outside any freeze;
    /// the last error as EC2 gave it.
    func retried(_ action: String, _ parameters: [(String, String)]) async throws(EC2Error) -> XMLTree {
        var backoff = Backoff(base: .milliseconds(100), cap: .seconds(5), floor: .milliseconds(20))
        for attempt in 1... {
            do {
                return try await self.client.call(action, parameters)
            } catch let error as EC2Error where (error.isThrottle || error.isTransient) && attempt < self.readAttempts {
                try? await Task.sleep(for: max(backoff.next(), error.retryAfter ?? .zero))
            } catch let error as EC2Error {
                throw error
            } catch {
                throw EC2Error(action: action, kind: .badReply("\(error)"))
            }
        }
        fatalError("unreachable: the loop returns or throws")
    }

    /// ``retried(_:_:)`` with its error typed for the coordinator.
    func read(_ action: String, _ parameters: [(String, String)]) async throws -> XMLTree {
        do {
            return try await self.retried(action, parameters)
        } catch {
            throw error.providerError
        }
    }

    /// A check's probe: its EC2 error kept (DryRunOperation means allowed), nil when the call went through.
    func probe(_ action: String, _ parameters: [(String, String)]) async -> EC2Error? {
        do {
            _ = try await self.retried(action, parameters)
            return nil
        } catch {
            return error
        }
    }

    /// A write, once; its error typed for the coordinator.
    func write(_ action: String, _ parameters: [(String, String)]) async throws -> XMLTree {
        do {
            return try await self.client.call(action, parameters)
        } catch let error as EC2Error {
            throw error.providerError
        }
    }

    /// Every page of a Describe call's `set` items; `once`: no retries (inside a freeze window).
    func readAll(_ action: String, _ parameters: [(String, String)], set: String, once: Bool = false) async throws -> [XMLTree] {
        var items: [XMLTree] = []
        var next: String?
        repeat {
            let page = parameters + (next.map { [("NextToken", $0)] } ?? [])
            let reply = once ? try await self.write(action, page) : try await self.read(action, page)
            items += reply.items(set)
            next = reply.value("nextToken").flatMap { $0.isEmpty ? nil : $0 }
        } while next != nil
        return items
    }

    static func tagParameters(_ tags: [String: String], prefix: String) -> [(String, String)] {
        tags.sorted { $0.key < $1.key }.enumerated().flatMap { index, tag in
            [("\(prefix)\(index + 1).Key", tag.key), ("\(prefix)\(index + 1).Value", String(tag.value.prefix(255)))]
        }
    }

    static func filters(_ filters: [(String, [String])]) -> [(String, String)] {
        filters.enumerated().flatMap { index, filter in
            [("Filter.\(index + 1).Name", filter.0)] + filter.1.enumerated().map { ("Filter.\(index + 1).Value.\($0.offset + 1)", $0.element) }
        }
    }

    /// The snapshots of a group (or carrying `tags`), Quiesce's only.
    func snapshots(tags: [String: String], once: Bool = false) async throws -> [XMLTree] {
        var filters = tags.sorted { $0.key < $1.key }.map { ("tag:\($0.key)", [$0.value]) }
        filters.append(("tag-key", ["quiesce:group"]))
        return try await self.readAll("DescribeSnapshots", [("Owner.1", "self")] + Self.filters(filters), set: "snapshotSet", once: once)
    }

    static func date(_ text: String?) -> Date? {
        guard let text else { return nil }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text) ?? ISO8601DateFormatter().date(from: text)
    }

    /// Snapshot items (DescribeSnapshots, CreateSnapshot(s)) as one group.
    func group(_ id: String, from items: [XMLTree], spanUs: UInt64 = 0) -> SnapshotGroup {
        let states = items.map { $0.value("status") ?? $0.value("state") ?? "pending" }
        let state: SnapshotState = states.contains("error") ? .failed : states.allSatisfy { $0 == "completed" } ? .ready : .pending
        var tags = items.first?.tags ?? [:]
        for item in items.dropFirst() { tags.merge(item.tags) { old, _ in old } }
        let disks = items.map { item in
            DiskSnapshot(diskID: item.value("volumeId") ?? "", snapshotID: item.value("snapshotId") ?? "",
                         sizeBytes: UInt64(item.value("volumeSize").flatMap(Int.init) ?? 0) << 30, dataBytes: 0, method: .provider, durationUs: spanUs)
        }.sorted { $0.diskID < $1.diskID }
        return SnapshotGroup(
            id: id, provider: self.kind, idempotencyToken: tags["quiesce:token"] ?? "", description: items.first?.value("description") ?? "",
            tags: tags, state: state, createdAt: items.compactMap { Self.date($0.value("startTime")) }.min() ?? Date(), spanUs: spanUs, disks: disks)
    }

    // MARK: SnapshotProvider

    public func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup {
        let id = Self.groupID(forToken: request.idempotencyToken)
        var tags = request.tags
        tags["quiesce:group"] = id
        tags["quiesce:token"] = request.idempotencyToken
        let began = ContinuousClock.now
        do {
            var items: [XMLTree]
            if let instance = request.instance {
                var parameters = [("InstanceSpecification.InstanceId", instance), ("Description", request.description),
                                  ("TagSpecification.1.ResourceType", "snapshot")]
                if request.excludeBoot { parameters.append(("InstanceSpecification.ExcludeBootVolume", "true")) }
                for (index, volume) in request.excludeDisks.enumerated() {
                    parameters.append(("InstanceSpecification.ExcludeDataVolumeId.\(index + 1)", volume))
                }
                parameters += Self.tagParameters(tags, prefix: "TagSpecification.1.Tag.")
                items = try await self.write("CreateSnapshots", parameters).items("snapshotSet")
            } else {
                guard !request.disks.isEmpty else { throw ProviderError.permanent("a group needs at least one volume") }
                let base = [("Description", request.description), ("TagSpecification.1.ResourceType", "snapshot")]
                    + Self.tagParameters(tags, prefix: "TagSpecification.1.Tag.")
                items = try await withThrowingTaskGroup(of: XMLTree.self) { group in
                    for volume in request.disks {
                        group.addTask { try await self.write("CreateSnapshot", [("VolumeId", volume)] + base) }
                    }
                    var made: [XMLTree] = []
                    for try await item in group { made.append(item) }
                    return made
                }
            }
            let group = self.group(id, from: items.map { var item = $0; if item.tags.isEmpty { item.children.append(Self.tagSet(tags)) }; return item },
                                   spanUs: UInt64(max((ContinuousClock.now - began).microseconds, 0)))
            self.cache.remember(group)
            return group
        } catch let error as ProviderError {
            // The request may have been carried out: look for the token (once: the guest is
            // frozen) before saying it failed; a later attempt's prepare looks again, unfrozen.
            guard case .transient = error else { throw error }
            if let found = try? await self.snapshots(tags: ["quiesce:group": id], once: true), !found.isEmpty,
               request.instance != nil || Set(found.compactMap { $0.value("volumeId") }) == Set(request.disks) {
                return self.group(id, from: found, spanUs: UInt64(max((ContinuousClock.now - began).microseconds, 0)))
            }
            throw error
        }
    }

    static func tagSet(_ tags: [String: String]) -> XMLTree {
        XMLTree(name: "tagSet", text: "", children: tags.map { key, value in
            XMLTree(name: "item", text: "", children: [XMLTree(name: "key", text: key, children: []), XMLTree(name: "value", text: value, children: [])])
        })
    }

    public func describe(_ groupID: String) async throws -> SnapshotGroup {
        let items = try await self.snapshots(tags: ["quiesce:group": groupID])
        guard !items.isEmpty else { throw ProviderError.notFound("no EC2 snapshot is tagged quiesce:group=\(groupID)") }
        return self.group(groupID, from: items)
    }

    public func list(tags: [String: String]) async throws -> [SnapshotGroup] {
        let items = try await self.snapshots(tags: tags)
        return Dictionary(grouping: items) { $0.tags["quiesce:group"] ?? "" }
            .map { self.group($0.key, from: $0.value) }
            .sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }

    public func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup {
        switch await self.waitUntilReady([groupID], timeout: timeout)[groupID] {
        case .success(let group)?: return group
        case .failure(let error)?: throw error
        case nil: throw ProviderError.notFound("no EC2 snapshot is tagged quiesce:group=\(groupID)")
        }
    }

    public func delete(_ groupID: String) async throws {
        let items = try await self.snapshots(tags: ["quiesce:group": groupID])
        guard !items.isEmpty else { throw ProviderError.notFound("no EC2 snapshot is tagged quiesce:group=\(groupID)") }
        for item in items {
            do {
                _ = try await self.read("DeleteSnapshot", [("SnapshotId", item.value("snapshotId") ?? "")])
            } catch ProviderError.notFound {
                continue
            }
        }
    }

    public func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String {
        guard case .newDisk(let name, let givenZone) = target else {
            throw ProviderError.permanent("the ec2 provider restores only to a new volume (--as-new); attach it in place of the old one yourself")
        }
        let items = try await self.snapshots(tags: ["quiesce:group": groupID])
        guard let item = items.first(where: { $0.value("volumeId") == disk || $0.value("snapshotId") == disk }),
              let snapshot = item.value("snapshotId") else {
            throw ProviderError.notFound("EC2 snapshot group \(groupID) has no snapshot of \(disk)")
        }
        var zone = givenZone
        if zone == nil {
            let volumes = try? await self.read("DescribeVolumes", [("VolumeId.1", disk)]).items("volumeSet")
            zone = volumes?.first?.value("availabilityZone")
        }
        guard let zone, !zone.isEmpty else {
            throw ProviderError.permanent("the source volume \(disk) is gone, so its availability zone is unknown: give one with --zone")
        }
        let tags = ["Name": name, "quiesce:restored-from": snapshot, "quiesce:source-volume": disk, "quiesce:group": groupID]
        // The client token makes a repeated CreateVolume (a lost reply) return the same volume.
        let clientToken = "quiesce-" + SHA256.hash(data: Data("\(snapshot)/\(name)/\(zone)".utf8)).prefix(16).map { String(format: "%02x", $0) }.joined()
        let reply = try await self.read("CreateVolume", [("SnapshotId", snapshot), ("AvailabilityZone", zone), ("ClientToken", clientToken),
                                                         ("TagSpecification.1.ResourceType", "volume")]
            + Self.tagParameters(tags, prefix: "TagSpecification.1.Tag."))
        guard let volume = reply.value("volumeId"), !volume.isEmpty else {
            throw ProviderError.permanent("EC2 CreateVolume answered without a volumeId")
        }
        return volume
    }

    public func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup {
        var group: SnapshotGroup
        if let known = self.cache.group(groupID) { group = known } else { group = try await self.describe(groupID) }
        let ids = group.disks.map(\.snapshotID)
        _ = try await self.read("CreateTags", ids.enumerated().map { ("ResourceId.\($0 + 1)", $1) } + Self.tagParameters(tags, prefix: "Tag."))
        group.tags.merge(tags) { _, new in new }
        self.cache.remember(group)
        return group
    }

    // MARK: before a freeze

    struct InstanceInfo: Sendable {
        var volumes: [(id: String, device: String)]
        var root: String
        var state: String
    }

    static func instanceInfo(_ item: XMLTree) -> InstanceInfo {
        let volumes = item.items("blockDeviceMapping").compactMap { mapping -> (String, String)? in
            guard let id = mapping.value("ebs/volumeId") else { return nil }
            return (id, mapping.value("deviceName") ?? "")
        }
        return InstanceInfo(volumes: volumes, root: item.value("rootDeviceName") ?? "", state: item.value("instanceState/name") ?? "")
    }

    /// Instances by id, 200 to a call; an id EC2 does not know fails its whole call, which is
    /// then asked one id at a time so that only that one is missing.
    func describeInstances(_ ids: [String], fresh: Bool = false) async throws -> [String: InstanceInfo] {
        var found: [String: InstanceInfo] = [:]
        var ids = ids
        if !fresh {
            for id in ids { if let known = self.cache.instance(id) { found[id] = known } }
            ids.removeAll { found[$0] != nil }
        }
        for start in stride(from: 0, to: ids.count, by: 200) {
            let batch = Array(ids[start..<min(ids.count, start + 200)])
            do {
                let reply = try await self.read("DescribeInstances", batch.enumerated().map { ("InstanceId.\($0 + 1)", $1) })
                for item in reply.items("reservationSet").flatMap({ $0.items("instancesSet") }) {
                    if let id = item.value("instanceId") {
                        found[id] = Self.instanceInfo(item)
                        self.cache.remember(id, Self.instanceInfo(item))
                    }
                }
            } catch ProviderError.notFound where batch.count > 1 {
                for id in batch { found.merge(try await self.describeInstances([id], fresh: true)) { a, _ in a } }
            } catch ProviderError.notFound {
                continue  // InvalidInstanceID.NotFound
            }
        }
        return found
    }

    /// Volumes by id, in the same way.
    func describeVolumes(_ ids: [String]) async throws -> [String: XMLTree] {
        var found: [String: XMLTree] = [:]
        for start in stride(from: 0, to: ids.count, by: 200) {
            let batch = Array(ids[start..<min(ids.count, start + 200)])
            do {
                for item in try await self.read("DescribeVolumes", batch.enumerated().map { ("VolumeId.\($0 + 1)", $1) }).items("volumeSet") {
                    if let id = item.value("volumeId") { found[id] = item }
                }
            } catch ProviderError.notFound where batch.count > 1 {
                for id in batch { found.merge(try await self.describeVolumes([id])) { a, _ in a } }
            } catch ProviderError.notFound {
                continue
            }
        }
        return found
    }

    static func resolve(_ target: ProviderTarget, volumes: [(id: String, device: String)], root: String) -> [String] {
        volumes.filter { !(target.excludeBoot && $0.device == root) && !target.excludeDisks.contains($0.id) }.map(\.id)
    }

    /// Two calls for up to 200 instances: DescribeInstances for those whose volumes are to be
    /// found, DescribeSnapshots for every token at once (by the token alone, so that a snapshot
    /// made by hand or by another tool with a run's token is adopted too; such a snapshot gets
    /// its group's tag here).
    public func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup] {
        let discover = requests.filter { $0.target.providerInstance != nil && $0.target.disks.isEmpty }.compactMap(\.target.providerInstance)
        let instances = try await self.describeInstances(Array(Set(discover)).sorted())
        var prepared: [String: PreparedGroup] = [:]
        for request in requests {
            var disks = request.target.disks
            if let instance = request.target.providerInstance, disks.isEmpty {
                guard let found = instances[instance] else { throw ProviderError.notFound("EC2 instance \(instance) does not exist") }
                disks = Self.resolve(request.target, volumes: found.volumes, root: found.root)
            }
            prepared[request.token] = PreparedGroup(disks: disks)
        }
        let tokens = requests.map(\.token)
        for start in stride(from: 0, to: tokens.count, by: 200) {
            let batch = Array(tokens[start..<min(tokens.count, start + 200)])
            let items = try await self.readAll("DescribeSnapshots", [("Owner.1", "self")] + Self.filters([("tag:quiesce:token", batch)]), set: "snapshotSet")
            for (token, found) in Dictionary(grouping: items, by: { $0.tags["quiesce:token"] ?? "" }) where prepared[token] != nil {
                let id = Self.groupID(forToken: token)
                var found = found
                let strays = found.filter { $0.tags["quiesce:group"] != id }.compactMap { $0.value("snapshotId") }
                if !strays.isEmpty {
                    _ = try await self.read("CreateTags", strays.enumerated().map { ("ResourceId.\($0 + 1)", $1) }
                        + Self.tagParameters(["quiesce:group": id], prefix: "Tag."))
                    found = found.map { item in
                        var item = item
                        if item.tags["quiesce:group"] != id { item.children.removeAll { $0.name == "tagSet" }; item.children.append(Self.tagSet(item.tags.merging(["quiesce:group": id]) { $1 })) }
                        return item
                    }
                }
                let group = self.group(id, from: found)
                self.cache.remember(group)
                prepared[token]?.existing = group
            }
        }
        return prepared
    }

    /// Polls every pending group in one DescribeSnapshots per 200 groups, doubling the pause up to 15 s.
    public func waitUntilReady(_ groupIDs: [String], timeout: Duration) async -> [String: Result<SnapshotGroup, ProviderError>] {
        var results: [String: Result<SnapshotGroup, ProviderError>] = [:]
        var pending = groupIDs
        let deadline = ContinuousClock.now + timeout
        var interval = self.pollInterval
        while !pending.isEmpty {
            for start in stride(from: 0, to: pending.count, by: 200) {
                let batch = Array(pending[start..<min(pending.count, start + 200)])
                do {
                    let items = try await self.readAll("DescribeSnapshots", [("Owner.1", "self")] + Self.filters([("tag:quiesce:group", batch)]), set: "snapshotSet")
                    let byGroup = Dictionary(grouping: items) { $0.tags["quiesce:group"] ?? "" }
                    for id in batch {
                        guard let found = byGroup[id] else {
                            results[id] = .failure(.notFound("no EC2 snapshot is tagged quiesce:group=\(id)"))
                            continue
                        }
                        let group = self.group(id, from: found)
                        switch group.state {
                        case .ready: results[id] = .success(group)
                        case .failed: results[id] = .failure(.permanent("EC2 snapshot group \(id): a snapshot is in state error"))
                        case .pending: break
                        }
                    }
                } catch let error as ProviderError {
                    for id in batch { results[id] = .failure(error) }
                } catch {
                    for id in batch { results[id] = .failure(.transient("\(error)")) }
                }
            }
            pending.removeAll { results[$0] != nil }
            guard !pending.isEmpty else { break }
            guard ContinuousClock.now + interval < deadline else {
                for id in pending { results[id] = .failure(.transient("EC2 snapshot group \(id) still pending after \(timeout)")) }
                break
            }
            try? await Task.sleep(for: interval)
            interval = min(interval * 2, .seconds(15))
        }
        return results
    }

    /// Credentials and permissions (DryRun), each instance and its volumes, the group size limit.
    public func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem] {
        var items = [ProviderCheckItem(item: "credentials", ok: true, detail: "\(self.client.credentials); region \(self.client.region); endpoint \(self.client.endpoint)")]
        var firstInstance: String?
        var firstVolume: (id: String, zone: String)?
        // Every instance and volume in a few batched calls, not one call each.
        let instances: [String: InstanceInfo]
        let volumes: [String: XMLTree]
        // The three describes at once (a run waits for its check before its first freeze).
        async let sampled = try? await self.readAll("DescribeSnapshots", [("Owner.1", "self"), ("MaxResults", "5")] + Self.filters([("tag-key", ["quiesce:group"])]),
                                                    set: "snapshotSet").first?.value("snapshotId")
        async let describedInstances = self.describeInstances(Array(Set(targets.compactMap(\.providerInstance))).sorted(), fresh: true)
        async let describedVolumes = self.describeVolumes(Array(Set(targets.flatMap(\.disks))).sorted())
        let sample = await sampled
        do {
            instances = try await describedInstances
            volumes = try await describedVolumes
        } catch {
            return items + [ProviderCheckItem(item: "describe", ok: false, detail: "the instances and volumes could not be described: \(error)")]
        }
        for target in targets {
            var disks = target.disks
            if let instance = target.providerInstance {
                guard let found = instances[instance] else {
                    items.append(.init(instanceID: target.instanceID, item: "instance", ok: false, detail: "EC2 instance \(instance) does not exist in \(self.client.region)"))
                    continue
                }
                firstInstance = firstInstance ?? instance
                let resolved = Self.resolve(target, volumes: found.volumes, root: found.root)
                items.append(.init(instanceID: target.instanceID, item: "instance", ok: !resolved.isEmpty,
                                   detail: "\(instance) (\(found.state)): " + (resolved.isEmpty ? "no volume left after the exclusions"
                                       : "\(resolved.count) volume\(resolved.count == 1 ? "" : "s"): \(resolved.joined(separator: ", "))")))
                let attached = Set(found.volumes.map(\.id))
                let strangers = target.disks.filter { !attached.contains($0) }
                if !strangers.isEmpty {
                    items.append(.init(instanceID: target.instanceID, item: "volumes", ok: false,
                                       detail: "expected volumes attached to \(instance), found not attached: \(strangers.joined(separator: ", "))"))
                }
                if disks.isEmpty { disks = resolved }
            }
            if disks.count > self.capabilities.maxDisksPerGroup {
                items.append(.init(instanceID: target.instanceID, item: "volumes", ok: false,
                                   detail: "a group holds at most \(self.capabilities.maxDisksPerGroup) volumes, found \(disks.count)"))
            }
            guard !target.disks.isEmpty else { continue }
            var problems: [String] = []
            for disk in target.disks {
                guard let volume = volumes[disk] else { problems.append("\(disk) does not exist"); continue }
                if firstVolume == nil { firstVolume = (disk, volume.value("availabilityZone") ?? "") }
                if volume.value("status") != "in-use" { problems.append("\(disk) is \(volume.value("status") ?? "?"), not attached") }
            }
            items.append(.init(instanceID: target.instanceID, item: "volumes", ok: problems.isEmpty,
                               detail: problems.isEmpty ? "\(target.disks.count) volume\(target.disks.count == 1 ? "" : "s") attached" : problems.joined(separator: "; ")))
        }
        // Permissions, asked with DryRun: EC2 says DryRunOperation when the call would be allowed.
        // The creates carry a tag specification, so tag-on-create (CreateTags with
        // ec2:CreateAction) is checked with them; tagging an existing snapshot (the level,
        // after the thaw) and deleting one are checked on a snapshot Quiesce made, when
        // there is one yet (docs/ec2-iam-policy.json scopes both to Quiesce's snapshots).
        let tagSpec = { (type: String) in [("TagSpecification.1.ResourceType", type), ("TagSpecification.1.Tag.1.Key", "quiesce:check"), ("TagSpecification.1.Tag.1.Value", "1")] }
        var probes: [(String, String, [(String, String)], Bool)] = [
            ("ec2:DescribeSnapshots", "DescribeSnapshots", [("Owner.1", "self"), ("MaxResults", "5")], true),
        ]
        if let instance = firstInstance {
            probes.append(("ec2:CreateSnapshots + ec2:CreateTags on create", "CreateSnapshots", [("InstanceSpecification.InstanceId", instance)] + tagSpec("snapshot"), true))
        }
        if let volume = firstVolume {
            probes.append(("ec2:CreateSnapshot + ec2:CreateTags on create", "CreateSnapshot", [("VolumeId", volume.id)] + tagSpec("snapshot"), true))
            probes.append(("ec2:CreateVolume (restore)", "CreateVolume", [("SnapshotId", sample ?? "snap-00000000000000000"), ("AvailabilityZone", volume.zone)] + tagSpec("volume"), false))
        }
        if let sample {
            probes.append(("ec2:CreateTags on Quiesce's snapshots", "CreateTags", [("ResourceId.1", sample), ("Tag.1.Key", "quiesce:check"), ("Tag.1.Value", "1")], true))
            probes.append(("ec2:DeleteSnapshot (prune)", "DeleteSnapshot", [("SnapshotId", sample)], false))
        } else {
            items.append(.init(item: "permission ec2:CreateTags on Quiesce's snapshots", ok: true,
                               detail: "not checked yet: no snapshot of Quiesce's exists (checked on one after the first run)", blocking: true))
        }
        // All at once: each is one round trip, and a fleet's run waits for them before its first freeze.
        let answers = await withTaskGroup(of: (Int, EC2Error?).self) { group in
            for (index, probe) in probes.enumerated() {
                let dryRun = probe.1 != "DescribeSnapshots"
                group.addTask { (index, await self.probe(probe.1, probe.2 + (dryRun ? [("DryRun", "true")] : []))) }
            }
            var answers: [Int: EC2Error?] = [:]
            for await (index, answer) in group { answers[index] = answer }
            return answers
        }
        for (index, (permission, _, _, blocking)) in probes.enumerated() {
            switch answers[index] ?? nil {
            case nil:
                items.append(.init(item: "permission \(permission)", ok: true, detail: "allowed", blocking: blocking))
            case let error? where error.code == "DryRunOperation":
                items.append(.init(item: "permission \(permission)", ok: true, detail: "allowed (DryRun)", blocking: blocking))
            case let error? where error.isDenied:
                items.append(.init(item: "permission \(permission)", ok: false, detail: "missing: \(error.code ?? "") — \(error)", blocking: blocking))
            case let error?:
                items.append(.init(item: "permission \(permission)", ok: false, detail: "could not be checked: \(error)", blocking: blocking))
            }
        }
        return items
    }
}
