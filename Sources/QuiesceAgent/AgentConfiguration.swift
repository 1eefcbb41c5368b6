import CQuiesceLinux
import QuiesceCore
import QuiescePKI
import QuiesceWire

/// How an agent finds and proves itself to its engine.
public struct AgentConfiguration: Sendable {
    /// The engine's agent port.
    public var engine: ListenAddress
    /// Other engines sharing the fleet (one PostgreSQL catalog): when a session ends, the next
    /// attempt goes to the next engine in turn, so an engine that dies hands its agents over.
    public var otherEngines: [ListenAddress] = []
    /// Every engine, in the order they are tried.
    public var engines: [ListenAddress] { [self.engine] + self.otherEngines }
    /// This agent's client certificate and key, and the CA that signed the engine.
    public var identity: TLSFiles
    /// The instance id sent in the hello; must equal the certificate's common
    /// name. Nil: take it from the certificate.
    public var instanceID: String?
    public var limits: SessionLimits
    /// Waits between failed connection attempts (exponential, full jitter, up to its cap).
    public var backoff: Backoff
    /// Once a session with the engine was established, waits are capped at this
    /// instead of `backoff.cap`. One-shot `quiesce backup` runs (from cron) start an
    /// engine only for the run: between runs nobody listens, and with a 30 s cap the
    /// next run would wait up to 30 s for this agent to dial again. An engine that
    /// was reached once is worth asking for often; one never reached (a wrong
    /// address, a fleet being provisioned) keeps the long cap. Jitter is kept.
    public var knownEngineCap: Duration
    /// A session that lasted this long resets the backoff.
    public var healthySession: Duration
    /// Renewing the certificate at two thirds of its life, over the session's connection.
    public var renewal: RenewalPolicy = RenewalPolicy()

    public static let defaultKnownEngineCap: Duration = .seconds(2)

    public init(
        engine: ListenAddress, identity: TLSFiles, instanceID: String? = nil, limits: SessionLimits = .defaults,
        backoff: Backoff = Backoff(), knownEngineCap: Duration = AgentConfiguration.defaultKnownEngineCap,
        healthySession: Duration = .seconds(30)
    ) {
        self.engine = engine
        self.identity = identity
        self.instanceID = instanceID
        self.limits = limits
        self.backoff = backoff
        self.knownEngineCap = knownEngineCap
        self.healthySession = healthySession
    }
}

/// Locks the process's memory (current and future pages, faulted in on first use).
public func quiesceLockMemory() -> Int32 { quiesce_lock_memory() }

/// Unblocks SIGINT/SIGTERM/SIGHUP in the calling thread: a parent (a test
/// harness, a supervisor) may have started the agent with them blocked, and
/// then a stop request would never arrive.
public func quiesceUnblockStopSignals() { quiesce_unblock_stop_signals() }
