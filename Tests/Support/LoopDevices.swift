import Foundation
import QuiesceCore

/// Real filesystems on loop devices for tests (root only). Everything made is
/// undone by `cleanUp()`, which tests call from `defer`, so a failing test
/// leaves no mount or loop device behind.
public final class LoopDevices: @unchecked Sendable {
    public let directory: String
    private var mounts: [String] = []
    private var devices: [String] = []

    public static var available: Bool { getuid() == 0 }

    public init() throws {
        self.directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-loop-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
    }

    /// Makes an image with `fsType` and mounts it at `name` under the scratch directory.
    @discardableResult
    public func mount(_ name: String, fsType: String, sizeMiB: Int, options: [String] = [], mkfsOptions: [String] = []) throws -> (mountPoint: String, device: String) {
        let image = "\(self.directory)/\(name).img"
        let mountPoint = "\(self.directory)/\(name)"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try run("truncate", "-s", "\(sizeMiB)M", image)
        switch fsType {
        case "xfs": try run("mkfs.xfs", "-q", "-f", mkfsOptions, image)
        default: try run("mkfs.\(fsType)", "-q", "-F", mkfsOptions, image)
        }
        let device = try run("losetup", "--find", "--show", image).trimmingCharacters(in: .whitespacesAndNewlines)
        self.devices.append(device)
        try run("mount", options.isEmpty ? [] : ["-o", options.joined(separator: ",")], device, mountPoint)
        self.mounts.append(mountPoint)
        return (mountPoint, device)
    }

    public func bind(_ source: String, at name: String) throws -> String {
        let target = "\(self.directory)/\(name)"
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        try run("mount", "--bind", source, target)
        self.mounts.append(target)
        return target
    }

    public func tmpfs(at name: String) throws -> String {
        let target = "\(self.directory)/\(name)"
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        try run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", target)
        self.mounts.append(target)
        return target
    }

    public func cleanUp() {
        // Thaw first: a test that failed while frozen must not leave a frozen
        // filesystem behind (EINVAL from a mount that is not frozen is fine).
        for mount in self.mounts.reversed() { _ = try? run("fsfreeze", "--unfreeze", mount) }
        for mount in self.mounts.reversed() { _ = try? run("umount", "-l", mount) }
        for device in self.devices.reversed() { _ = try? run("losetup", "-d", device) }
        self.mounts = []
        self.devices = []
        try? FileManager.default.removeItem(atPath: self.directory)
    }
}

/// Attaches an existing image to a loop device (detached by `cleanUp`).
extension LoopDevices {
    public func attach(_ image: String) throws -> String {
        let device = try run("losetup", "--find", "--show", image).trimmingCharacters(in: .whitespacesAndNewlines)
        self.devices.append(device)
        return device
    }

    /// Detaches and waits until the kernel has let go: while anything still
    /// has the device open, LOOP_CLR_FD only marks it for auto-clear.
    public func detach(_ device: String) throws {
        try run("losetup", "-d", device)
        self.devices.removeAll { $0 == device }
        let backing = "/sys/block/\((device as NSString).lastPathComponent)/loop/backing_file"
        for _ in 0..<200 where FileManager.default.fileExists(atPath: backing) { usleep(10_000) }
    }

    public func mountDevice(_ device: String, at name: String, options: [String] = []) throws -> String {
        let target = "\(self.directory)/\(name)"
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        try run("mount", options.isEmpty ? [] : ["-o", options.joined(separator: ",")], device, target)
        self.mounts.append(target)
        return target
    }

    public func unmount(_ target: String) throws {
        try run("umount", target)
        self.mounts.removeAll { $0 == target }
    }
}

/// Runs a command (arguments may be strings or arrays of strings) and returns
/// its output; throws with the output when it exits non-zero.
@discardableResult
public func run(_ arguments: Any...) throws -> String {
    try runFlat(arguments.flatMap { ($0 as? [String]) ?? [String(describing: $0)] })
}

/// The same from async code, on a thread of its own: a test waiting for a
/// child on the cooperative pool starves every task in the process — the
/// engine's and the agent's included (their heartbeats, their freeze
/// watchdog's inputs). Swift prefers this overload in async contexts, so an
/// async test cannot block the pool by accident.
@discardableResult
public func run(_ arguments: Any...) async throws -> String {
    let flat = arguments.flatMap { ($0 as? [String]) ?? [String(describing: $0)] }
    return try await blocking { try runFlat(flat) }
}

private func runFlat(_ flat: [String]) throws -> String {
    let finished = try ChildProcess.run(flat)
    guard finished.status == 0 else {
        throw CommandFailed(description: "\(flat.joined(separator: " ")) exited \(finished.status): \(finished.output)")
    }
    return finished.output
}

public struct CommandFailed: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

/// Runs blocking set-up (mkfs, mount, losetup) on a thread of its own, so
/// tests running in parallel do not starve Swift's cooperative pool — which
/// the engine and agent under test depend on for their heartbeats.
public func blocking<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await DedicatedThread.run(name: "test-blocking", work)
}

/// Runs `body` with fresh loop devices and cleans them up afterwards (thaw,
/// unmount, detach) on a thread of its own — also when `body` throws.
public func withLoopDevices<T: Sendable>(_ body: (LoopDevices) async throws -> T) async throws -> T {
    let loops = try LoopDevices()
    let value: T
    do {
        value = try await body(loops)
    } catch {
        _ = try? await blocking { loops.cleanUp() }
        throw error
    }
    _ = try? await blocking { loops.cleanUp() }
    return value
}

