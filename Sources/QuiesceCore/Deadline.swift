/// Thrown by ``withDeadline(_:operation:)`` when the operation outlives its deadline.
public struct DeadlineExceeded: Error, Sendable, CustomStringConvertible {
    public var deadline: Duration
    public init(deadline: Duration) { self.deadline = deadline }
    public var description: String { "deadline of \(self.deadline) exceeded" }
}

/// Runs `operation`, cancelling it and throwing ``DeadlineExceeded`` if it has
/// not finished within `deadline`. The operation must honour cancellation.
public func withDeadline<T: Sendable>(
    _ deadline: Duration, operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: deadline)
            throw DeadlineExceeded(deadline: deadline)
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}

/// Moves a value that exactly one task uses at a time (a stream's iterator,
/// handed from the task that read the hello to the task that reads the rest)
/// across a task boundary the compiler cannot see is exclusive.
public struct UncheckedSendable<Value>: @unchecked Sendable {
    public var value: Value
    public init(_ value: Value) { self.value = value }
}
