import Foundation
import QuiesceCore
import QuiesceLocalProvider
import QuiesceTestSupport
import Testing

/// Writes `count` bytes of random data at `offset` of `path` (the rest stays a hole).
/// Opened O_CLOEXEC (Foundation's FileHandle is inheritable): a long-lived child another
/// test spawns meanwhile would keep the file — and its mount — busy ("umount: target is busy").
func writeRandom(_ path: String, offset: Int, count: Int) throws {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw CommandFailed(description: "cannot open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    let random = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/dev/urandom"))
    defer { try? random.close() }
    let bytes = try random.read(upToCount: count) ?? Data()
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, bytes.count - done, off_t(offset + done)) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw CommandFailed(description: "cannot write \(path): \(String(cString: strerror(errno)))") }
        done += n
    }
}

/// A 64 MiB sparse disk image with 8 MiB of data in two extents.
/// The same from async code, on a thread of its own (reading /dev/urandom is slow on a loaded machine).
func writeRandom(_ path: String, offset: Int, count: Int) async throws {
    try await blocking { try writeRandom(path, offset: offset, count: count) }
}

func makeDisk(_ provider: LocalProvider, _ id: String) async throws -> String {
    let path = try provider.diskPath(id)
    FileManager.default.createFile(atPath: path, contents: nil)
    try await run("truncate", "-s", "64M", path)
    try await writeRandom(path, offset: 0, count: 4 << 20)
    try await writeRandom(path, offset: 32 << 20, count: 4 << 20)
    return path
}

func sameBytes(_ a: String, _ b: String) async -> Bool { (try? await run("cmp", "-s", a, b)) != nil }

func allocatedBytes(_ path: String) -> UInt64 {
    var info = stat()
    stat(path, &info)
    return UInt64(info.st_blocks) * 512
}

@Suite("Local provider", .enabled(if: LoopDevices.available, "needs root for loop devices"), .serialized)
struct LocalProviderTests {
    /// Exercises one pool end to end; `expected` is the method its filesystem allows.
    func exercise(pool: String, expected: SnapshotMethod, loops: LoopDevices) async throws {
        let provider = try LocalProvider(pool: pool)
        #expect(provider.reflinkSupported == (expected == .reflink))
        #expect(provider.usesSlowPath == (expected == .sparseCopy))
        #expect(provider.capabilities.pointInTimeFixedOnReturn && !provider.capabilities.atomicMultiDiskGroup)
        let root = try await makeDisk(provider, "root")
        let data = try await makeDisk(provider, "data")

        let request = CreateGroupRequest(disks: ["root", "data"], tags: ["instance": "i-1", "level": "FsConsistent"], idempotencyToken: "run-1/i-1")
        let group = try await provider.createGroup(request)
        #expect(group.state == .pending)
        #expect(group.disks.map(\.diskID) == ["root", "data"])
        #expect(group.disks.allSatisfy { $0.method == expected && $0.sizeBytes == 64 << 20 && $0.dataBytes == 8 << 20 })
        let rootSnapshot = provider.snapshotPath(group: group.id, disk: "root")
        #expect(await sameBytes(root, rootSnapshot))
        #expect(await sameBytes(data, provider.snapshotPath(group: group.id, disk: "data")))
        #expect(allocatedBytes(rootSnapshot) < 16 << 20, "holes must stay holes")

        // Ready: durable, with checksums; verify agrees.
        let ready = try await provider.waitUntilReady(group.id, timeout: .seconds(60))
        #expect(ready.state == .ready)
        #expect(ready.disks.allSatisfy { $0.sha256?.count == 64 })
        #expect(try await provider.verify(group.id).allSatisfy { $0.recorded == $0.actual })

        // The snapshot is a point in time: later writes to the disk do not reach it.
        try await writeRandom(root, offset: 8 << 20, count: 1 << 20)
        #expect(await !sameBytes(root, rootSnapshot))
        #expect(try await provider.verify(group.id).allSatisfy { $0.recorded == $0.actual })

        // Idempotent: the same token returns the same group and makes nothing new.
        let again = try await provider.createGroup(request)
        #expect(again.id == group.id && again.state == .ready)
        #expect(try await provider.list(tags: [:]).count == 1)
        #expect(try await provider.list(tags: ["instance": "i-1"]).map(\.id) == [group.id])
        #expect(try await provider.list(tags: ["instance": "i-2"]).isEmpty)

        // Restore as a new disk, then in place (refused while attached).
        let restored = try await provider.restore(group.id, disk: "root", to: .newDisk("root-restored"))
        #expect(await sameBytes(try provider.diskPath(restored), rootSnapshot))
        await #expect(throws: ProviderError.self) { try await provider.restore(group.id, disk: "root", to: .newDisk("root-restored")) }
        let device = try await loops.attach(root)
        do {
            _ = try await provider.restore(group.id, disk: "root", to: .inPlace)
            Issue.record("restored in place over an attached disk")
        } catch let error as ProviderError {
            #expect(error.description.contains(device))
        }
        try await loops.detach(device)
        #expect(try await provider.restore(group.id, disk: "root", to: .inPlace) == "root")
        #expect(await sameBytes(root, rootSnapshot))

        // A tampered snapshot fails verification.
        try await writeRandom(rootSnapshot, offset: 100, count: 16)
        let results = try await provider.verify(group.id)
        #expect(results.first { $0.disk == "root" }.map { $0.recorded != $0.actual } == true)
        #expect(results.first { $0.disk == "data" }.map { $0.recorded == $0.actual } == true)

        try await provider.delete(group.id)
        #expect(try await provider.list(tags: [:]).isEmpty)
        await #expect(throws: ProviderError.self) { try await provider.describe(group.id) }

        try await self.armed(provider, root: root, data: data, expected: expected)
    }

