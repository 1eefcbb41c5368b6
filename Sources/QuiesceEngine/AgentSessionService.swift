import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire
import Synchronization
import X509

/// Serves `quiesce.agent.v1.AgentService/Session`: checks who is calling,
/// reads the hello, registers the session, then pumps messages both ways
/// until either side ends it. Everything that ends a session is logged with
/// its reason and ends that RPC with a canonical status; other sessions are
/// not affected.
struct AgentSessionService: Quiesce_Agent_V1_AgentService.SimpleServiceProtocol {
    let registry: SessionRegistry
    let limits: SessionLimits
    let logger: Logger
    let capabilities: [String]
    var authority: EngineAuthority? = nil
    var audit: AuditLog? = nil
    /// Sessions held now: what the reconnect spread asks of the agents.
    var sessions = SessionCounter()

    /// Shared between the reader and the watchdog of one RPC.
    private final class SessionSlot: Sendable {
        let value = Mutex<AgentSession?>(nil)
    }

    func session(
        request: RPCAsyncSequence<AgentMessage, any Error>,
        response: RPCWriter<EngineMessage>,
        context: ServerContext
    ) async throws {
        // This task lives as long as the session and keeps, all that time, the memory its deepest
        // stack of async frames ever needed (an async frame has a slot for every temporary of its
        // function). So what only admitting a session needs is synchronous, what only ending one
        // needs runs at its end, and the frames that wait are small: 11.8 KiB per session when
        // all of it was in this function, about 1.1 KiB now (`serve` 848 bytes, this 256).
        switch self.admit(context) {
        case .success(let admitted): try await self.serve(admitted, request: request, response: response)
        case .failure(let refusal): throw await self.refused(refusal)
        }
    }

    @inline(never)
    private func refused(_ refusal: Refusal) async -> RPCError {
        await self.refuse(refusal.error, instanceID: refusal.instanceID, sessionID: refusal.sessionID, remote: refusal.remote, logger: refusal.logger)
        return refusal.error
    }

    /// Who is calling, checked before anything is read: a client certificate with the agent role,
    /// not revoked.
    /// (Classes: the frames that hold them hold one reference.)
    private final class Admitted: Sendable {
        let sessionID: String
        let remote: String
        let certificate: Certificate
        let peer: PeerIdentity
        let logger: Logger
        init(sessionID: String, remote: String, certificate: Certificate, peer: PeerIdentity, logger: Logger) {
            (self.sessionID, self.remote, self.certificate, self.peer, self.logger) = (sessionID, remote, certificate, peer, logger)
        }
    }

    private final class Refusal: Error {
        let error: RPCError
        let instanceID: String
        let sessionID: String
        let remote: String
        let logger: Logger
        init(error: RPCError, instanceID: String, sessionID: String, remote: String, logger: Logger) {
            (self.error, self.instanceID, self.sessionID, self.remote, self.logger) = (error, instanceID, sessionID, remote, logger)
        }
    }

    /// Synchronous on purpose: a task keeps the largest stack of async frames it ever needed for
    /// as long as it lives, and this one lives as long as the session (not inlined: its temporaries
    /// would become slots of the caller's async frame).
    @inline(never)
    private func admit(_ context: ServerContext) -> Result<Admitted, Refusal> {
        let sessionID = Self.makeSessionID()
        let remote = context.remotePeer
        var logger = self.logger
        logger[metadataKey: "session"] = "\(sessionID)"
        logger[metadataKey: "peer"] = "\(remote)"
        func refusal(_ error: RPCError, _ instanceID: String) -> Result<Admitted, Refusal> {
            .failure(Refusal(error: error, instanceID: instanceID, sessionID: sessionID, remote: remote, logger: logger))
        }

        let transport = context.transportSpecific as? HTTP2ServerTransport.Posix.Context
        guard let certificate = transport?.peerCertificate else {
            // The TLS handshake requires a certificate, so this means a misconfigured listener.
            return refusal(RPCError(code: .unauthenticated, message: "no client certificate on this connection"), "?")
        }
        let peer = PeerIdentity(certificate: certificate)
        logger[metadataKey: "certificate"] = "\(peer)"
        if let why = self.authority?.revocationReason(certificate) {
            return refusal(RPCError(code: .permissionDenied, message: "revoked: \(why)"), peer.commonName)
        }
        guard peer.role == .agent else {
            return refusal(RPCError(
                code: .permissionDenied,
                message: "a certificate with role '\(peer.roleText ?? "none")' cannot open an agent session; expected an agent certificate (OU=agent) from `quiesce ca issue --agent ID`"),
                peer.commonName)
        }
        return .success(Admitted(sessionID: sessionID, remote: remote, certificate: certificate, peer: peer, logger: logger))
    }

