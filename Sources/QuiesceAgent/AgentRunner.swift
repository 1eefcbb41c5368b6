import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire
import Synchronization

/// The agent's side of the session: dials the engine, says hello, answers
/// commands concurrently, sends heartbeats, and dials again with exponential
/// backoff and jitter whenever the session ends (engine restart, network).
public final class AgentRunner: Sendable {
    public let configuration: AgentConfiguration
    public let handler: any CommandHandling
    private let logger: Logger
    private let startedAt = ContinuousClock.now
    /// Random per process: the engine tells this process's reconnects from a second machine with the same certificate.
    public let runID = UUID().uuidString.lowercased()
    private let state = Mutex<State>(State())

    /// What the runner is doing, for `quiesce-agent status` and tests.
    public enum Phase: Sendable, Equatable {
        case connecting(attempt: Int)
        case connected(sessionID: String)
        case waiting(until: ContinuousClock.Instant, lastError: String)
        case stopped
    }

    private struct State {
        var phase: Phase = .connecting(attempt: 0)
        var lastSessionID: String = ""
        var sessionsOpened = 0
        /// When the last session's dial began, and when its hello came back (the engine accepted it).
        var lastConnected: (dialled: ContinuousClock.Instant, connected: ContinuousClock.Instant)?
        var lastError: String?
        /// The engine's last word on how widely to spread the first dial after the session ends.
        var reconnectSpread: Duration = .zero
        var renewals = 0
        var phaseWaiters: [UUID: (predicate: @Sendable (Phase) -> Bool, continuation: CheckedContinuation<Void, Never>)] = [:]
    }

    /// How one session ended.
    public struct SessionEnd: Sendable {
        /// Whether the hello exchange completed.
        public var established: Bool
        public var duration: Duration
        public var error: (any Error)?
    }

    public init(configuration: AgentConfiguration, handler: any CommandHandling = BuiltinCommandHandler(), logger: Logger = Logger(label: "quiesce.agent")) {
        self.configuration = configuration
        self.handler = handler
        self.logger = logger
    }

    public var phase: Phase { self.state.withLock { $0.phase } }
    public var sessionsOpened: Int { self.state.withLock { $0.sessionsOpened } }
    /// When the current (or last) session was established, and when the dial that established it began.
    public var lastConnected: (dialled: ContinuousClock.Instant, connected: ContinuousClock.Instant)? {
        self.state.withLock { $0.lastConnected }
    }
    public var lastError: String? { self.state.withLock { $0.lastError } }
    /// Certificates renewed by this runner.
    public var renewals: Int { self.state.withLock { $0.renewals } }

    /// The instance id: configured, or the certificate's common name.
    public func instanceID() throws -> String {
        if let id = self.configuration.instanceID { return id }
        let (certificate, _) = try self.configuration.identity.validate()
        return PeerIdentity(certificate: certificate).commonName
    }

    /// Runs sessions until the task is cancelled.
    /// - Throws: Only for an unusable local configuration (certificate files); network
    ///   and engine errors are retried.
    public func run() async throws {
        let (certificate, _) = try self.configuration.identity.validate()
        if certificate.notValidAfter < Date() {
            self.logger.error("this agent's certificate has expired: enrol again (quiesce-agent enrol --token …)", metadata: [
                "expired": "\(certificate.notValidAfter)", "file": "\(self.configuration.identity.certificatePath)",
            ])
        }
        var backoff = self.configuration.backoff
        await self.handler.prepare()
        defer { self.setPhase(.stopped) }
        let engines = self.configuration.engines
        var turn = 0
        while !Task.isCancelled {
            self.setPhase(.connecting(attempt: backoff.attempt))
            let engine = engines[turn % engines.count]
            turn += 1
            let end = await self.runSession(engine: engine)
            if Task.isCancelled {
                // Thaw, release holds and end the guard before returning, even though we are cancelled.
                await Task.detached { await self.handler.shutdown() }.value
                return
            }
            if end.established && end.duration >= self.configuration.healthySession { backoff.reset() }
            if end.established {
                // An engine was reached: from now on never wait longer than the known-engine cap.
                let cap = min(self.configuration.knownEngineCap, self.configuration.backoff.cap)
                if backoff.cap > cap {
                    backoff.cap = cap
                    backoff.base = min(backoff.base, cap)
                    backoff.floor = min(backoff.floor, cap)
                }
            }
            var wait = backoff.next()
            // Every dial until the next session spreads over the engine's window when it asked for
            // a wider one than our cap (it holds many sessions: its restart must not be a herd, and
            // dials refused while it is still down must not bunch up at its start either).
            let spread = self.state.withLock { $0.reconnectSpread }
            if spread > backoff.cap {
                wait = .milliseconds(Int64.random(in: 0...max(spread.milliseconds, 1)))
            }
            let why = end.error.map(Self.describe) ?? "the engine closed the session"
            self.state.withLock { $0.lastError = why }
            self.setPhase(.waiting(until: .now + wait, lastError: why))
            self.logger.warning("session ended; dialling again", metadata: [
                "engine": "\(engine)", "next": "\(engines[turn % engines.count])", "reason": "\(why)", "retry_in_ms": "\(wait.milliseconds)",
            ])
            try? await Task.sleep(for: wait)
        }
    }

