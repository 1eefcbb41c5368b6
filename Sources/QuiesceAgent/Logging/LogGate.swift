import Foundation
import Logging
import QuiesceCore
import Synchronization

/// Holds log records in memory while a filesystem is frozen: a write to a
/// frozen filesystem (a log file, or stderr redirected to one) would block
/// the agent until the thaw it is supposed to perform (invariant 2).
public final class LogGate: Sendable {
    public static let shared = LogGate()
    /// Records kept while closed; older ones are dropped and counted.
    public static let capacity = 4096

    private struct State {
        var closed = false
        var held: [@Sendable () -> Void] = []
        var dropped = 0
    }
    private let state = Mutex(State())

    /// Buffers from now on.
    public func close() { self.state.withLock { $0.closed = true } }

    /// Writes what was held, in order, and stops buffering.
    public func open() {
        let (held, dropped) = self.state.withLock { state -> ([@Sendable () -> Void], Int) in
            state.closed = false
            defer { state.held = []; state.dropped = 0 }
            return (state.held, state.dropped)
        }
        if dropped > 0 {
            BrokenPipes.printError("quiesce-agent: \(dropped) log records were dropped while frozen (buffer of \(Self.capacity))\n")
        }
        for write in held { write() }
    }

    /// Runs `write` now, or later if the gate is closed.
    func submit(_ write: @escaping @Sendable () -> Void) {
        let now = self.state.withLock { state -> Bool in
            guard state.closed else { return true }
            if state.held.count >= Self.capacity {
                state.held.removeFirst()
                state.dropped += 1
            }
            state.held.append(write)
            return false
        }
        if now { write() }
    }
}

/// A log handler that goes through ``LogGate``. The agent's executable bootstraps logging with it.
public struct GatedLogHandler: LogHandler {
    private var inner: StreamLogHandler
    private let gate: LogGate

    public init(label: String, gate: LogGate = .shared) {
        self.inner = StreamLogHandler.standardError(label: label)
        self.gate = gate
    }

    public var logLevel: Logger.Level {
        get { self.inner.logLevel }
        set { self.inner.logLevel = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { self.inner.metadataProvider }
        set { self.inner.metadataProvider = newValue }
    }

    public var metadata: Logger.Metadata {
        get { self.inner.metadata }
        set { self.inner.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.inner[metadataKey: key] }
        set { self.inner[metadataKey: key] = newValue }
    }

    public func log(event: LogEvent) {
        let inner = self.inner
        self.gate.submit { inner.log(event: event) }
    }
}