    /// The session itself: a writer and a reader until either side ends it.
    @inline(never)
    private func serve(
        _ admitted: Admitted, request: RPCAsyncSequence<AgentMessage, any Error>, response: RPCWriter<EngineMessage>
    ) async throws {
        let (outbound, outboundContinuation) = AsyncStream<EngineMessage>.makeStream()
        let slot = SessionSlot()
        let limits = self.limits
        // A session is counted and watched from its hello (when the slot gets it) to its end.
        defer { if let session = slot.value.withLock({ $0 }) { self.sessions.closed(session) } }
        // Only the reader task below touches the request stream.
        let inbound = UncheckedSendable(request)
        // The hello deadline is a timer on the event loop, not a task sleeping (Task.sleep arms a
        // dispatch timer); once the hello is in, the session is watched with all the others.
        let helloMissed = OnceFlag()
        let helloTimer = DeadlineTimer(after: limits.helloTimeout) {
            if slot.value.withLock({ $0 }) == nil {
                helloMissed.set()
                outboundContinuation.finish()
            }
        }
        defer { helloTimer.cancel() }

        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                // Writer: the only task that writes to the wire. The session ends through it too: a
                // closed session (silence, revocation, shutdown) or a missed hello finishes `outbound`.
                group.addTask {
                    for await message in outbound {
                        try await response.write(message)
                    }
                    try Self.writerEnded(slot: slot, helloMissed: helloMissed, helloTimeout: limits.helloTimeout)
                }
                // Reader: hello, then every message until the agent ends the stream. Opening (the
                // hello, the identity check, the registration) runs in a child task of its own: a
                // task keeps the memory its deepest await needed (its allocator's slabs) for as long
                // as it lives, and this one lives as long as the session.
                group.addTask {
                    let opened = try await withThrowingTaskGroup(of: OpenedSession.self) { open in
                        open.addTask {
                            try await self.open(
                                inbound: inbound, admitted: admitted, outbound: outboundContinuation, slot: slot, helloTimer: helloTimer)
                        }
                        guard let opened = try await open.next() else { throw CancellationError() }
                        return opened
                    }
                    let session = opened.session
                    var iterator = opened.iterator
                    while true {
                        let message: AgentMessage?
                        do { message = try await iterator.next() } catch { throw Self.readFailure(error) }
                        guard let message else { return }
                        session.heard()
                        try self.handle(message, session: session, logger: admitted.logger)
                    }
                }
                try await group.next()
                group.cancelAll()
            }
        } catch {
            throw await self.ended(by: error, admitted: admitted, session: slot.value.withLock { $0 }, outbound: outboundContinuation)
        }
        await self.closedByAgent(slot.value.withLock { $0 }, logger: admitted.logger)
    }

    /// Why the writer stopped, when it was not the agent: the session was closed, or no hello came.
    private static func writerEnded(slot: SessionSlot, helloMissed: OnceFlag, helloTimeout: Duration) throws {
        if let reason = slot.value.withLock({ $0 })?.closeReason { throw reason }
        if helloMissed.isSet {
            throw RPCError(code: .deadlineExceeded, message: "no hello within \(helloTimeout) of connecting")
        }
    }

    /// A session that ended with an error: closed, deregistered and logged (or, before its hello,
    /// recorded as refused); returns the status the RPC ends with.
    @inline(never)
    private func ended(
        by error: any Error, admitted: Admitted, session: AgentSession?, outbound: AsyncStream<EngineMessage>.Continuation
    ) async -> RPCError {
        let reason = (error as? RPCError) ?? RPCError(code: .internalError, message: "\(error)")
        let logger = admitted.logger
        if let session {
            session.close(reason: reason)
            await self.registry.remove(session, reason: Self.describe(reason))
            if reason.code == .cancelled || reason.code == .aborted {
                logger.info("agent session ended", metadata: ["instance": "\(session.instanceID)", "reason": "\(Self.describe(reason))"])
            } else {
                logger.warning("agent session ended", metadata: ["instance": "\(session.instanceID)", "reason": "\(Self.describe(reason))"])
            }
        } else {
            outbound.finish()
            await self.refuse(reason, instanceID: admitted.peer.commonName, sessionID: admitted.sessionID, remote: admitted.remote, logger: logger)
        }
        return reason
    }

    /// The agent closed its side cleanly.
    @inline(never)
    private func closedByAgent(_ session: AgentSession?, logger: Logger) async {
        guard let session else { return }
        let reason = RPCError(code: .cancelled, message: "the agent closed the session")
        session.close(reason: reason)
        await self.registry.remove(session, reason: reason.message)
        logger.info("agent session ended", metadata: ["instance": "\(session.instanceID)", "reason": "the agent closed the session"])
    }

    /// What opening a session leaves to the reader: the session and where it is in the stream.
    private struct OpenedSession: @unchecked Sendable {
        let session: AgentSession
        var iterator: RPCAsyncSequence<AgentMessage, any Error>.AsyncIterator
    }

    /// Reads and checks the hello, registers the session and answers with the engine's hello.
    @inline(never)
    private func open(
        inbound: UncheckedSendable<RPCAsyncSequence<AgentMessage, any Error>>, admitted: Admitted,
        outbound: AsyncStream<EngineMessage>.Continuation, slot: SessionSlot, helloTimer: DeadlineTimer
    ) async throws -> OpenedSession {
        let certificate = admitted.certificate, sessionID = admitted.sessionID, remote = admitted.remote, logger = admitted.logger
        var iterator = inbound.value.makeAsyncIterator()
        let first: AgentMessage?
        do { first = try await iterator.next() } catch { throw Self.readFailure(error) }
        guard let first else {
            throw RPCError(code: .cancelled, message: "the agent closed the stream before its hello")
        }
        let hello = try self.validateHello(first, certificateName: admitted.peer.commonName)
        try await self.checkIdentity(hello, remote: remote, logger: logger)
        let session = AgentSession(
            sessionID: sessionID, hello: hello, remoteAddress: remote,
            certificateFingerprint: IssuedCertificate.fingerprint(of: certificate),
            outbound: outbound, certificate: certificate, audit: self.audit)
        slot.value.withLock { $0 = session }
        helloTimer.cancel()
        self.sessions.opened(session, limits: self.limits)

        var reply = EngineMessage()
        reply.hello.protocol = .init(ProtocolVersionNumber.agentSession)
        reply.hello.engineVersion = QuiesceVersion.software
        reply.hello.sessionID = sessionID
        reply.hello.capabilities = self.capabilities
        reply.hello.heartbeatIntervalMs = self.sessions.heartbeatIntervalMs(self.limits)
        reply.hello.maxMessageBytes = UInt32(self.limits.maxMessageBytes)
        reply.hello.reconnectSpreadMs = self.sessions.spreadMs
        session.told(reconnectSpreadMs: reply.hello.reconnectSpreadMs, heartbeatIntervalMs: reply.hello.heartbeatIntervalMs)
        outbound.yield(reply)
        await self.registry.register(session)
        logger.info("agent session opened", metadata: [
            "instance": "\(hello.instanceID)", "agent_version": "\(hello.agentVersion)",
            "protocol": "\(hello.protocol.number)",
        ])
        return OpenedSession(session: session, iterator: iterator)
    }

    /// Two live sessions never share an instance id. A second claimant is let in only when it is
    /// the same agent process reconnecting (its run id, or the session it names as previous), or when
    /// the holder no longer answers (it is gone, and its session has not timed out yet). Otherwise
    /// the holder keeps the id, the newcomer is refused, and the conflict is recorded: a fleet run
    /// refuses to quiesce that instance (`identity-conflict`) until it has been quiet for a while.
    private func checkIdentity(_ hello: Quiesce_Agent_V1_AgentHello, remote: String, logger: Logger) async throws {
        guard let holder = await self.registry.session(for: hello.instanceID), !holder.isClosed else { return }
        let sameProcess = (!hello.agentRunID.isEmpty && hello.agentRunID == holder.agentRunID)
            || (!hello.previousSessionID.isEmpty && hello.previousSessionID == holder.sessionID)
        if sameProcess { return }
        let answered: Bool
        do {
            let reply = try await AuditContext.$actor.withValue("identity-probe") {
                try await holder.send(.freezeStatus(.init()), deadline: .milliseconds(1500), grace: .milliseconds(200))
            }
            answered = reply.status.isOK || reply.status.code != 0
        } catch {
            answered = false
        }
        guard answered, !holder.isClosed else { return }
        let conflict = await self.registry.noteConflict(
            instanceID: hello.instanceID, holder: holder, claimantAddress: remote, claimantRunID: hello.agentRunID)
        let message = "identity-conflict: instance \(hello.instanceID) already has a live session \(holder.sessionID) from \(holder.remoteAddress) "
            + "that answers; this connection from \(remote) holds the same certificate (a cloned image, or a copied key). Refused; "
            + "\(conflict.attempts) attempt\(conflict.attempts == 1 ? "" : "s") since \(AuditLog.timestamp(conflict.firstSeen)). Revoke the certificate "
            + "(quiesce ca revoke --agent \(hello.instanceID)) and enrol each machine with its own id."
        logger.error("identity conflict", metadata: [
            "instance": "\(hello.instanceID)", "holder": "\(holder.remoteAddress)", "claimant": "\(remote)", "attempts": "\(conflict.attempts)",
        ])
        self.audit?.append(.init(kind: "identity", actor: "source:\(remote)", action: "session", instance: hello.instanceID,
                                 result: "identity-conflict", detail: "holder \(holder.remoteAddress) session \(holder.sessionID)"))
        throw RPCError(code: .alreadyExists, message: message)
    }

    private func validateHello(_ message: AgentMessage, certificateName: String) throws -> Quiesce_Agent_V1_AgentHello {
        guard case .hello(let hello) = message.kind else {
            let found = message.kind.map { "a \($0.name)" } ?? "an empty or unknown message"
            throw RPCError(code: .invalidArgument, message: "expected a hello as the first message, found \(found)")
        }
        if let problem = ProtocolVersionNumber.agentSession.incompatibility(
            with: hello.protocol.number, peerRole: "agent", ownRole: "engine")
        {
            throw RPCError(code: .failedPrecondition, message: problem)
        }
        guard !hello.instanceID.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "the hello names no instance id; expected \"\(certificateName)\"")
        }
        guard hello.instanceID == certificateName else {
            throw RPCError(
                code: .permissionDenied,
                message: "the hello names instance \"\(hello.instanceID)\" but the client certificate belongs to \"\(certificateName)\"")
        }
        return hello
    }

    private func handle(_ message: AgentMessage, session: AgentSession, logger: Logger) throws {
        switch message.kind {
        case .result(let result):
            try session.deliver(result)
        case .heartbeat:
            break
        case .event(let event):
            session.record(event)
            logger.notice("agent event", metadata: [
                "instance": "\(session.instanceID)", "kind": "\(event.kind)", "message": "\(event.message)",
            ])
        case .hello:
            throw RPCError(code: .invalidArgument, message: "a second hello on an open session")
        case nil:
            // A newer minor version may add message kinds: skip those, but an
            // entirely empty message is a broken peer.
            guard !message.unknownFields.data.isEmpty else {
                throw RPCError(code: .invalidArgument, message: "an empty message (no kind set)")
            }
            logger.debug("skipping a message of a kind this engine does not know", metadata: ["instance": "\(session.instanceID)"])
        }
    }

    private func refuse(_ error: RPCError, instanceID: String, sessionID: String, remote: String, logger: Logger) async {
        await self.registry.recordEnd(instanceID: instanceID, sessionID: sessionID, remoteAddress: remote, reason: Self.describe(error))
        logger.warning("agent session refused", metadata: ["reason": "\(Self.describe(error))"])
    }

    /// Errors from reading the stream: undecodable or oversized messages, a reset connection.
    private static func readFailure(_ error: any Error) -> RPCError {
        if let error = error as? RPCError {
            return RPCError(code: error.code, message: "could not read a message: \(error.message)", cause: error)
        }
        return RPCError(code: .invalidArgument, message: "could not read a message: \(error)")
    }

    /// "code: message", with the underlying cause when there is one (the
    /// transport wraps "message too large" in "failed to decode").
    static func describe(_ error: RPCError) -> String {
        var text = "\(error.code): \(error.message)"
        if let cause = error.cause {
            text += " (" + ((cause as? RPCError).map(Self.describe) ?? "\(cause)") + ")"
        }
        return text
    }

    static func makeSessionID() -> String {
        var generator = SystemRandomNumberGenerator()
        return "s-" + String(generator.next() & 0xFFFF_FFFF_FFFF, radix: 16)
    }
}