    /// One connection: dial, hello, serve commands until the session ends.
    public func runSession(engine: ListenAddress? = nil) async -> SessionEnd {
        let engine = engine ?? self.configuration.engine
        let clock = ContinuousClock()
        let began = clock.now
        let established = OnceFlag()
        do {
            let instanceID = try self.instanceID()
            let transport = SecureTransports.agentDialer(engine: engine, identity: self.configuration.identity, oneConnection: true)
            do {
                try await withGRPCClient(transport: transport) { client in
                    try await self.session(client: client, instanceID: instanceID, established: established, dialled: began)
                }
            } catch {
                await Task.detached { await self.handler.sessionEnded() }.value
                throw error
            }
            await Task.detached { await self.handler.sessionEnded() }.value
            return SessionEnd(established: established.isSet, duration: clock.now - began, error: nil)
        } catch {
            return SessionEnd(established: established.isSet, duration: clock.now - began, error: error)
        }
    }

    private func session(
        client: GRPCClient<HTTP2ClientTransport.Posix>, instanceID: String, established: OnceFlag, dialled: ContinuousClock.Instant
    ) async throws {
        let service = Quiesce_Agent_V1_AgentService.Client(wrapping: client)
        let (outbound, outboundContinuation) = AsyncStream<AgentMessage>.makeStream()
        defer { outboundContinuation.finish() }

        var hello = AgentMessage()
        hello.hello.protocol = .init(ProtocolVersionNumber.agentSession)
        hello.hello.agentVersion = QuiesceVersion.software
        hello.hello.instanceID = instanceID
        hello.hello.capabilities = self.handler.capabilities
        hello.hello.previousSessionID = self.state.withLock { $0.lastSessionID }
        hello.hello.uptimeMs = UInt64((ContinuousClock.now - self.startedAt).milliseconds)
        hello.hello.agentRunID = self.runID
        outboundContinuation.yield(hello)

        var options = CallOptions.defaults
        options.waitForReady = false
        options.maxRequestMessageBytes = self.configuration.limits.maxMessageBytes
        options.maxResponseMessageBytes = self.configuration.limits.maxMessageBytes

        let request = StreamingClientRequest<AgentMessage> { writer in
            for await message in outbound {
                try await writer.write(message)
            }
        }
        try await service.session(request: request, options: options) { response in
            var iterator = response.messages.makeAsyncIterator()
            guard let first = try await iterator.next() else {
                throw RPCError(code: .unavailable, message: "the engine closed the stream before its hello")
            }
            guard case .hello(let engineHello) = first.kind else {
                throw RPCError(code: .invalidArgument, message: "expected the engine's hello first, found \(first.kind.map { "a \($0.name)" } ?? "an empty message")")
            }
            if let problem = ProtocolVersionNumber.agentSession.incompatibility(
                with: engineHello.protocol.number, peerRole: "engine", ownRole: "agent")
            {
                throw RPCError(code: .failedPrecondition, message: problem)
            }
            established.set()
            self.state.withLock {
                $0.lastSessionID = engineHello.sessionID
                $0.sessionsOpened += 1
                $0.lastConnected = (dialled, .now)
                $0.lastError = nil
            }
            self.setPhase(.connected(sessionID: engineHello.sessionID))
            self.logger.info("session open", metadata: [
                "engine": "\(self.configuration.engine)", "session": "\(engineHello.sessionID)",
                "engine_version": "\(engineHello.engineVersion)",
            ])
            self.state.withLock { $0.reconnectSpread = .milliseconds(Int64(engineHello.reconnectSpreadMs)) }
            let interval: Duration = engineHello.heartbeatIntervalMs > 0
                ? .milliseconds(Int64(engineHello.heartbeatIntervalMs)) : self.configuration.limits.idleHeartbeat
            let running = RunningCommands()
            defer { running.cancelAll() }
            self.handler.sessionOpened { event in
                var message = AgentMessage()
                message.event = event
                outboundContinuation.yield(message)
            }

            // The idle heartbeat: an event-loop timer, not a task sleeping (Task.sleep arms a dispatch timer),
            // retimed when the engine asks for another interval (it grows with the sessions the engine holds).
            let heartbeats = HeartbeatPacer(every: interval, into: outboundContinuation)
            defer { heartbeats.cancel() }
            try await withThrowingTaskGroup(of: Void.self) { group in
                if self.configuration.renewal.enabled {
                    // Renewal rides on this session's connection; a failure is logged and tried again later,
                    // never the end of the session. Nothing is written while anything is frozen.
                    group.addTask {
                        while true {
                            try await Task.sleep(for: self.configuration.renewal.checkEvery)
                            if self.handler.isFrozen { continue }
                            do {
                                if let serial = try await self.renewIfDue(client: client) {
                                    self.state.withLock { $0.renewals += 1 }
                                    self.logger.notice("certificate renewed", metadata: ["serial": "\(serial)", "files": "\(self.configuration.identity.certificatePath)"])
                                }
                            } catch {
                                self.logger.warning("certificate renewal failed; the current certificate stays in use", metadata: ["error": "\(error)"])
                            }
                        }
                    }
                }
                let remaining = UncheckedSendable(iterator)
                group.addTask {
                    var iterator = remaining.value
                    while let message = try await iterator.next() {
                        self.handler.engineHeard()
                        switch message.kind {
                        case .command(let command):
                            self.start(command, running: running, reply: outboundContinuation)
                        case .cancel(let cancel):
                            running.cancel(cancel.commandID)
                        case .heartbeat(let beat):
                            self.state.withLock { $0.reconnectSpread = .milliseconds(Int64(beat.reconnectSpreadMs)) }
                            if beat.heartbeatIntervalMs > 0 { heartbeats.retime(.milliseconds(Int64(beat.heartbeatIntervalMs))) }
                        case nil:
                            break
                        case .hello:
                            throw RPCError(code: .invalidArgument, message: "the engine sent a second hello")
                        }
                    }
                }
                try await group.next()
                group.cancelAll()
            }
        }
    }