    /// The create the coordinator makes: armed unfrozen, captured in the window, finished after the thaw.
    func armed(_ provider: LocalProvider, root: String, data: String, expected: SnapshotMethod) async throws {
        let snapshots = provider.snapshotsDirectory
        func entries() -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: snapshots)) ?? []).sorted() }
        let request = CreateGroupRequest(disks: ["root", "data"], idempotencyToken: "run-2/i-1")
        let id = LocalProvider.groupID(forToken: request.idempotencyToken)

        // Arming makes the partial group and its empty targets; nothing is a group yet.
        let armed = try await provider.armCreate(request)
        #expect(entries() == [".\(id).partial"])
        let partial = "\(snapshots)/.\(id).partial"
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: partial)) ?? []).sorted() == ["data.img", "root.img"])
        #expect(allocatedBytes("\(partial)/root.img") == 0)
        await #expect(throws: ProviderError.self) { try await provider.describe(id) }

        // The capture is the point in time: a write after it (the thaw) is not in the group finish makes.
        let before = root + ".before"
        try await run("cp", "--sparse=always", root, before)
        defer { unlink(before) }
        try await armed.capture()
        try await writeRandom(root, offset: 4 << 20, count: 1 << 20)
        let group = try await armed.finish()
        #expect(group.id == id && group.state == .pending)
        #expect(group.disks.allSatisfy { $0.method == expected && $0.sizeBytes == 64 << 20 && $0.dataBytes == 8 << 20 })
        #expect(await sameBytes(before, provider.snapshotPath(group: id, disk: "root")))
        #expect(await !sameBytes(root, provider.snapshotPath(group: id, disk: "root")))
        #expect(await sameBytes(data, provider.snapshotPath(group: id, disk: "data")))
        #expect(entries() == [id])
        #expect(try await provider.describe(id).disks == group.disks)
        await #expect(throws: ProviderError.self) { try await armed.finish() }

        // Abandoned (the freeze failed): nothing is left, and the token can be taken again.
        let again = CreateGroupRequest(disks: ["root"], idempotencyToken: "run-3/i-1")
        let dropped = try await provider.armCreate(again)
        await dropped.abandon()
        #expect(entries() == [id])
        await #expect(throws: ProviderError.self) { try await dropped.finish() }
        // A disk that is not there fails at arming, before anything would be frozen, and leaves nothing.
        await #expect(throws: ProviderError.self) { try await provider.armCreate(CreateGroupRequest(disks: ["root", "absent"], idempotencyToken: "run-4/i-1")) }
        #expect(entries() == [id])
        // Armed for a token whose group exists: the existing group, nothing cloned.
        let same = try await provider.armCreate(request)
        try await same.capture()
        let existing = try await same.finish()
        #expect(existing.id == id && existing.disks == group.disks)
        try await provider.delete(id)
    }

    @Test("an XFS reflink pool snapshots, verifies, restores and deletes by reflink")
    func xfsReflinkPool() async throws {
        try await withLoopDevices { loops in
            let pool = try await loops.mount("pool", fsType: "xfs", sizeMiB: 512, mkfsOptions: ["-m", "reflink=1"])
            try await self.exercise(pool: pool.mountPoint, expected: .reflink, loops: loops)
        }
    }

    @Test("an ext4 pool takes the sparse-copy path and keeps holes")
    func ext4CopyPool() async throws {
        try await withLoopDevices { loops in
            let pool = try await loops.mount("pool", fsType: "ext4", sizeMiB: 400)
            try await self.exercise(pool: pool.mountPoint, expected: .sparseCopy, loops: loops)
        }
    }

    @Test("bad requests get clear errors and leave nothing behind")
    func badRequests() async throws {
        try await withLoopDevices { loops in
            let provider = try LocalProvider(pool: loops.directory + "/plain-pool")
            _ = try await makeDisk(provider, "one")
            for (request, text) in [
                (CreateGroupRequest(disks: ["missing"], idempotencyToken: "t1"), "open disk"),
                (CreateGroupRequest(disks: ["one", "one"], idempotencyToken: "t2"), "listed twice"),
                (CreateGroupRequest(disks: ["../etc/passwd"], idempotencyToken: "t3"), "expected a disk id"),
                (CreateGroupRequest(disks: [], idempotencyToken: "t4"), "at least one disk"),
                (CreateGroupRequest(disks: ["one"], idempotencyToken: ""), "idempotency token"),
            ] {
                do {
                    _ = try await provider.createGroup(request)
                    Issue.record("accepted \(request)")
                } catch let error as ProviderError {
                    #expect(error.description.contains(text), "\(error)")
                }
            }
            #expect(try FileManager.default.contentsOfDirectory(atPath: provider.snapshotsDirectory).isEmpty)
            await #expect(throws: ProviderError.self) { try await provider.restore("lg-nope", disk: "one", to: .inPlace) }
        }
    }
}

