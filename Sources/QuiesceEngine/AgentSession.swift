import Foundation
import GRPCCore
import Logging
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire
import Synchronization
import X509

/// One live session with one agent: its identity, and the commands waiting
/// for answers. Thread-safe; the session service feeds it from the wire and
/// the rest of the engine sends commands through it.
public final class AgentSession: Sendable {
    public let sessionID: String
    public let instanceID: String
    public let remoteAddress: String
    public let agentVersion: String
    public let protocolVersion: ProtocolVersionNumber
    public let capabilities: [String]
    public let certificateFingerprint: String
    /// The client certificate the session was opened with (revocation is checked against it).
    public let certificate: Certificate?
    /// The agent process's random id (hello), to tell its reconnects from a second machine with the same certificate.
    public let agentRunID: String
    public let connectedAt: Date
    let audit: AuditLog?

    private let outbound: AsyncStream<EngineMessage>.Continuation
    private let state: Mutex<State>
    private let clock = ContinuousClock()

    private struct Pending {
        var continuation: CheckedContinuation<CommandResult, any Error>
        var action: String
        var timer: DeadlineTimer?
    }

    private struct State {
        var nextCommandID: UInt64 = 1
        var pending: [UInt64: Pending] = [:]
        var lastHeard: ContinuousClock.Instant
        var lastHeardDate: Date
        var closeReason: RPCError?
        var heartbeatSequence: UInt64 = 0
        /// The reconnect spread this agent was last told (hello, heartbeats).
        var toldSpreadMs: UInt32 = 0
        /// The idle heartbeat interval this agent was last told, and the longest it was ever told
        /// (it may still be sleeping on that one: silence is measured against it).
        var toldIntervalMs: UInt32 = 0
        var longestIntervalMs: UInt32 = 0
        /// Freezes in progress on this agent: each has a 250 ms heartbeat timer.
        var freezeHeartbeats: [String: RepeatingTimer] = [:]
        var events: [Quiesce_Agent_V1_AgentEvent] = []
    }

    init(
        sessionID: String, hello: Quiesce_Agent_V1_AgentHello, remoteAddress: String,
        certificateFingerprint: String, outbound: AsyncStream<EngineMessage>.Continuation,
        certificate: Certificate? = nil, audit: AuditLog? = nil
    ) {
        self.certificate = certificate
        self.agentRunID = hello.agentRunID
        self.audit = audit
        self.sessionID = sessionID
        self.instanceID = hello.instanceID
        self.remoteAddress = remoteAddress
        self.agentVersion = hello.agentVersion
        self.protocolVersion = hello.protocol.number
        self.capabilities = hello.capabilities
        self.certificateFingerprint = certificateFingerprint
        self.connectedAt = Date()
        self.outbound = outbound
        self.state = Mutex(State(lastHeard: ContinuousClock.now, lastHeardDate: Date()))
    }

    /// When the engine last received anything from this agent.
    public var lastHeard: Date { self.state.withLock { $0.lastHeardDate } }
    public var pendingCommands: Int { self.state.withLock { $0.pending.count } }
    public var isClosed: Bool { self.state.withLock { $0.closeReason != nil } }

    func silence(now: ContinuousClock.Instant) -> Duration {
        self.state.withLock { now - $0.lastHeard }
    }

    func heard() {
        self.state.withLock {
            $0.lastHeard = self.clock.now
            $0.lastHeardDate = Date()
        }
    }

    /// Sends a command and waits for the agent's answer.
    ///
    /// - Parameters:
    ///   - action: What to do.
    ///   - deadline: Sent to the agent as a relative deadline; the engine gives
    ///     up `grace` later (the network's share), answers `.deadlineExceeded`
    ///     and sends a cancel.
    /// - Returns: The agent's result, whatever its status code: callers decide
    ///   what a non-OK status means for them.
    /// - Throws: `RPCError` `.unavailable` when the session ends first,
    ///   `.deadlineExceeded`, `.cancelled` when the calling task is cancelled.
    public func send(
        _ action: AgentCommand.OneOf_Action, deadline: Duration, grace: Duration = .milliseconds(500)
    ) async throws -> CommandResult {
        guard let audit = self.audit else { return try await self.dispatch(action, deadline: deadline, grace: grace) }
        // The audit trail: who asked, what, to which instance, the result; written after the answer, off this path.
        let actor = AuditContext.actor, began = ContinuousClock.now
        func record(_ result: String, _ detail: String?) {
            audit.append(.init(kind: "command", actor: actor, action: action.name, instance: self.instanceID, result: result,
                               detail: detail, durationMs: Double((ContinuousClock.now - began).nanoseconds) / 1e6))
        }
        do {
            let result = try await self.dispatch(action, deadline: deadline, grace: grace)
            if result.status.isOK { record("ok", nil) } else { record("\(result.status.rpcCode) \(result.status.reason)", result.status.message) }
            return result
        } catch let error as RPCError {
            record("\(error.code) no-answer", error.message)
            throw error
        }
    }

