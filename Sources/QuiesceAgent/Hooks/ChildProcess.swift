import CQuiesceLinux
import Foundation
import QuiesceCore
import Synchronization

/// The last `cap` bytes of a stream, and whether anything before them was dropped.
struct OutputTail: Sendable {
    let cap: Int
    private(set) var bytes: [UInt8] = []
    private(set) var truncated = false

    init(cap: Int) { self.cap = max(cap, 0) }

    mutating func append(_ chunk: ArraySlice<UInt8>) {
        self.bytes.append(contentsOf: chunk)
        if self.bytes.count > self.cap {
            self.bytes.removeFirst(self.bytes.count - self.cap)
            self.truncated = true
        }
    }
}

/// A hook's process: started from a checked descriptor in a process group of
/// its own, its output read through pipes into capped tails. Every blocking
/// call (poll, waitpid) happens on a dedicated thread.
final class ChildProcess: @unchecked Sendable {
    let pid: Int32
    private let pidfd: Int32
    private var stdoutFD: Int32
    private var stderrFD: Int32
    /// Written to by `interrupt()`: wakes a thread blocked in `pump`.
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let lock = NSLock()
    private(set) var stdout: OutputTail
    private(set) var stderr: OutputTail
    private var pendingLine: [UInt8] = []
    private(set) var exitStatus: Int32?
    let started = ContinuousClock.now

    /// The agent becomes a child subreaper once: a hook's orphans come back to it, so a timeout can end them all.
    private static let subreaper: Void = { _ = quiesce_set_child_subreaper() }()

    enum SpawnError: Error, CustomStringConvertible {
        case failed(String, Int32)
        var description: String {
            switch self {
            case .failed(let what, let code): "\(what): \(String(cString: strerror(code)))"
            }
        }
    }