/// The check later work uses to test level claims: an ext4 image cloned while
/// its filesystem is frozen has a clean journal; cloned while mounted and
/// unfrozen, it needs recovery.
@Suite("Honesty", .enabled(if: LoopDevices.available, "needs root for loop devices"))
struct HonestyTests {
    func needsRecovery(_ image: String) async throws -> Bool {
        let header = try await run("dumpe2fs", "-h", image)
        let features = header.split(separator: "\n").first { $0.hasPrefix("Filesystem features:") } ?? ""
        return features.contains("needs_recovery")
    }

    @Test("an ext4 clone taken while frozen has no needs_recovery; one taken while written to has it")
    func needsRecoveryFlag() async throws {
        try await withLoopDevices { loops in
            let pool = try await loops.mount("pool", fsType: "xfs", sizeMiB: 512, mkfsOptions: ["-m", "reflink=1"])
            let provider = try LocalProvider(pool: pool.mountPoint)
            let image = try provider.diskPath("guest")
            FileManager.default.createFile(atPath: image, contents: nil)
            try await run("truncate", "-s", "96M", image)
            try await run("mkfs.ext4", "-q", "-F", image)
            #expect(try await !self.needsRecovery(image))
            let device = try await loops.attach(image)
            let mountPoint = try await loops.mountDevice(device, at: "guest")
            FileManager.default.createFile(atPath: mountPoint + "/busy", contents: nil)
            try await writeRandom(mountPoint + "/busy", offset: 0, count: 8 << 20)

            let unfrozen = try await provider.createGroup(CreateGroupRequest(disks: ["guest"], idempotencyToken: "unfrozen"))
            #expect(try await self.needsRecovery(provider.snapshotPath(group: unfrozen.id, disk: "guest")))

            try await run("fsfreeze", "--freeze", mountPoint)
            let frozen: SnapshotGroup
            do {
                frozen = try await provider.createGroup(CreateGroupRequest(disks: ["guest"], idempotencyToken: "frozen"))
                try await run("fsfreeze", "--unfreeze", mountPoint)
            } catch {
                try? await run("fsfreeze", "--unfreeze", mountPoint)
                throw error
            }
            #expect(try await !self.needsRecovery(provider.snapshotPath(group: frozen.id, disk: "guest")))
            try await loops.unmount(mountPoint)
        }
    }
}