    private func dispatch(
        _ action: AgentCommand.OneOf_Action, deadline: Duration, grace: Duration
    ) async throws -> CommandResult {
        let id = self.state.withLock { state -> UInt64 in
            defer { state.nextCommandID += 1 }
            return state.nextCommandID
        }
        var command = AgentCommand()
        command.id = id
        command.deadlineMs = UInt32(clamping: max(deadline.milliseconds, 1))
        command.action = action

        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<CommandResult, any Error>) in
                let closed = self.state.withLock { state -> RPCError? in
                    if let reason = state.closeReason { return reason }
                    state.pending[id] = Pending(continuation: continuation, action: action.name)
                    return nil
                }
                if let closed {
                    continuation.resume(throwing: closed)
                    return
                }
                // Cancelled before the continuation was registered: onCancel found nothing to fail.
                if Task.isCancelled {
                    self.fail(id, RPCError(code: .cancelled, message: "\(action.name) on \(self.instanceID) was cancelled"),
                              cancelReason: "cancelled by the engine", notifyAgent: false)
                    return
                }
                let timer = DeadlineTimer(after: deadline + grace) { [weak self] in
                    guard let self else { return }
                    self.fail(
                        id,
                        RPCError(
                            code: .deadlineExceeded,
                            message: "\(action.name) on \(self.instanceID) got no answer within \(deadline) (+\(grace) grace)"),
                        cancelReason: "deadline exceeded")
                }
                self.state.withLock { $0.pending[id]?.timer = timer }
                var message = EngineMessage()
                message.command = command
                self.outbound.yield(message)
            }
        } onCancel: {
            self.fail(id, RPCError(code: .cancelled, message: "\(action.name) on \(self.instanceID) was cancelled"),
                      cancelReason: "cancelled by the engine")
        }
    }

    /// Fails a pending command locally and tells the agent to stop working on it.
    private func fail(_ id: UInt64, _ error: RPCError, cancelReason: String, notifyAgent: Bool = true) {
        guard let pending = self.state.withLock({ $0.pending.removeValue(forKey: id) }) else { return }
        pending.timer?.cancel()
        pending.continuation.resume(throwing: error)
        guard notifyAgent else { return }
        var message = EngineMessage()
        message.cancel.commandID = id
        message.cancel.reason = cancelReason
        self.outbound.yield(message)
    }

    /// Delivers an answer from the wire.
    /// - Throws: `RPCError` `.invalidArgument` for an id this session never issued.
    func deliver(_ result: CommandResult) throws {
        enum Outcome { case delivered(Pending), late, neverIssued(UInt64) }
        let outcome = self.state.withLock { state -> Outcome in
            if let pending = state.pending.removeValue(forKey: result.commandID) { return .delivered(pending) }
            if result.commandID == 0 || result.commandID >= state.nextCommandID { return .neverIssued(state.nextCommandID - 1) }
            return .late
        }
        switch outcome {
        case .delivered(let pending):
            pending.timer?.cancel()
            pending.continuation.resume(returning: result)
        case .late:
            break  // answered after the engine gave up on it; already reported to the caller
        case .neverIssued(let highest):
            throw RPCError(
                code: .invalidArgument,
                message: "result for command \(result.commandID), which this session never issued (highest issued: \(highest))")
        }
    }

    /// While anything is frozen the agent must hear from the engine at least
    /// every second (it thaws otherwise): heartbeats every `interval` until
    /// ``endFreezeHeartbeats(_:)`` or `limit` (budget plus slack) passes.
    func beginFreezeHeartbeats(_ freezeID: String, interval: Duration = .milliseconds(250), limit: Duration) {
        let until = ContinuousClock.now + limit
        // The freeze command itself is the first sign of life; beat from then on.
        // An event-loop timer, not a task on Task.sleep: arming and cancelling
        // this one costs no dispatch wake-ups inside the freeze window.
        let timer = RepeatingTimer(every: interval) { [weak self] in
            guard let self, !self.isClosed, ContinuousClock.now < until else { return false }
            self.sendHeartbeat(freezeID: freezeID)
            return true
        }
        let previous = self.state.withLock { state in
            defer { state.freezeHeartbeats[freezeID] = timer }
            return state.freezeHeartbeats[freezeID]
        }
        previous?.cancel()
    }

    func endFreezeHeartbeats(_ freezeID: String) {
        self.state.withLock { $0.freezeHeartbeats.removeValue(forKey: freezeID) }?.cancel()
    }

    /// Events the agent sent unasked (a thaw by budget, a hold that died), oldest first; the last 100.
    public var events: [Quiesce_Agent_V1_AgentEvent] { self.state.withLock { $0.events } }

    func record(_ event: Quiesce_Agent_V1_AgentEvent) {
        self.state.withLock { state in
            state.events.append(event)
            if state.events.count > 100 { state.events.removeFirst(state.events.count - 100) }
        }
        if event.kind == .thawed, !event.freezeID.isEmpty { self.endFreezeHeartbeats(event.freezeID) }
    }

    /// A heartbeat (while frozen, or a new idle interval or reconnect spread); it always carries
    /// what the agent was last told, which it keeps until told otherwise.
    func sendHeartbeat(freezeID: String = "") {
        var message = EngineMessage()
        message.heartbeat.freezeID = freezeID
        (message.heartbeat.sequence, message.heartbeat.reconnectSpreadMs, message.heartbeat.heartbeatIntervalMs) = self.state.withLock {
            $0.heartbeatSequence += 1
            return ($0.heartbeatSequence, $0.toldSpreadMs, $0.toldIntervalMs)
        }
        self.outbound.yield(message)
    }

    /// What the hello told the agent.
    func told(reconnectSpreadMs: UInt32, heartbeatIntervalMs: UInt32) {
        self.state.withLock {
            $0.toldSpreadMs = reconnectSpreadMs
            $0.toldIntervalMs = heartbeatIntervalMs
            $0.longestIntervalMs = max($0.longestIntervalMs, heartbeatIntervalMs)
        }
    }

    /// Tells the agent (a heartbeat) the engine's reconnect spread and idle interval when either
    /// moved enough since the agent last heard it (``ReconnectSpread/worthTelling(told:now:)``).
    func refreshIdleHints(reconnectSpreadMs spread: UInt32, heartbeatIntervalMs interval: UInt32) {
        let moved = self.state.withLock { state -> Bool in
            var moved = false
            if ReconnectSpread.worthTelling(told: state.toldSpreadMs, now: spread) {
                state.toldSpreadMs = spread
                moved = true
            }
            if IdleHeartbeat.worthTelling(told: state.toldIntervalMs, now: interval) {
                state.toldIntervalMs = interval
                state.longestIntervalMs = max(state.longestIntervalMs, interval)
                moved = true
            }
            return moved
        }
        if moved { self.sendHeartbeat() }
    }

    /// How long this agent may stay silent: `base`, or three of the longest interval it was told.
    func silenceLimit(base: Duration) -> Duration {
        max(base, .milliseconds(3 * Int64(self.state.withLock { $0.longestIntervalMs })))
    }

    /// Ends the session: fails every pending command with `.unavailable` naming
    /// the reason, and stops the outbound stream (which ends the RPC).
    func close(reason: RPCError) {
        let pending = self.state.withLock { state -> [Pending] in
            guard state.closeReason == nil else { return [] }
            state.closeReason = reason
            defer { state.pending.removeAll() }
            return Array(state.pending.values)
        }
        for timer in self.state.withLock({ state -> [RepeatingTimer] in
            defer { state.freezeHeartbeats.removeAll() }
            return Array(state.freezeHeartbeats.values)
        }) { timer.cancel() }
        let error = RPCError(
            code: .unavailable, message: "session with \(self.instanceID) ended: \(reason.message)", cause: reason)
        for entry in pending {
            entry.timer?.cancel()
            entry.continuation.resume(throwing: error)
        }
        self.outbound.finish()
    }

    var closeReason: RPCError? { self.state.withLock { $0.closeReason } }
}
