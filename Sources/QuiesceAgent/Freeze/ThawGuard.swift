import CQuiesceLinux
import Foundation
import NIOCore
import NIOPosix
import QuiesceCore
import Synchronization

/// What the thaw guard process says (see Sources/quiesce-thaw-guard/main.c).
enum GuardMessage: Sendable, Equatable {
    struct MountFrozen: Sendable, Equatable {
        var frozen: Bool
        var errno: Int32
        var syncfsMicros: UInt64
        var freezeMicros: UInt64
    }
    struct MountThawed: Sendable, Equatable {
        var thawed: Bool
        var errno: Int32
    }
    case ready(pid: Int32, oomAdjusted: Bool, memoryLocked: Bool)
    /// `rcu`: whether grace periods were expedited for the FIFREEZEs (expedited, already, normal, unavailable, not-asked).
    case frozen(id: String, all: Bool, budgetMs: UInt32, mounts: [MountFrozen], rcu: String)
    case thawed(id: String, cause: String, frozenMicros: UInt64, withinBudget: Bool, mounts: [MountThawed])
    case error(id: String, reason: String, detail: String)

    /// Parses one packet; nil for anything malformed.
    init?(parsing text: String) {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard !lines.isEmpty else { return nil }
        let first = lines.removeFirst()
        func fields(_ line: String) -> [String] { line.split(separator: " ").map(String.init) }
        let head = fields(first)
        switch head.first {
        case "READY" where head.count == 4:
            guard let pid = Int32(head[1]) else { return nil }
            self = .ready(pid: pid, oomAdjusted: head[2] == "1", memoryLocked: head[3] == "1")
        case "FROZEN" where head.count == 5 || head.count == 6:
            guard let budget = UInt32(head[3]), let count = Int(head[4]), lines.count == count else { return nil }
            var mounts: [MountFrozen] = []
            for line in lines {
                let f = fields(line)
                guard f.count == 4, let e = Int32(f[1]), let s = UInt64(f[2]), let z = UInt64(f[3]) else { return nil }
                mounts.append(MountFrozen(frozen: f[0] == "1", errno: e, syncfsMicros: s, freezeMicros: z))
            }
            self = .frozen(id: head[1], all: head[2] == "1", budgetMs: budget, mounts: mounts, rcu: head.count == 6 ? head[5] : "not-asked")
        case "THAWED" where head.count == 6:
            guard let micros = UInt64(head[3]), let count = Int(head[5]), lines.count == count else { return nil }
            var mounts: [MountThawed] = []
            for line in lines {
                let f = fields(line)
                guard f.count == 2, let e = Int32(f[1]) else { return nil }
                mounts.append(MountThawed(thawed: f[0] == "1", errno: e))
            }
            self = .thawed(id: head[1], cause: head[2], frozenMicros: micros, withinBudget: head[4] == "1", mounts: mounts)
        case "ERROR" where head.count >= 3:
            // The detail is free text: everything after the reason.
            let detail = first.split(separator: " ", maxSplits: 3).dropFirst(3).first.map(String.init) ?? ""
            self = .error(id: head[1], reason: head[2], detail: detail)
        default:
            return nil
        }
    }

    var freezeID: String? {
        switch self {
        case .frozen(let id, _, _, _, _), .thawed(let id, _, _, _, _), .error(let id, _, _): id
        case .ready: nil
        }
    }
}

public enum ThawGuardError: Error, CustomStringConvertible {
    case notFound(String)
    case spawnFailed(String, Int32)
    case notReady(String)
    case lost
    case protocolError(String)

    public var description: String {
        switch self {
        case .notFound(let path): "the thaw guard executable \(path) does not exist or is not executable"
        case .spawnFailed(let path, let code): "could not start the thaw guard \(path): \(String(cString: strerror(code)))"
        case .notReady(let detail): "the thaw guard did not report ready: \(detail)"
        case .lost: "the thaw guard process is gone"
        case .protocolError(let detail): "the thaw guard sent something unexpected: \(detail)"
        }
    }
}

/// The agent's end of the thaw guard: a separate process (started before
/// anything is frozen) that owns every FIFREEZE and FITHAW. Requests are
/// answered in order; one request is outstanding at a time.
final class ThawGuard: Sendable {
    let pid: Int32
    let executable: String
    let oomAdjusted: Bool
    let memoryLocked: Bool
    /// The socket (our end of the socketpair) lives in `state`: once the guard is
    /// lost it is closed and its number may belong to anything else in the process
    /// (another agent's guard socket, in the test suite; a TLS connection), so
    /// every use checks, under the lock, that it is still ours.
    private let state: Mutex<State>
    /// Messages nobody asked for (a budget thaw), and the guard's loss.
    private let unsolicited: @Sendable (GuardMessage?) -> Void

