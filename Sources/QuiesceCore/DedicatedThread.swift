import Foundation

/// Runs blocking work on a thread of its own and hands the result back.
///
/// Swift's cooperative pool has one thread per core (two here): a blocking
/// system call there (statvfs on a hung mount, FIFREEZE, waitpid, fsync)
/// stalls every task, a thaw included (ARCHITECTURE.md, invariant 9).
public enum DedicatedThread {
    /// - Parameter background: run at a lower CPU priority (nice 10), for bulk work
    ///   such as checksumming snapshots that must not take CPU from a freeze in progress.
    public static func run<T: Sendable>(
        name: String = "quiesce-blocking", background: Bool = false, _ work: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                #if os(Linux)
                // Linux nice values are per thread: who 0 is this thread only.
                if background { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10) }
                #endif
                continuation.resume(with: Result { try work() })
            }
            thread.name = name
            thread.stackSize = 1 << 20
            thread.start()
        }
    }
}
