import CQuiesceLinux
import Foundation
import QuiesceCore

/// One `quiesce-plugin-host` process with one plugin loaded in it.
///
/// The engine never loads a plugin into itself: a plugin that crashes, hangs
/// or scribbles over its memory takes only this process down. Every call has a
/// timeout; at the timeout the host's process group is killed (SIGKILL) and
/// reaped, and the call fails with `timed-out`. All pipe I/O and waiting runs
/// on a dedicated thread, never on Swift's cooperative pool (invariant 9).
final class PluginHostProcess: @unchecked Sendable {
    struct Hello: Sendable {
        var abiVersion: UInt32
        var structSize: UInt32
        var info: [UInt8]
    }

    enum Reply: Sendable {
        case plan([UInt8])
        case refused(String)
    }

    static let maxFrame = 16 << 20
    static let stderrTailBytes = 4096

    let path: String
    private let pid: Int32
    private let input: Int32   // we write requests here
    private let output: Int32  // we read replies here
    private let errors: Int32  // the host's (and plugin's) stderr
    private let lock = NSLock()
    private var stderrTail: [UInt8] = []
    private var exited = false

    private init(path: String, pid: Int32, input: Int32, output: Int32, errors: Int32) {
        self.path = path
        self.pid = pid
        self.input = input
        self.output = output
        self.errors = errors
    }

    deinit {
        if !self.exited {
            kill(-self.pid, SIGKILL)
            var status: Int32 = 0
            waitpid(self.pid, &status, 0)
        }
        close(self.input)
        close(self.output)
        close(self.errors)
    }

    var isAlive: Bool { self.lock.withLock { !self.exited } }