    private struct Pending {
        /// Returns true when `message` completes the request; the message is collected either way if it belongs.
        var accepts: @Sendable (GuardMessage) -> Bool
        var finishes: @Sendable (GuardMessage) -> Bool
        var collected: [GuardMessage] = []
        var continuation: CheckedContinuation<[GuardMessage], any Error>
    }

    private struct State {
        var pending: Pending?
        /// -1 once the guard is lost (the socket closed).
        var socket: Int32
    }

    /// The guard next to the running executable (or the test bundle).
    static func defaultExecutable() -> String {
        let own = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        let candidates = [
            own.appendingPathComponent("quiesce-thaw-guard").path,
            URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("quiesce-thaw-guard").path,
        ]
        return candidates.first { access($0, X_OK) == 0 } ?? candidates[0]
    }

    /// Starts the guard and waits for its READY.
    static func start(executable: String, unsolicited: @escaping @Sendable (GuardMessage?) -> Void) async throws -> ThawGuard {
        guard access(executable, X_OK) == 0 else { throw ThawGuardError.notFound(executable) }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw ThawGuardError.spawnFailed(executable, errno)
        }
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { if null >= 0 { close(null) } }
        var pid: Int32 = 0
        let arguments = [executable, "3"]
        let environment = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        let result = withCStrings(arguments) { argv in
            withCStrings(environment) { envp in
                quiesce_spawn(executable, argv, envp, -1, pair[1], 3, null, null, null, 0, &pid)
            }
        }
        close(pair[1])
        guard result == 0 else {
            close(pair[0])
            throw ThawGuardError.spawnFailed(executable, result)
        }
        // The first packet is READY; read it before the event loop takes the socket over.
        let socketFD = pair[0]
        let childPID = pid
        let first: String? = try await DedicatedThread.run(name: "quiesce-guard-start") {
            var descriptor = pollfd(fd: socketFD, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, 5000) == 1 else { return nil }
            return Self.receive(socketFD)
        }
        guard let text = first, case .ready(_, let oom, let locked)? = GuardMessage(parsing: text) else {
            close(pair[0])
            kill(pid, SIGKILL)
            _ = try? await DedicatedThread.run { var status: Int32 = 0; waitpid(childPID, &status, 0) }
            throw ThawGuardError.notReady(first.map { "first message was \"\($0)\"" } ?? "nothing within 5 s")
        }
        let guardProcess = ThawGuard(pid: pid, executable: executable, socket: pair[0], oomAdjusted: oom, memoryLocked: locked, unsolicited: unsolicited)
        do {
            try await guardProcess.startReader(socket: pair[0])
        } catch {
            close(pair[0])  // end-of-file for the guard: it exits
            _ = try? await DedicatedThread.run { var status: Int32 = 0; waitpid(childPID, &status, 0) }
            throw ThawGuardError.notReady("could not watch its socket: \(error)")
        }
        return guardProcess
    }

    private init(pid: Int32, executable: String, socket: Int32, oomAdjusted: Bool, memoryLocked: Bool, unsolicited: @escaping @Sendable (GuardMessage?) -> Void) {
        self.pid = pid
        self.executable = executable
        self.state = Mutex(State(socket: socket))
        self.oomAdjusted = oomAdjusted
        self.memoryLocked = memoryLocked
        self.unsolicited = unsolicited
    }

    var isAlive: Bool { self.state.withLock { $0.socket >= 0 } }

    private static func receive(_ socket: Int32) -> String? {
        var buffer = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = buffer.withUnsafeMutableBytes { quiesce_receive(socket, $0.baseAddress, UInt($0.count)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            return String(decoding: buffer[0..<n], as: UTF8.self)
        }
    }

    /// The largest packet the guard sends (MAX_PACKET in its main.c), with room to spare.
    static let maxPacket = 16384

    /// The guard's packets are read on an event loop — in the agent, its only
    /// one, where its gRPC connection and its tasks run — so a reply (FROZEN,
    /// THAWED) wakes the thread that answers the engine directly. A reader
    /// thread in between cost one more wake-up per reply, 0.05-0.07 ms each on
    /// the freeze window's path. NIO owns a duplicate of the socket for reading;
    /// requests are sent on `socket` (with SCM_RIGHTS, which NIO does not do).
    private func startReader(socket: Int32) async throws {
        let readSide = dup(socket)
        guard readSide >= 0 else { throw ThawGuardError.spawnFailed(self.executable, errno) }
        do {
            _ = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                // SOCK_SEQPACKET: one read is one packet, cut short if the buffer is smaller; a fixed, large buffer.
                .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: Self.maxPacket))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(GuardReader(owner: self)) }
                }
                .takingOwnershipOfDescriptor(input: readSide).get()
        } catch {
            close(readSide)  // a failed bootstrap leaves the descriptor with us
            throw error
        }
    }

    /// Reads the guard's packets on the event loop; end-of-file means the guard is gone.
    private final class GuardReader: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let owner: ThawGuard
        init(owner: ThawGuard) { self.owner = owner }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let text = String(buffer: Self.unwrapInboundIn(data))
            guard let message = GuardMessage(parsing: text) else {
                self.owner.unreadable(text)
                return
            }
            self.owner.deliver(message)
        }

        func channelInactive(context: ChannelHandlerContext) {
            // Reaping the guard and, when something is frozen, thawing with the
            // agent's own descriptors block: a thread of their own, not the loop.
            let owner = self.owner
            let thread = Thread { owner.lost() }
            thread.name = "quiesce-guard-lost"
            thread.stackSize = 1 << 18
            thread.start()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }

    private func deliver(_ message: GuardMessage) {
        enum Outcome { case finished(CheckedContinuation<[GuardMessage], any Error>, [GuardMessage]), collected, unsolicited }
        let outcome: Outcome = self.state.withLock { state in
            guard var pending = state.pending, pending.accepts(message) else { return .unsolicited }
            pending.collected.append(message)
            if pending.finishes(message) {
                state.pending = nil
                return .finished(pending.continuation, pending.collected)
            }
            state.pending = pending
            return .collected
        }
        switch outcome {
        case .finished(let continuation, let messages): continuation.resume(returning: messages)
        case .collected: break
        case .unsolicited: self.unsolicited(message)
        }
    }

    /// A packet that is not the guard's protocol (a guard of another version, or
    /// a bug): the request waiting for an answer fails with it, quoted, instead
    /// of waiting for an answer that will not come (a freeze would hang the
    /// agent's freeze state for good). Unasked, nobody waits: it is dropped.
    private func unreadable(_ text: String) {
        let pending = self.state.withLock { state -> Pending? in
            defer { state.pending = nil }
            return state.pending
        }
        let shown = text.count > 200 ? String(text.prefix(200)) + "…" : text
        pending?.continuation.resume(throwing: ThawGuardError.protocolError("expected READY, PONG, FROZEN, THAWED or ERROR as its protocol has them, found \"\(shown)\""))
    }

    private func lost() {
        let (pending, socket) = self.state.withLock { state -> (Pending?, Int32) in
            defer { state.pending = nil; state.socket = -1 }
            return (state.pending, state.socket)
        }
        pending?.continuation.resume(throwing: ThawGuardError.lost)
        if socket >= 0 { close(socket) }
        // Reap it (it is our child) without blocking the cooperative pool.
        let pid = self.pid
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        self.unsolicited(nil)
    }

    /// Sends one request and collects replies until `finishes` says so.
    /// Not cancellable on purpose: a freeze in flight must be answered.
    func request(
        _ text: String, descriptors: [Int32] = [],
        accepts: @escaping @Sendable (GuardMessage) -> Bool, finishes: @escaping @Sendable (GuardMessage) -> Bool
    ) async throws -> [GuardMessage] {
        try await withCheckedThrowingContinuation { continuation in
            let problem: (any Error)? = self.state.withLock { state in
                guard state.socket >= 0 else { return ThawGuardError.lost }
                guard state.pending == nil else { return ThawGuardError.protocolError("a request is already outstanding") }
                state.pending = Pending(accepts: accepts, finishes: finishes, continuation: continuation)
                let bytes = Array(text.utf8)
                let sent = bytes.withUnsafeBytes { raw in
                    descriptors.withUnsafeBufferPointer { fds in
                        quiesce_send_with_fds(state.socket, raw.baseAddress, UInt(raw.count), fds.baseAddress, Int32(fds.count))
                    }
                }
                if sent < 0 {
                    state.pending = nil
                    return ThawGuardError.protocolError("send failed: \(String(cString: strerror(errno)))")
                }
                return nil
            }
            if let problem { continuation.resume(throwing: problem) }
        }
    }

    /// Sends a request whose answer nobody waits for (it arrives as unsolicited).
    /// Safe from any thread; false once the guard is gone.
    func post(_ text: String) -> Bool {
        let bytes = Array(text.utf8)
        return self.state.withLock { state in
            guard state.socket >= 0 else { return false }
            return bytes.withUnsafeBytes { raw in quiesce_send_with_fds(state.socket, raw.baseAddress, UInt(raw.count), nil, 0) } >= 0
        }
    }

    /// Ends the guard (the agent is stopping): shutting our end down is end-of-file
    /// for it. Nothing to do once it is gone (the number is no longer ours).
    func shutdown() {
        self.state.withLock { state in
            if state.socket >= 0 { _ = Glibc.shutdown(state.socket, Int32(SHUT_RDWR)) }
        }
    }
}

