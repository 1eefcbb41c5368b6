import Foundation

/// Writes to a file descriptor from a thread of its own, in order, so that
/// whoever produces the output never waits for whoever reads it.
///
/// A fleet run prints progress while instances are frozen. Its tasks run on
/// event loops that also carry the agents' heartbeats and replies, and a
/// write to a reader that is not reading — a pager, a terminal paused with
/// Ctrl-S, a full pipe — blocks until it reads again: the agents would thaw
/// for engine silence. Here such a write only lengthens the queue.
public final class OutputQueue: @unchecked Sendable {
    public static let standardOutput = OutputQueue(fd: STDOUT_FILENO, name: "quiesce-stdout")
    public static let standardError = OutputQueue(fd: STDERR_FILENO, name: "quiesce-stderr")

    private let fd: Int32
    private let condition = NSCondition()
    private var pending: [[UInt8]] = []
    /// Bytes taken off `pending` and being written (0: none).
    private var inFlight = 0
    private var failed: Int32?

    public init(fd: Int32, name: String) {
        self.fd = fd
        let thread = Thread { [self] in self.drain() }
        thread.name = name
        thread.stackSize = 1 << 18
        thread.start()
    }

    /// Queues `text` (add the newline yourself); returns at once.
    public func write(_ text: String) { self.write(Array(text.utf8)) }

    /// Queues `bytes`; returns at once. After a write error (EPIPE: the reader
    /// is gone) everything is dropped, as a write to a closed pipe would be.
    public func write(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        self.condition.withLock {
            guard self.failed == nil else { return }
            self.pending.append(bytes)
            self.condition.broadcast()
        }
    }

    /// Waits until everything queued so far is written (or the writes failed).
    /// Blocks: call it where blocking is allowed (the end of a command, a dedicated thread).
    public func flush() {
        self.condition.withLock {
            while (!self.pending.isEmpty || self.inFlight > 0) && self.failed == nil { self.condition.wait() }
        }
    }

    /// Bytes queued or being written, not yet all written (for tests and diagnostics).
    public var queuedBytes: Int { self.condition.withLock { self.pending.reduce(self.inFlight) { $0 + $1.count } } }

    private func drain() {
        while true {
            let chunk: [UInt8] = self.condition.withLock {
                while self.pending.isEmpty { self.condition.wait() }
                // One write for everything queued: a burst of lines costs one system call.
                let chunk = self.pending.count == 1 ? self.pending[0] : Array(self.pending.joined())
                self.pending.removeAll(keepingCapacity: true)
                self.inFlight = chunk.count
                return chunk
            }
            let error = Self.writeAll(self.fd, chunk)
            self.condition.withLock {
                self.inFlight = 0
                if let error {
                    self.failed = error
                    self.pending.removeAll()
                }
                self.condition.broadcast()
            }
        }
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Int32? {
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
            if written < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN {
                    // A non-blocking descriptor (a caller's choice): wait until it takes more.
                    var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&poller, 1, 1000)
                    continue
                }
                return errno
            }
            offset += written
        }
        return nil
    }
}
