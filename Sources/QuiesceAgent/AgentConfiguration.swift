import CQuiesceLinux
import QuiesceCore
import QuiescePKI
import QuiesceWire

/// How an agent finds and proves itself to its engine.
public struct AgentConfiguration: Sendable {
    /// The engine's agent port.
    public var engine: ListenAddress
    /// This agent's client certificate and key, and the CA that signed the engine.
    public var identity: TLSFiles
    /// The instance id sent in the hello; must equal the certificate's common
    /// name. Nil: take it from the certificate.
    public var instanceID: String?
    public var limits: SessionLimits
    /// Waits between failed connection attempts.
    public var backoff: Backoff
    /// A session that lasted this long resets the backoff.
    public var healthySession: Duration

    public init(
        engine: ListenAddress, identity: TLSFiles, instanceID: String? = nil, limits: SessionLimits = .defaults,
        backoff: Backoff = Backoff(), healthySession: Duration = .seconds(30)
    ) {
        self.engine = engine
        self.identity = identity
        self.instanceID = instanceID
        self.limits = limits
        self.backoff = backoff
        self.healthySession = healthySession
    }
}

/// Locks the process's memory (current and future pages, faulted in on first use).
public func quiesceLockMemory() -> Int32 { quiesce_lock_memory() }

/// Unblocks SIGINT/SIGTERM/SIGHUP in the calling thread: a parent (a test
/// harness, a supervisor) may have started the agent with them blocked, and
/// then a stop request would never arrive.
public func quiesceUnblockStopSignals() { quiesce_unblock_stop_signals() }
