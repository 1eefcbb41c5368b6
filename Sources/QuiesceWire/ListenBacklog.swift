#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// The accept queue of the engine's agent port.
///
/// grpc-swift-nio-transport's server listens with NIO's default backlog, 256, and has no
/// option for it. When thousands of agents dial at once (an engine restart), connections past
/// 256 waiting to be accepted are dropped by the kernel, and each dropped agent's SYN is
/// retransmitted only after 1, 3, 7 s — the reconnect storm takes far longer than the
/// handshakes themselves. Calling listen(2) again on a listening socket only changes its
/// backlog (Linux), so the engine raises it on the transport's socket once it listens.
public enum ListenBacklog {
    /// The kernel's cap on any backlog (`net.core.somaxconn`).
    public static var kernelCap: Int32 {
        guard let text = try? String(contentsOfFile: "/proc/sys/net/core/somaxconn", encoding: .utf8),
              let value = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return 4096 }
        return value
    }

    /// Raises the backlog of every listening TCP socket of this process bound to `port`.
    /// - Returns: how many sockets were raised (0 when none was found: nothing changes).
    @discardableResult
    public static func raise(port: Int, to backlog: Int32 = ListenBacklog.kernelCap) -> Int {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return 0 }
        var raised = 0
        for entry in entries {
            guard let fd = Int32(entry), self.isListening(fd, port: port) else { continue }
            if listen(fd, backlog) == 0 { raised += 1 }
        }
        return raised
    }

    static func isListening(_ fd: Int32, port: Int) -> Bool {
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK else { return false }
        var accepting: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &length) == 0, accepting == 1 else { return false }
        var storage = sockaddr_storage()
        var size = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &size) == 0 }
        }
        guard named else { return false }
        switch Int32(storage.ss_family) {
        case AF_INET:
            let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_port } }
            return Int(UInt16(bigEndian: bound)) == port
        case AF_INET6:
            let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_port } }
            return Int(UInt16(bigEndian: bound)) == port
        default:
            return false
        }
    }
}

/// How widely an engine asks its agents to spread their first dial after a session ends
/// (`EngineHello.reconnect_spread_ms`, and a heartbeat when it moved).
public enum ReconnectSpread {
    /// About one TLS handshake's CPU per session (3.3 ms measured on this machine's cores) with
    /// room to spare: after a restart, agents spread over this long come back at a rate the engine
    /// absorbs (10,000 sessions: 40 s), never past two minutes. Below 500 sessions it is 0: the
    /// agents' own short cap (2 s) keeps one-shot runs prompt.
    public static func milliseconds(sessions: Int) -> UInt32 {
        sessions < 500 ? 0 : UInt32(min(sessions * 4, 120_000))
    }

    /// Whether an agent told `told` should hear `now` (in an engine heartbeat): when it moved by
    /// more than a quarter, or to or from 0. The engine sends idle sessions nothing else, so a
    /// fleet that grows from 0 to 10,000 sessions costs each agent a handful of these.
    public static func worthTelling(told: UInt32, now: UInt32) -> Bool {
        let told = Int(told), now = Int(now)
        return (told == 0) != (now == 0) || abs(now - told) * 4 > told
    }
}

/// How often an engine asks its idle agents to beat (`EngineHello.heartbeat_interval_ms`, and a
/// heartbeat when it moved): the engine reads every beat, so a fixed interval is a cost that grows
/// with the fleet. The base (15 s) up to 2,000 sessions, then in proportion to them, at most four
/// times the base (60 s from 8,000 sessions): an engine holding 10,000 idle agents reads about 170
/// beats a second instead of 670. A vanished idle agent is noticed after three intervals (45 s to
/// 3 min); nothing frozen depends on it (a freeze has its own 250 ms heartbeats).
public enum IdleHeartbeat {
    public static func interval(base: Duration, sessions: Int) -> Duration {
        let scaled = base * (Double(sessions) / 2_000)
        return min(max(base, scaled), base * 4)
    }

    /// Whether an agent told `told` ms should hear `now` ms: moved by more than a quarter.
    public static func worthTelling(told: UInt32, now: UInt32) -> Bool {
        ReconnectSpread.worthTelling(told: told, now: now)
    }
}
