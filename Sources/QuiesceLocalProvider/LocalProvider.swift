import CQuiesceLinux
import Crypto
import Foundation
import QuiesceCore

/// The `local` provider: disks are raw image files in a pool directory.
///
///     POOL/disks/NAME.img                       the disks (what loop devices attach)
///     POOL/snapshots/GROUP/NAME.img             one clone per disk
///     POOL/snapshots/GROUP/group.json           the group: disks, tags, token, times, checksums
///
/// A snapshot is a reflink clone (FICLONE) where the pool's filesystem can
/// (XFS with reflink, btrfs), and a sparse copy elsewhere — which then falls
/// inside the freeze window, so ``usesSlowPath`` says so. Nothing in the create
/// waits for the disk: FICLONE writes the source's dirty pages back before it
/// shares extents, and a copy reads through the page cache, so the clone is the
/// image as the frozen guest left it. A multi-disk group is one point in time
/// only while the guest is frozen across the whole create.
///
/// `createGroup` does only what fixes the point in time; ``waitUntilReady(_:timeout:)``
/// then makes the clones durable and records their checksums (state
/// pending → ready), outside any freeze window.
public struct LocalProvider: SnapshotProvider {
    public let pool: String
    public let kind = "local"
    public let capabilities: ProviderCapabilities
    /// False when this pool's filesystem cannot reflink.
    public let reflinkSupported: Bool

    public var disksDirectory: String { self.pool + "/disks" }
    public var snapshotsDirectory: String { self.pool + "/snapshots" }