/// The sessions this engine holds: their count (what the reconnect spread asks of the agents)
/// and their watchdog. One timer on an event loop goes over all of them every
/// `min(idleHeartbeat, 5 s)`: a session the agent has left silent for `silenceTimeout` is closed
/// (or for three of the longest idle intervals it was told: see ``IdleHeartbeat``), and an agent
/// whose reconnect spread or idle interval moved by more than a quarter since it last heard one is
/// told the new ones. The engine sends idle agents nothing else: an idle session costs it one
/// small read per interval (the agent's beat) and the answer to an HTTP/2 ping every 60 s, which
/// the agent sends after that long without a frame and which is how it notices an engine that
/// vanished.
///
/// One timer, not one per session (a task on Task.sleep arms a dispatch timer per session; an
/// event-loop timer per session fills the loop's timer heap, and NIO cancels a timer by searching
/// that heap, which grpc's transport does for its keepalive timer after every read).
final class SessionCounter: Sendable {
    private struct State {
        var sessions: [ObjectIdentifier: AgentSession] = [:]
        var sweeping = false
    }
    private let state = Mutex(State())

    /// A session's hello is in: it is counted and watched until ``closed(_:)``.
    func opened(_ session: AgentSession, limits: SessionLimits) {
        let start = self.state.withLock { state -> Bool in
            state.sessions[ObjectIdentifier(session)] = session
            defer { state.sweeping = true }
            return !state.sweeping
        }
        if start {
            _ = RepeatingTimer(every: min(limits.idleHeartbeat, .seconds(5))) { [weak self] in
                self?.sweep(limits) ?? false
            }
        }
    }

