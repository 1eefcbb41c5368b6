import Foundation

/// Runs blocking work on a thread of its own and hands the result back.
///
/// Swift's cooperative pool has one thread per core (two here): a blocking
/// system call there (statvfs on a hung mount, FIFREEZE, waitpid, fsync)
/// stalls every task, a thaw included (ARCHITECTURE.md, invariant 9).
public enum DedicatedThread {
    /// - Parameter background: run in Linux's idle scheduling class (SCHED_IDLE), for bulk
    ///   work such as checksumming snapshots that must not take CPU from a freeze in progress:
    ///   any other thread that wakes (an agent's thaw, an event loop) preempts it at once, where
    ///   a nice value only shrinks its share (at nice 10 a fleet's seals still stretched the
    ///   frozen windows of a 100-instance run).
    public static func run<T: Sendable>(
        name: String = "quiesce-blocking", background: Bool = false, _ work: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                #if os(Linux)
                // Per thread on Linux: pid 0 is this thread only. Where the class is refused, nice 19.
                if background {
                    var parameters = sched_param(sched_priority: 0)
                    if sched_setscheduler(0, 5 /* SCHED_IDLE, linux/sched.h; Glibc hides it without _GNU_SOURCE */, &parameters) != 0 {
                        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
                    }
                }
                #endif
                continuation.resume(with: Result { try work() })
            }
            thread.name = name
            thread.stackSize = 1 << 20
            thread.start()
        }
    }
}

/// A thread started ahead of one piece of blocking work that must start without delay
/// (a snapshot's clones inside a frozen window): creating a thread then costs more than
/// waking one that waits. Its one `run` runs on it; `release` (or deinit) ends it unused.
public final class StandbyThread: Sendable {
    /// What the thread and its owner share; the thread never holds the owner.
    private final class Slot: @unchecked Sendable {
        let condition = NSCondition()
        var job: (@Sendable () -> Void)?
        var released = false
    }
    private let slot = Slot()

    public init(name: String) {
        let slot = self.slot
        let thread = Thread {
            slot.condition.lock()
            while slot.job == nil && !slot.released { slot.condition.wait() }
            let job = slot.job
            slot.condition.unlock()
            job?()
        }
        thread.name = name
        thread.stackSize = 1 << 20
        thread.start()
    }

    deinit { self.release() }

    /// Runs `work` on the standby thread; once only (a later call, or one after `release`, throws).
    public func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        let slot = self.slot
        return try await withCheckedThrowingContinuation { continuation in
            slot.condition.lock()
            guard slot.job == nil, !slot.released else {
                slot.condition.unlock()
                continuation.resume(throwing: CancellationError())
                return
            }
            slot.job = { continuation.resume(with: Result { try work() }) }
            slot.condition.signal()
            slot.condition.unlock()
        }
    }

    /// Ends the thread without work (nothing happens after `run`: the thread ends with its work).
    public func release() {
        self.slot.condition.lock()
        self.slot.released = true
        self.slot.condition.signal()
        self.slot.condition.unlock()
    }
}
