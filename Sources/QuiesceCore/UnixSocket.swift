import Foundation

/// Dialling a unix stream socket by path (the engine's admin socket, qemu-ga's,
/// the bench's reference agents).
public enum UnixSocket {
    /// A connected, blocking SOCK_STREAM descriptor (close-on-exec) for `path`,
    /// or -1 with `errno` set when nothing answers there.
    public static func connect(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return -1 }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
        guard connected else {
            let saved = errno
            close(fd)
            errno = saved
            return -1
        }
        return fd
    }

    /// Whether something accepts connections at `path` (the connection is closed at once).
    public static func answers(_ path: String) -> Bool {
        let fd = Self.connect(path)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }
}