/// A process that writes to a file: it blocks while the filesystem is frozen.
///
/// A thread of its own waits for it (waitpid) and notes the instant it exited,
/// so a measured thaw latency does not include the time a busy cooperative
/// pool takes to notice.
public final class Writer: @unchecked Sendable {
    public let pid: pid_t
    public let started = ContinuousClock.now
    private let lock = NSLock()
    private var exitedAt: ContinuousClock.Instant?

    public init(_ path: String) throws {
        var pid: pid_t = 0
        let arguments = ["/bin/sh", "-c", "echo written > '\(path)'"]
        var pointers: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for pointer in pointers { free(pointer) } }
        let result = posix_spawn(&pid, "/bin/sh", nil, nil, &pointers, environ)
        guard result == 0 else { throw CommandFailed(description: "cannot start the writer: \(String(cString: strerror(result)))") }
        self.pid = pid
        let child = pid
        let thread = Thread { [lock] in
            var status: Int32 = 0
            while waitpid(child, &status, 0) < 0 && errno == EINTR {}
            let now = ContinuousClock.now
            lock.withLock { self.exitedAt = now }
        }
        thread.stackSize = 1 << 18
        thread.start()
    }

    /// Whether the write has not completed yet.
    public var isRunning: Bool { self.lock.withLock { self.exitedAt == nil } }

    /// Waits up to `limit` for the writer to finish; returns when it did (nil: still blocked).
    public func finished(within limit: Duration) async -> ContinuousClock.Instant? {
        let until = ContinuousClock.now + limit
        while ContinuousClock.now < until {
            if let exitedAt = self.lock.withLock({ self.exitedAt }) { return exitedAt }
            try? await Task.sleep(for: .milliseconds(1))
        }
        return self.lock.withLock { self.exitedAt }
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
public func processExists(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    // A zombie is gone for our purposes.
    let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
    return !stat.contains(") Z ")
}

/// Awaits `work` for at most `limit`: its value, or nil when it had not finished
/// by then (it is left running). For calls that must not hang: a regression
/// then fails the test instead of stalling the whole run.
public func within<T: Sendable>(_ limit: Duration, _ work: @escaping @Sendable () async -> T) async -> T? {
    let box = ResultBox<T>()
    let task = Task { box.set(await work()) }
    let deadline = ContinuousClock.now + limit
    while ContinuousClock.now < deadline {
        if let value = box.value { return value }
        try? await Task.sleep(for: .milliseconds(10))
    }
    _ = task
    return box.value
}

private final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T?
    func set(_ value: T) { self.lock.withLock { self.stored = value } }
    var value: T? { self.lock.withLock { self.stored } }
}

/// The same steps from async code, each on a thread of its own (see
/// `run(_:) async`): Swift picks these in async contexts, so a test cannot
/// run mkfs, mount or losetup on the cooperative pool by accident.
extension LoopDevices {
    @discardableResult
    public func mount(_ name: String, fsType: String, sizeMiB: Int, options: [String] = [], mkfsOptions: [String] = []) async throws -> (mountPoint: String, device: String) {
        try await blocking { try self.mount(name, fsType: fsType, sizeMiB: sizeMiB, options: options, mkfsOptions: mkfsOptions) }
    }

    public func bind(_ source: String, at name: String) async throws -> String {
        try await blocking { try self.bind(source, at: name) }
    }

    public func tmpfs(at name: String) async throws -> String {
        try await blocking { try self.tmpfs(at: name) }
    }

    public func attach(_ image: String) async throws -> String {
        try await blocking { try self.attach(image) }
    }

    public func detach(_ device: String) async throws {
        try await blocking { try self.detach(device) }
    }

    public func mountDevice(_ device: String, at name: String, options: [String] = []) async throws -> String {
        try await blocking { try self.mountDevice(device, at: name, options: options) }
    }

    public func unmount(_ target: String) async throws {
        try await blocking { try self.unmount(target) }
    }
}

/// Writes a script or other file that a test is about to execute. The file is
/// never open for writing in this process: the text goes to a scratch file in
/// the temp directory and `install` (a child) copies it into place. Any
/// descriptor this process holds for writing — even O_CLOEXEC — is copied into
/// every child another test forks meanwhile until that child execs, and
/// executing the script then fails with ETXTBSY ("could not start lock: Text
/// file busy" in the holds test, once in 40 runs after the O_CLOEXEC fix).
public func writeExecutable(_ path: String, _ text: String, mode: mode_t = 0o700) throws {
    let source = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-exec-\(UUID().uuidString)").path
    let fd = open(source, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
    guard fd >= 0 else { throw CommandFailed(description: "cannot create \(source): \(String(cString: strerror(errno)))") }
    defer { unlink(source) }
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else {
            close(fd)
            throw CommandFailed(description: "cannot write \(source): \(String(cString: strerror(errno)))")
        }
        bytes = bytes.dropFirst(written)
    }
    close(fd)
    // install replaces whatever is at `path` (a symlink included) with a new file of this mode.
    unlink(path)
    try run("install", "-m", String(mode, radix: 8), source, path)
}