    /// Runs one command on its own task, bounded by its relative deadline:
    /// when it passes, the task is cancelled (every action honours that: a hook
    /// is killed, a freeze in flight is answered and thawed) and the answer
    /// says the deadline was exceeded.
    private func start(_ command: AgentCommand, running: RunningCommands, reply: AsyncStream<AgentMessage>.Continuation) {
        let handler = self.handler
        let deadline: Duration = command.deadlineMs > 0
            ? .milliseconds(Int64(command.deadlineMs)) : self.configuration.limits.defaultCommandDeadline
        let name = command.action?.name ?? "unknown"
        running.start(command.id) { Task {
            let clock = ContinuousClock()
            let began = clock.now
            let expired = OnceFlag()
            let timer = DeadlineTimer(after: deadline) {
                expired.set()
                running.cancel(command.id)
            }
            var result = await handler.perform(command)
            timer.cancel()
            if expired.isSet {
                result = Self.failure(command.id, .deadlineExceeded, "\(name) did not finish within \(deadline)", reason: "deadline-exceeded")
            } else if Task.isCancelled {
                result = Self.failure(command.id, .cancelled, "\(name) was cancelled by the engine", reason: "cancelled")
            }
            result.commandID = command.id
            result.elapsedUs = UInt64(max((clock.now - began).nanoseconds / 1000, 0))
            running.finish(command.id)
            var message = AgentMessage()
            message.result = result
            reply.yield(message)
        } }
    }