    /// Starts the script behind `descriptor` (opened and checked by HookInspector).
    init(descriptor: Int32, name: String, arguments: [String], environment: [String], outputCap: Int) throws {
        _ = Self.subreaper
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1], wake: [Int32] = [-1, -1]
        guard quiesce_pipe(&out, 0) == 0 else { throw SpawnError.failed("pipe", errno) }
        guard quiesce_pipe(&err, 0) == 0 else { close(out[0]); close(out[1]); throw SpawnError.failed("pipe", errno) }
        guard quiesce_pipe(&wake, 1) == 0 else {
            [out[0], out[1], err[0], err[1]].forEach { close($0) }
            throw SpawnError.failed("pipe", errno)
        }
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { if null >= 0 { close(null) } }
        // Executed from the descriptor: the kernel runs the script's
        // interpreter on /proc/self/fd/3 (the descriptor, moved to 3 in the child), the very file that was checked.
        let path = "/proc/self/fd/3"
        var pid: Int32 = 0
        let result = withCStrings([name] + arguments) { argv in
            withCStrings(environment) { envp in
                quiesce_spawn(path, argv, envp, descriptor, -1, -1, null, out[1], err[1], 1, &pid)
            }
        }
        close(out[1])
        close(err[1])
        guard result == 0 else {
            [out[0], err[0], wake[0], wake[1]].forEach { close($0) }
            throw SpawnError.failed("could not start \(name)", result)
        }
        self.pid = pid
        self.pidfd = quiesce_pidfd_open(pid)
        self.stdoutFD = out[0]
        self.stderrFD = err[0]
        self.wakeRead = wake[0]
        self.wakeWrite = wake[1]
        self.stdout = OutputTail(cap: outputCap)
        self.stderr = OutputTail(cap: outputCap)
    }

    deinit {
        for fd in [self.stdoutFD, self.stderrFD, self.pidfd, self.wakeRead, self.wakeWrite] where fd >= 0 { close(fd) }
    }

    enum PumpEnd: Equatable { case exited, deadline, interrupted, readyLine }

    /// Wakes a thread blocked in `pump` (cancellation, release).
    func interrupt() {
        var byte: UInt8 = 1
        _ = write(self.wakeWrite, &byte, 1)
    }

    var hasExited: Bool { self.lock.withLock { self.exitStatus != nil } }

    /// Blocks (call on a dedicated thread) reading output until the process
    /// exits and its pipes are drained, `deadline` passes, `interrupt()` is
    /// called, or a line equal to `readyLine` appears on stdout or stderr.
    func pump(until deadline: ContinuousClock.Instant?, readyLine: String? = nil) -> PumpEnd {
        var exitedAt: ContinuousClock.Instant?
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if self.stdoutFD < 0 && self.stderrFD < 0 && self.hasExited { return .exited }
            let now = ContinuousClock.now
            if let exitedAt, now - exitedAt > .milliseconds(100) {
                // Background children still hold the pipes: stop reading them.
                self.closeOutput()
                return .exited
            }
            var timeout: Int32 = -1
            if let deadline {
                if now >= deadline { return .deadline }
                timeout = Int32(min(max((deadline - now).milliseconds, 1), 60_000))
            }
            if exitedAt != nil || (self.pidfd < 0 && !self.hasExited) { timeout = timeout < 0 ? 20 : min(timeout, 20) }
            var fds = [
                pollfd(fd: self.stdoutFD, events: Int16(POLLIN), revents: 0),
                pollfd(fd: self.stderrFD, events: Int16(POLLIN), revents: 0),
                pollfd(fd: self.hasExited ? -1 : self.pidfd, events: Int16(POLLIN), revents: 0),
                pollfd(fd: self.wakeRead, events: Int16(POLLIN), revents: 0),
            ]
            let ready = poll(&fds, nfds_t(fds.count), timeout)
            if ready < 0 {
                if errno == EINTR { continue }
                return .interrupted
            }
            if fds[3].revents != 0 {
                var byte: UInt8 = 0
                while read(self.wakeRead, &byte, 1) == 1 {}
                return .interrupted
            }
            for (index, isStdout) in [(0, true), (1, false)] where fds[index].revents != 0 {
                let fd = isStdout ? self.stdoutFD : self.stderrFD
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 {
                    close(fd)
                    if isStdout { self.stdoutFD = -1 } else { self.stderrFD = -1 }
                    continue
                }
                let chunk = buffer[0..<n]
                self.lock.withLock {
                    if isStdout { self.stdout.append(chunk) } else { self.stderr.append(chunk) }
                }
                if let readyLine, self.scanLines(chunk, for: readyLine) { return .readyLine }
            }
            if fds[2].revents != 0 || (self.pidfd < 0 && !self.hasExited) {
                if self.reap(block: self.pidfd >= 0) { exitedAt = .now }
            }
        }
    }

    /// Looks for `line` among complete lines (stdout and stderr share one scanner: either may carry the signal).
    private func scanLines(_ chunk: ArraySlice<UInt8>, for line: String) -> Bool {
        let wanted = Array(line.utf8)
        var found = false
        for byte in chunk {
            if byte == UInt8(ascii: "\n") {
                var current = self.pendingLine
                if current.last == UInt8(ascii: "\r") { current.removeLast() }
                if current == wanted { found = true }
                self.pendingLine.removeAll(keepingCapacity: true)
            } else if self.pendingLine.count < 4096 {
                self.pendingLine.append(byte)
            }
        }
        return found
    }

    /// waitpid for the hook itself. True once it has been reaped.
    @discardableResult
    func reap(block: Bool) -> Bool {
        if self.hasExited { return true }
        var status: Int32 = 0
        while true {
            let r = waitpid(self.pid, &status, block ? 0 : WNOHANG)
            if r == self.pid {
                self.lock.withLock { self.exitStatus = status }
                return true
            }
            if r < 0 && errno == EINTR { continue }
            return false
        }
    }

    private func closeOutput() {
        if self.stdoutFD >= 0 { close(self.stdoutFD); self.stdoutFD = -1 }
        if self.stderrFD >= 0 { close(self.stderrFD); self.stderrFD = -1 }
    }

    /// Sends `signal` to the whole process group (the hook and everything it started that stayed in the group).
    func signalGroup(_ signal: Int32) {
        _ = kill(-self.pid, signal)
    }

    /// SIGKILLs the group and reaps it, orphans included (blocking: dedicated thread).
    func killGroupAndReap() {
        self.signalGroup(SIGKILL)
        self.reap(block: true)
        self.closeOutput()
        self.reapGroup(wait: .seconds(2))
    }

    /// Reaps what is left of the group (re-parented to us as the subreaper) until none is left or `wait` passes.
    func reapGroup(wait: Duration) {
        let until = ContinuousClock.now + wait
        var status: Int32 = 0
        while ContinuousClock.now < until {
            while waitpid(-self.pid, &status, WNOHANG) > 0 {}
            if kill(-self.pid, 0) != 0 && errno == ESRCH { return }
            usleep(5000)
        }
    }

    /// Whether any process of the group is still running.
    var groupAlive: Bool { kill(-self.pid, 0) == 0 }

    /// Exit code or signal from the wait status.
    var exit: (exited: Bool, code: Int32, signal: Int32)? {
        guard let status = self.lock.withLock({ self.exitStatus }) else { return nil }
        let signal = status & 0x7f
        if signal == 0 { return (true, (status >> 8) & 0xff, 0) }
        return (false, 0, signal)
    }

    var elapsedMicros: UInt64 { UInt64(max((ContinuousClock.now - self.started).nanoseconds / 1000, 0)) }
}
