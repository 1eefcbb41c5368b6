import Foundation

/// Runs blocking work on a thread of its own and hands the result back.
///
/// Swift's cooperative pool has one thread per core (two here): a blocking
/// system call there (statvfs on a hung mount, FIFREEZE, waitpid, fsync)
/// stalls every task, a thaw included (ARCHITECTURE.md, invariant 9).
public enum DedicatedThread {
    public static func run<T: Sendable>(
        name: String = "quiesce-blocking", _ work: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                continuation.resume(with: Result { try work() })
            }
            thread.name = name
            thread.stackSize = 1 << 20
            thread.start()
        }
    }
}