    /// Starts a host for `pluginPath` and reads its hello (the plugin's info, or why it did not load).
    static func start(executable: String, pluginPath: String, timeout: Duration) async throws -> (PluginHostProcess, Hello) {
        // Writing to a host that died must fail with EPIPE, not end the engine (or whatever embeds the registry).
        BrokenPipes.ignoreSignal()
        return try await DedicatedThread.run(name: "quiesce-plugin-host") {
            var toHost: [Int32] = [-1, -1], fromHost: [Int32] = [-1, -1], errors: [Int32] = [-1, -1]
            guard quiesce_pipe(&toHost, 0) == 0, quiesce_pipe(&fromHost, 0) == 0, quiesce_pipe(&errors, 0) == 0 else {
                let code = errno
                for fd in toHost + fromHost + errors where fd >= 0 { close(fd) }
                throw PluginError(.hostFailed, path: pluginPath, "cannot make pipes: \(String(cString: strerror(code)))")
            }
            var pid: Int32 = 0
            // The Swift runtime's crash handler (linked into the host by SwiftPM, loaded by
            // any Swift plugin) would catch a plugin's SIGSEGV and spend seconds on a
            // backtrace; a crash must end the host at once and be reported as a signal.
            var variables = ProcessInfo.processInfo.environment
            variables["SWIFT_BACKTRACE"] = "enable=no"
            let environment = variables.map { "\($0.key)=\($0.value)" }
            let result = withCStrings(["quiesce-plugin-host", pluginPath]) { argv in
                withCStrings(environment) { envp in
                    quiesce_spawn(executable, argv, envp, -1, -1, -1, toHost[0], fromHost[1], errors[1], 1, &pid)
                }
            }
            close(toHost[0])
            close(fromHost[1])
            close(errors[1])
            guard result == 0 else {
                close(toHost[1]); close(fromHost[0]); close(errors[0])
                throw PluginError(.hostFailed, path: pluginPath,
                                  "cannot start the plugin host \(executable): \(String(cString: strerror(result)))")
            }
            // Our ends must not block: reads are driven by poll with a deadline.
            for fd in [fromHost[0], errors[0]] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
            let host = PluginHostProcess(path: pluginPath, pid: pid, input: toHost[1], output: fromHost[0], errors: errors[0])
            let (kind, payload) = try host.lock.withLock { try host.readFrame(call: "loading", timeout: timeout) }
            switch kind {
            case UInt8(ascii: "H"):
                guard payload.count >= 8 else { throw host.fail(.protocolError, "a hello of \(payload.count) bytes (expected at least 8)") }
                let hello = Hello(abiVersion: Self.u32(payload, 0), structSize: Self.u32(payload, 4), info: Array(payload[8...]))
                return (host, hello)
            case UInt8(ascii: "E"):
                let text = String(decoding: payload, as: UTF8.self)
                let parts = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false)
                host.reap(grace: .seconds(1))
                let code = PluginError.Code(rawValue: String(parts.first ?? "")) ?? .loadFailed
                throw PluginError(code, path: pluginPath, parts.count > 1 ? String(parts[1]) : text)
            default:
                throw host.fail(.protocolError, "a first frame of kind \(kind) (expected H or E)")
            }
        }
    }

    /// Sends a PlanRequest and waits for the plan (or the plugin's refusal) until `timeout`.
    func plan(_ request: [UInt8], timeout: Duration) async throws -> Reply {
        try await DedicatedThread.run(name: "quiesce-plugin-call") {
            try self.lock.withLock {
                guard !self.exited else { throw PluginError(.hostFailed, path: self.path, "the plugin host is no longer running") }
                try self.writeFrame(UInt8(ascii: "P"), request)
                let (kind, payload) = try self.readFrame(call: "plan", timeout: timeout)
                switch kind {
                case UInt8(ascii: "P"): return .plan(payload)
                case UInt8(ascii: "R"): return .refused(String(decoding: payload, as: UTF8.self))
                default: throw self.fail(.protocolError, "a reply frame of kind \(kind) (expected P or R)")
                }
            }
        }
    }

    /// Asks the host to exit and reaps it (SIGKILL after a grace period).
    func stop() async {
        _ = try? await DedicatedThread.run(name: "quiesce-plugin-stop") {
            self.lock.withLock {
                guard !self.exited else { return }
                try? self.writeFrame(UInt8(ascii: "Q"), [])
                self.reap(grace: .milliseconds(500))
            }
        }
    }

    // MARK: - Frames (called with the lock held, on a dedicated thread)

    private func writeFrame(_ kind: UInt8, _ payload: [UInt8]) throws {
        var frame = [kind]
        frame += Self.le(UInt32(payload.count))
        frame += payload
        var offset = 0
        while offset < frame.count {
            let n = frame[offset...].withUnsafeBytes { write(self.input, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                // EPIPE: the host is gone; say how it ended.
                throw self.fail(.crashed, "the host stopped reading (\(String(cString: strerror(errno))))")
            }
            offset += n
        }
    }

    private func readFrame(call: String, timeout: Duration) throws -> (UInt8, [UInt8]) {
        let deadline = ContinuousClock.now + timeout
        let header = try self.readExactly(5, call: call, deadline: deadline, timeout: timeout)
        let length = Int(Self.u32(header, 1))
        guard length <= Self.maxFrame else {
            throw self.fail(.protocolError, "a reply of \(length) bytes (the limit is \(Self.maxFrame))")
        }
        return (header[0], try self.readExactly(length, call: call, deadline: deadline, timeout: timeout))
    }

    private func readExactly(_ count: Int, call: String, deadline: ContinuousClock.Instant, timeout: Duration) throws -> [UInt8] {
        var data: [UInt8] = []
        data.reserveCapacity(count)
        var chunk = [UInt8](repeating: 0, count: 65536)
        while data.count < count {
            let remaining = deadline - .now
            if remaining <= .zero {
                throw self.fail(.timedOut, "\(call) did not answer within \(timeout.milliseconds) ms; its host process was killed")
            }
            let ms = Int32(clamping: remaining.components.seconds * 1000 + Int64(remaining.components.attoseconds / 1_000_000_000_000_000) + 1)
            var fds = [pollfd(fd: self.output, events: Int16(POLLIN), revents: 0), pollfd(fd: self.errors, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 2, ms)
            if ready < 0 {
                if errno == EINTR { continue }
                throw self.fail(.hostFailed, "poll: \(String(cString: strerror(errno)))")
            }
            if fds[1].revents != 0 { self.drainErrors() }
            if fds[0].revents != 0 {
                let want = min(chunk.count, count - data.count)
                let n = chunk.withUnsafeMutableBytes { read(self.output, $0.baseAddress, want) }
                if n > 0 {
                    data += chunk[0..<n]
                } else if n == 0 {
                    throw self.fail(.crashed, "the host ended during \(call)")
                } else if errno != EAGAIN && errno != EINTR {
                    throw self.fail(.crashed, "reading from the host: \(String(cString: strerror(errno)))")
                }
            }
        }
        return data
    }

    private func drainErrors() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(self.errors, $0.baseAddress, $0.count) }
            guard n > 0 else { return }
            self.stderrTail += chunk[0..<n]
            if self.stderrTail.count > Self.stderrTailBytes { self.stderrTail.removeFirst(self.stderrTail.count - Self.stderrTailBytes) }
        }
    }

    /// Kills (if needed) and reaps the host, and returns a PluginError saying how it ended.
    private func fail(_ code: PluginError.Code, _ detail: String) -> PluginError {
        let ending = self.reap(grace: code == .timedOut ? .zero : .seconds(1))
        var text = detail
        if code == .crashed, let ending { text += ": \(ending)" }
        self.drainErrors()
        let tail = String(decoding: self.stderrTail, as: UTF8.self).split(separator: "\n").suffix(3).joined(separator: " | ")
        if !tail.isEmpty { text += " (stderr: \(tail))" }
        return PluginError(code, path: self.path, text)
    }

    /// Waits up to `grace` for the host to exit, then kills its process group; returns how it ended.
    @discardableResult
    private func reap(grace: Duration) -> String? {
        guard !self.exited else { return nil }
        let deadline = ContinuousClock.now + grace
        var status: Int32 = 0
        var result = waitpid(self.pid, &status, WNOHANG)
        while result == 0 && ContinuousClock.now < deadline {
            usleep(5000)
            result = waitpid(self.pid, &status, WNOHANG)
        }
        if result == 0 {
            kill(-self.pid, SIGKILL)
            result = waitpid(self.pid, &status, 0)
            self.exited = true
            return "killed"
        }
        kill(-self.pid, SIGKILL)  // anything the plugin left in the group
        self.exited = true
        guard result == self.pid else { return nil }
        let signal = status & 0x7f
        if signal != 0 { return "killed by signal \(signal) (\(Self.signalName(signal)))" }
        return "exited with status \((status >> 8) & 0xff)"
    }

    static func signalName(_ signal: Int32) -> String {
        switch signal {
        case SIGSEGV: "SIGSEGV"
        case SIGABRT: "SIGABRT"
        case SIGBUS: "SIGBUS"
        case SIGILL: "SIGILL"
        case SIGFPE: "SIGFPE"
        case SIGKILL: "SIGKILL"
        case SIGTRAP: "SIGTRAP"
        default: String(cString: strsignal(signal))
        }
    }

    private static func u32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
    }

    private static func le(_ value: UInt32) -> [UInt8] {
        [UInt8(value & 0xff), UInt8(value >> 8 & 0xff), UInt8(value >> 16 & 0xff), UInt8(value >> 24 & 0xff)]
    }
}
