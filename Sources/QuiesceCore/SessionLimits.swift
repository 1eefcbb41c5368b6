/// Limits and timings of an agent session, in one place with documented defaults.
public struct SessionLimits: Sendable, Hashable {
    /// Largest message either side may send. Facts of a host with thousands of
    /// mounts fit easily; anything larger is an error, not a slow path.
    public var maxMessageBytes: Int
    /// How long the engine waits for the agent's hello after the TLS handshake.
    public var helloTimeout: Duration
    /// The agents' heartbeat interval while nothing is frozen, up to 2,000 sessions; an engine
    /// holding more asks for longer ones (IdleHeartbeat in QuiesceWire: at most four times this).
    /// The engine itself sends idle agents no heartbeats.
    public var idleHeartbeat: Duration
    /// Heartbeat interval while anything is frozen (invariant 1).
    public var frozenHeartbeat: Duration
    /// A session silent for this long is considered dead and closed (or for three of the
    /// longest idle intervals its agent was asked for, when that is longer).
    public var silenceTimeout: Duration
    /// Deadline for a command whose caller gives none.
    public var defaultCommandDeadline: Duration

    public init(
        maxMessageBytes: Int, helloTimeout: Duration, idleHeartbeat: Duration,
        frozenHeartbeat: Duration, silenceTimeout: Duration, defaultCommandDeadline: Duration
    ) {
        self.maxMessageBytes = maxMessageBytes
        self.helloTimeout = helloTimeout
        self.idleHeartbeat = idleHeartbeat
        self.frozenHeartbeat = frozenHeartbeat
        self.silenceTimeout = silenceTimeout
        self.defaultCommandDeadline = defaultCommandDeadline
    }

    public static var defaults: Self {
        Self(
            maxMessageBytes: 1 << 20,
            helloTimeout: .seconds(10),
            // Idle heartbeats are what an idle fleet costs the engine: every 5 s both ways was
            // 12.6 % of a core for 2,000 sessions (bench-sessions); now only the agents send them,
            // less often in large fleets. A dead engine closes its TCP connections (the agents
            // redial at once); a vanished one is caught by the agent's HTTP/2 pings. While
            // anything is frozen the engine beats every 250 ms, whatever this says.
            idleHeartbeat: .seconds(15),
            frozenHeartbeat: .milliseconds(250),
            silenceTimeout: .seconds(45),
            defaultCommandDeadline: .seconds(30)
        )
    }

    public static func defaults(_ configure: (inout Self) -> Void) -> Self {
        var value = Self.defaults
        configure(&value)
        return value
    }
}