    func closed(_ session: AgentSession) {
        _ = self.state.withLock { $0.sessions.removeValue(forKey: ObjectIdentifier(session)) }
    }

    var count: Int { self.state.withLock { $0.sessions.count } }
    var spreadMs: UInt32 { ReconnectSpread.milliseconds(sessions: self.count) }
    func heartbeatIntervalMs(_ limits: SessionLimits) -> UInt32 {
        UInt32(IdleHeartbeat.interval(base: limits.idleHeartbeat, sessions: self.count).milliseconds)
    }

    /// One pass over the sessions; false (the timer stops) once there are none, until the next hello.
    private func sweep(_ limits: SessionLimits) -> Bool {
        let sessions = self.state.withLock { state -> [AgentSession] in
            if state.sessions.isEmpty { state.sweeping = false }
            return Array(state.sessions.values)
        }
        guard !sessions.isEmpty else { return false }
        let now = ContinuousClock.now
        let spread = self.spreadMs, interval = self.heartbeatIntervalMs(limits)
        for session in sessions where !session.isClosed {
            let silent = session.silence(now: now)
            if silent >= session.silenceLimit(base: limits.silenceTimeout) {
                session.close(reason: RPCError(code: .unavailable, message: "no message from the agent for \(silent)"))
            } else {
                session.refreshIdleHints(reconnectSpreadMs: spread, heartbeatIntervalMs: interval)
            }
        }
        return true
    }
}