    static func failure(_ id: UInt64, _ code: RPCError.Code, _ message: String, reason: String) -> CommandResult {
        var result = CommandResult()
        result.commandID = id
        result.status = .init(code: code, message: message, reason: reason)
        return result
    }

    private func setPhase(_ phase: Phase) {
        let ready = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.phase = phase
            let matched = state.phaseWaiters.filter { $0.value.predicate(phase) }
            for key in matched.keys { state.phaseWaiters.removeValue(forKey: key) }
            return matched.values.map(\.continuation)
        }
        for continuation in ready { continuation.resume() }
    }

    /// Waits until the runner's phase satisfies `predicate` (tests, the demo).
    public func waitForPhase(_ predicate: @escaping @Sendable (Phase) -> Bool) async {
        await withCheckedContinuation { continuation in
            let now = self.state.withLock { state -> Bool in
                if predicate(state.phase) { return true }
                state.phaseWaiters[UUID()] = (predicate, continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? RPCError {
            var text = "\(error.code): \(error.message)"
            if let cause = error.cause { text += " (\(cause))" }
            return text
        }
        return "\(error)"
    }
}

/// Commands in flight, so the engine can cancel them and a lost session stops them.
final class RunningCommands: Sendable {
    private let tasks = Mutex<[UInt64: Task<Void, Never>]>([:])

    /// Starts the task under the lock, so its own `finish` cannot run before it is recorded.
    func start(_ id: UInt64, _ makeTask: () -> Task<Void, Never>) {
        self.tasks.withLock { $0[id] = makeTask() }
    }

    func finish(_ id: UInt64) {
        _ = self.tasks.withLock { $0.removeValue(forKey: id) }
    }

    func cancel(_ id: UInt64) {
        self.tasks.withLock { $0[id] }?.cancel()
    }

    func cancelAll() {
        for task in self.tasks.withLock({ Array($0.values) }) { task.cancel() }
    }
}

/// The agent's idle heartbeats on one session: every `interval` on an event loop, until cancelled;
/// ``retime(_:)`` re-arms it when the engine asks for another interval.
final class HeartbeatPacer: Sendable {
    private struct State {
        var timer: RepeatingTimer?
        var interval: Duration
        var sequence: UInt64 = 0
        var cancelled = false
    }
    private let state: Mutex<State>
    private let outbound: AsyncStream<AgentMessage>.Continuation

    init(every interval: Duration, into outbound: AsyncStream<AgentMessage>.Continuation) {
        self.state = Mutex(State(interval: interval))
        self.outbound = outbound
        let timer = self.timer(every: interval)
        self.state.withLock { $0.timer = timer }
    }

    func retime(_ interval: Duration) {
        let replaced: RepeatingTimer? = self.state.withLock { state in
            guard !state.cancelled, interval != state.interval else { return nil }
            defer { state.interval = interval; state.timer = self.timer(every: interval) }
            return state.timer
        }
        replaced?.cancel()
    }

    private func timer(every interval: Duration) -> RepeatingTimer {
        RepeatingTimer(every: interval) { [weak self] in self?.beat() ?? false }
    }

    private func beat() -> Bool {
        var message = AgentMessage()
        let sequence = self.state.withLock { state -> UInt64? in
            guard !state.cancelled else { return nil }
            state.sequence += 1
            return state.sequence
        }
        guard let sequence else { return false }
        message.heartbeat.sequence = sequence
        self.outbound.yield(message)
        return true
    }

    func cancel() {
        self.state.withLock { state -> RepeatingTimer? in
            state.cancelled = true
            defer { state.timer = nil }
            return state.timer
        }?.cancel()
    }
}
