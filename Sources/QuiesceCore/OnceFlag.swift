import Synchronization

/// A flag that is set once and never cleared (the hello exchange completed; a command's deadline passed).
public final class OnceFlag: Sendable {
    private let value = Mutex(false)
    public init() {}
    public func set() { self.value.withLock { $0 = true } }
    public var isSet: Bool { self.value.withLock { $0 } }
}