    /// - Parameters:
    ///   - pool: The pool directory (created if missing).
    ///   - createBurst, createsPerSecond: The rate limits the provider declares
    ///     (the coordinator's token bucket enforces them).
    public init(pool: String, createBurst: Int = 20, createsPerSecond: Double = 50) throws {
        self.pool = pool
        for directory in [pool, pool + "/disks", pool + "/snapshots"] {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw ProviderError.permanent("local pool \(directory): cannot create: \(error)")
            }
        }
        self.reflinkSupported = Self.probeReflink(in: pool)
        self.capabilities = ProviderCapabilities(
            maxDisksPerGroup: 64, createBurst: createBurst, createsPerSecond: createsPerSecond,
            pointInTimeFixedOnReturn: true, atomicMultiDiskGroup: false)
    }

    /// True when snapshots here are full copies whose time grows with the data.
    public var usesSlowPath: Bool { !self.reflinkSupported }

    /// Path of a disk image by id; ids are plain names.
    public func diskPath(_ id: String) throws -> String {
        try Self.validateName(id, what: "disk id")
        return "\(self.disksDirectory)/\(id).img"
    }

    public func snapshotPath(group: String, disk: String) -> String {
        "\(self.snapshotsDirectory)/\(group)/\(disk).img"
    }

    /// The group id a token maps to: the same token always names the same group.
    public static func groupID(forToken token: String) -> String {
        "lg-" + SHA256.hash(data: Data(token.utf8)).prefix(10).map { String(format: "%02x", $0) }.joined()
    }

    // MARK: SnapshotProvider

    /// The pool can be written, and every listed disk image is in it.
    public func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem] {
        var items: [ProviderCheckItem] = [ProviderCheckItem(
            item: "pool", ok: FileManager.default.isWritableFile(atPath: self.snapshotsDirectory),
            detail: "\(self.pool) (\(self.reflinkSupported ? "reflink" : "no reflink: sparse copies, inside the freeze window"))")]
        for target in targets {
            if target.providerInstance != nil || target.disks.isEmpty {
                items.append(ProviderCheckItem(instanceID: target.instanceID, item: "disks", ok: false,
                                               detail: "the local provider needs the instance's disks listed (disks: [...]); it cannot discover them"))
                continue
            }
            let missing = target.disks.filter { (try? self.diskPath($0)).map { !FileManager.default.fileExists(atPath: $0) } ?? true }
            items.append(ProviderCheckItem(
                instanceID: target.instanceID, item: "disks", ok: missing.isEmpty && target.disks.count <= self.capabilities.maxDisksPerGroup,
                detail: !missing.isEmpty ? "expected disk images in \(self.disksDirectory), missing: \(missing.joined(separator: ", "))"
                    : target.disks.count > self.capabilities.maxDisksPerGroup
                    ? "a group holds at most \(self.capabilities.maxDisksPerGroup) disks, found \(target.disks.count)"
                    : "\(target.disks.count) disk\(target.disks.count == 1 ? "" : "s") in the pool"))
        }
        return items
    }

    /// The group a token names is found by its id: no listing.
    public func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup] {
        var prepared: [String: PreparedGroup] = [:]
        for request in requests {
            let id = Self.groupID(forToken: request.token)
            var existing: SnapshotGroup?
            if FileManager.default.fileExists(atPath: "\(self.snapshotsDirectory)/\(id)/group.json") {
                let group = try self.readGroup(id)
                existing = group.idempotencyToken == request.token ? group : nil
            }
            prepared[request.token] = PreparedGroup(disks: request.target.disks, existing: existing)
        }
        return prepared
    }

    public func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup {
        let provider = self
        return try await DedicatedThread.run(name: "quiesce-local-create") { try provider.createBlocking(request) }
    }

    /// Arming opens every source and makes every target (and the group's partial directory),
    /// so the capture inside the frozen window is the clones alone; the group file and the
    /// rename that makes the group wait for the thaw.
    public func armCreate(_ request: CreateGroupRequest) async throws -> any ArmedCreate {
        let provider = self
        return try await DedicatedThread.run(name: "quiesce-local-arm") { try provider.armBlocking(request, standby: true) }
    }

    func createBlocking(_ request: CreateGroupRequest) throws -> SnapshotGroup {
        let armed = try self.armBlocking(request)
        do {
            try armed.captureBlocking()
        } catch {
            armed.abandonBlocking()
            throw error
        }
        return try armed.finishBlocking()
    }

    func armBlocking(_ request: CreateGroupRequest, standby: Bool = false) throws -> LocalArmedCreate {
        guard !request.disks.isEmpty else { throw ProviderError.permanent("a group needs at least one disk") }
        guard request.disks.count <= self.capabilities.maxDisksPerGroup else {
            throw ProviderError.permanent("a group holds at most \(self.capabilities.maxDisksPerGroup) disks, found \(request.disks.count)")
        }
        guard Set(request.disks).count == request.disks.count else {
            throw ProviderError.permanent("a disk is listed twice in \(request.disks)")
        }
        guard !request.idempotencyToken.isEmpty else { throw ProviderError.permanent("an idempotency token is required") }
        let id = Self.groupID(forToken: request.idempotencyToken)
        if let existing = try? self.readGroup(id) {
            guard existing.idempotencyToken == request.idempotencyToken else {
                throw ProviderError.conflict("group \(id) exists with another token")
            }
            return LocalArmedCreate(provider: self, request: request, id: id, partial: "", pairs: [], existing: existing, standby: standby)
        }
        // Every source open before the point in time, so a missing disk fails before anything is frozen.
        let partial = "\(self.snapshotsDirectory)/.\(id).partial"
        var pairs: [LocalArmedCreate.Pair] = []
        var madePartial = false
        func opened(_ path: String, _ flags: Int32, _ call: String) throws -> Int32 {
            let fd = open(path, flags, 0o600)
            guard fd >= 0 else { throw ImageFiles.posixError(call, path) }
            return fd
        }
        do {
            for disk in request.disks {
                pairs.append(.init(disk: disk, source: try opened(try self.diskPath(disk), O_RDONLY | O_CLOEXEC, "open disk"), target: -1))
            }
            try? FileManager.default.removeItem(atPath: partial)
            guard mkdir(partial, 0o700) == 0 else { throw ImageFiles.posixError("mkdir", partial) }
            madePartial = true
            for index in pairs.indices {
                pairs[index].target = try opened("\(partial)/\(pairs[index].disk).img", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, "create")
            }
        } catch {
            for pair in pairs {
                close(pair.source)
                if pair.target >= 0 { close(pair.target) }
            }
            if madePartial { try? FileManager.default.removeItem(atPath: partial) }
            throw error
        }
        return LocalArmedCreate(provider: self, request: request, id: id, partial: partial, pairs: pairs, existing: nil, standby: standby)
    }

    public func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup {
        let provider = self
        return try await DedicatedThread.run(name: "quiesce-local-tag") {
            var group = try provider.readGroup(groupID)
            group.tags.merge(tags) { $1 }
            // A pending group is made durable by its seal.
            try provider.writeGroup(group, directory: "\(provider.snapshotsDirectory)/\(groupID)", durable: group.state != .pending)
            return group
        }
    }

    public func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup {
        let provider = self
        return try await withDeadline(timeout) {
            try await DedicatedThread.run(name: "quiesce-local-seal", background: true) { try provider.sealBlocking(groupID) }
        }
    }

    /// Makes a pending group durable and records its checksums.
    func sealBlocking(_ groupID: String) throws -> SnapshotGroup {
        var group = try self.readGroup(groupID)
        guard group.state == .pending else { return group }
        for index in group.disks.indices {
            let path = self.snapshotPath(group: groupID, disk: group.disks[index].diskID)
            try ImageFiles.fsyncPath(path)
            group.disks[index].sha256 = try ImageFiles.sparseDigest(path: path)
        }
        group.state = .ready
        // Images, then the group file and its directory, then the rename that made the group (its parent).
        try self.writeGroup(group, directory: "\(self.snapshotsDirectory)/\(groupID)")
        try ImageFiles.fsyncPath(self.snapshotsDirectory, directory: true)
        return group
    }

    public func describe(_ groupID: String) async throws -> SnapshotGroup {
        try self.readGroup(groupID)
    }

    public func list(tags: [String: String]) async throws -> [SnapshotGroup] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: self.snapshotsDirectory)) ?? []
        return names.filter { !$0.hasPrefix(".") }.compactMap { try? self.readGroup($0) }
            .filter { group in tags.allSatisfy { group.tags[$0.key] == $0.value } }
            .sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }

    public func delete(_ groupID: String) async throws {
        let group = try self.readGroup(groupID)
        for disk in group.disks {
            let path = self.snapshotPath(group: groupID, disk: disk.diskID)
            let attached = ImageFiles.loopAttachments(of: path)
            guard attached.isEmpty else {
                throw ProviderError.conflict("snapshot \(path) is attached to \(attached.joined(separator: ", ")); detach it first")
            }
        }
        do {
            try FileManager.default.removeItem(atPath: "\(self.snapshotsDirectory)/\(groupID)")
        } catch {
            throw ProviderError.permanent("delete \(groupID): \(error)")
        }
    }

    public func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String {
        let provider = self
        return try await DedicatedThread.run(name: "quiesce-local-restore") {
            try provider.restoreBlocking(groupID, disk: disk, to: target)
        }
    }

    func restoreBlocking(_ groupID: String, disk: String, to target: RestoreTarget) throws -> String {
        let group = try self.readGroup(groupID)
        guard group.disks.contains(where: { $0.diskID == disk }) else {
            throw ProviderError.notFound("group \(groupID) has no disk \"\(disk)\"; it has \(group.disks.map(\.diskID).joined(separator: ", "))")
        }
        let source = self.snapshotPath(group: groupID, disk: disk)
        let newID: String
        switch target {
        case .newDisk(let id, _):
            newID = id
            if FileManager.default.fileExists(atPath: try self.diskPath(id)) {
                throw ProviderError.conflict("disk \"\(id)\" already exists; choose another name or restore in place")
            }
        case .inPlace:
            newID = disk
            let path = try self.diskPath(disk)
            let attached = ImageFiles.loopAttachments(of: path)
            guard attached.isEmpty else {
                throw ProviderError.conflict(
                    "disk \"\(disk)\" is attached to \(attached.joined(separator: ", ")) (mounted or in use); unmount and detach it before restoring in place")
            }
        }
        let destination = try self.diskPath(newID)
        let temporary = "\(self.disksDirectory)/.\(newID).restore-\(getpid())"
        unlink(temporary)
        let fd = open(source, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ImageFiles.posixError("open snapshot", source) }
        defer { close(fd) }
        do {
            _ = try ImageFiles.clone(source: fd, to: temporary, allowReflink: self.reflinkSupported)
            try ImageFiles.fsyncPath(temporary)
            guard rename(temporary, destination) == 0 else { throw ImageFiles.posixError("rename", destination) }
            try ImageFiles.fsyncPath(self.disksDirectory, directory: true)
        } catch {
            unlink(temporary)
            throw error
        }
        return newID
    }

    /// Recomputes each disk snapshot's checksum and compares it with the one
    /// recorded when the group was sealed.
    public func verify(_ groupID: String) async throws -> [(disk: String, recorded: String?, actual: String)] {
        let provider = self
        return try await DedicatedThread.run(name: "quiesce-local-verify") {
            let group = try provider.readGroup(groupID)
            return try group.disks.map { disk in
                (disk.diskID, disk.sha256, try ImageFiles.sparseDigest(path: provider.snapshotPath(group: groupID, disk: disk.diskID)))
            }
        }
    }

    // MARK: files

    func readGroup(_ id: String) throws -> SnapshotGroup {
        try Self.validateName(id, what: "group id")
        let path = "\(self.snapshotsDirectory)/\(id)/group.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ProviderError.notFound("no snapshot group \"\(id)\" in \(self.snapshotsDirectory)")
        }
        do {
            return try Self.decoder.decode(SnapshotGroup.self, from: data)
        } catch {
            throw ProviderError.permanent("\(path): expected a snapshot group (JSON), found something unreadable: \(error)")
        }
    }

    /// Writes group.json atomically (a temporary file renamed over it); `durable` also
    /// fsyncs the file and its directory.
    func writeGroup(_ group: SnapshotGroup, directory: String, durable: Bool = true) throws {
        let path = directory + "/group.json"
        let temporary = path + ".tmp"
        do {
            try Self.encoder.encode(group).write(to: URL(fileURLWithPath: temporary))
            if durable { try ImageFiles.fsyncPath(temporary) }
        } catch let error as ProviderError {
            throw error
        } catch {
            throw ProviderError.permanent("\(temporary): cannot write: \(error)")
        }
        guard rename(temporary, path) == 0 else { throw ImageFiles.posixError("rename", path) }
        if durable { try ImageFiles.fsyncPath(directory, directory: true) }
    }

    /// Times with milliseconds (`2026-12-07T02:30:00.123Z`): groups made within one second still
    /// sort by age (retention keeps "the newest"). Files written before, in whole seconds, still read.
    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            try container.encode(formatter.string(from: date))
        }
        return encoder
    }()

    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .custom { decoder in
            let container = try decoder.singleValueContainer()
            let text = try container.decode(String.self)
            let fractional = ISO8601DateFormatter()
            fractional.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            guard let date = fractional.date(from: text) ?? ISO8601DateFormatter().date(from: text) else {
                throw DecodingError.dataCorruptedError(in: container, debugDescription: "expected an ISO 8601 time, found \"\(text)\"")
            }
            return date
        }
        return decoder
    }()

    static func validateName(_ value: String, what: String) throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        guard !value.isEmpty, value.count <= 128, !value.hasPrefix("."), value.allSatisfy(allowed.contains) else {
            throw ProviderError.permanent("expected a \(what) of 1–128 characters from [A-Za-z0-9-_.] not starting with '.', found \"\(value)\"")
        }
    }

    static func micros(_ duration: Duration) -> UInt64 { UInt64(max(duration.nanoseconds / 1000, 0)) }

    /// Tries a reflink between two scratch files in the pool.
    static func probeReflink(in pool: String) -> Bool {
        let a = "\(pool)/.reflink-probe-\(getpid())-a"
        let b = "\(pool)/.reflink-probe-\(getpid())-b"
        defer { unlink(a); unlink(b) }
        let source = open(a, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard source >= 0 else { return false }
        defer { close(source) }
        _ = "probe".withCString { write(source, $0, 5) }
        let target = open(b, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard target >= 0 else { return false }
        defer { close(target) }
        return quiesce_ficlone(target, source) == 0
    }
}

/// A local create between arming and its end: the sources and the targets are open and the
/// partial directory exists; `capture` clones (the frozen window's whole share), `finish`
/// counts, writes group.json and renames the directory into place.
final class LocalArmedCreate: ArmedCreate, @unchecked Sendable {
    struct Pair {
        var disk: String
        var source: Int32
        var target: Int32
    }

    let provider: LocalProvider
    let request: CreateGroupRequest
    let id: String
    let partial: String
    let existing: SnapshotGroup?
    private let lock = NSLock()
    private var pairs: [Pair]
    /// What the capture cut: each disk's clone and how long it took, and the span of them all (µs).
    private var captured: (clones: [(clone: ImageFiles.CloneResult, us: UInt64)], spanUs: UInt64)?
    private var ended = false
    /// The capture's thread, waiting from arming on (the coordinator's creates): inside the window nothing is created.
    private let standby: StandbyThread?

    init(provider: LocalProvider, request: CreateGroupRequest, id: String, partial: String, pairs: [Pair], existing: SnapshotGroup?,
         standby: Bool) {
        self.standby = standby && existing == nil ? StandbyThread(name: "quiesce-local-capture") : nil
        self.provider = provider
        self.request = request
        self.id = id
        self.partial = partial
        self.pairs = pairs
        self.existing = existing
    }

    deinit { self.closeAll() }

    func capture() async throws {
        if let standby = self.standby {
            try await standby.run { try self.captureBlocking() }
        } else {
            try await DedicatedThread.run(name: "quiesce-local-capture") { try self.captureBlocking() }
        }
    }

    func finish() async throws -> SnapshotGroup {
        try await DedicatedThread.run(name: "quiesce-local-finish") { try self.finishBlocking() }
    }

    func abandon() async {
        _ = try? await DedicatedThread.run(name: "quiesce-local-abandon") { self.abandonBlocking() }
    }

    /// Inside the frozen window: one clone per disk, nothing else.
    func captureBlocking() throws {
        try self.lock.withLock {
            guard self.existing == nil else { return }
            guard !self.ended, self.captured == nil else { throw ProviderError.permanent("group \(self.id): captured once already") }
            let clock = ContinuousClock()
            let first = clock.now
            var clones: [(clone: ImageFiles.CloneResult, us: UInt64)] = []
            for pair in self.pairs {
                let began = clock.now
                let clone = try ImageFiles.clone(source: pair.source, into: pair.target, path: "\(self.partial)/\(pair.disk).img",
                                                 allowReflink: self.provider.reflinkSupported)
                clones.append((clone, LocalProvider.micros(clock.now - began)))
            }
            self.captured = (clones, LocalProvider.micros(clock.now - first))
        }
    }

    /// After the thaw: what the clones hold, the group file, the rename that makes the group.
    func finishBlocking() throws -> SnapshotGroup {
        try self.lock.withLock {
            if let existing = self.existing { return existing }
            guard !self.ended, let captured = self.captured else {
                throw ProviderError.permanent("group \(self.id): nothing was captured to finish")
            }
            defer { self.ended = true; self.closeAllLocked(); self.standby?.release() }
            do {
                var disks: [DiskSnapshot] = []
                for (pair, (clone, us)) in zip(self.pairs, captured.clones) {
                    // A reflink's data is counted from the clone, now that nothing is frozen.
                    let data = clone.method == .reflink ? try ImageFiles.dataBytes(pair.target, size: clone.sizeBytes) : clone.dataBytes
                    disks.append(DiskSnapshot(
                        diskID: pair.disk, snapshotID: "\(self.id)/\(pair.disk)", sizeBytes: clone.sizeBytes,
                        dataBytes: data, method: clone.method, durationUs: us))
                }
                let group = SnapshotGroup(
                    id: self.id, provider: self.provider.kind, idempotencyToken: self.request.idempotencyToken,
                    description: self.request.description, tags: self.request.tags, state: .pending, createdAt: Date(),
                    spanUs: captured.spanUs, disks: disks)
                // No fsync (see LocalProvider): the seal makes the clones and this file durable.
                try self.provider.writeGroup(group, directory: self.partial, durable: false)
                let final = "\(self.provider.snapshotsDirectory)/\(self.id)"
                guard rename(self.partial, final) == 0 else { throw ImageFiles.posixError("rename", final) }
                return group
            } catch {
                try? FileManager.default.removeItem(atPath: self.partial)
                throw error
            }
        }
    }

    func abandonBlocking() {
        self.standby?.release()
        self.lock.withLock {
            guard !self.ended else { return }
            self.ended = true
            self.closeAllLocked()
            if self.existing == nil { try? FileManager.default.removeItem(atPath: self.partial) }
        }
    }

    private func closeAll() { self.lock.withLock { self.closeAllLocked() } }

    private func closeAllLocked() {
        for pair in self.pairs {
            close(pair.source)
            if pair.target >= 0 { close(pair.target) }
        }
        self.pairs = []
    }
}
