import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire
import Synchronization

/// How an engine listens. Every field has a default in ``defaults(identity:)``.
public struct EngineConfiguration: Sendable {
    /// Where agents dial in (mutual TLS). Port 0 picks a free port.
    public var listen: ListenAddress
    /// The engine's server certificate and key, and the CA that signs agents.
    public var identity: TLSFiles
    /// The admin API's unix socket (created mode 0600); nil for none.
    public var adminSocketPath: String?
    public var limits: SessionLimits
    /// The CA's directory: with it the engine issues agent certificates (enrolment, renewal)
    /// and refuses revoked ones (`DIR/revoked.json`, re-read when it changes).
    public var caDirectory: String? = nil
    /// Where new agents enrol with a join token (TLS, engine-authenticated only); needs `caDirectory`.
    public var enrolListen: ListenAddress? = nil
    /// Lifetime of the agent certificates the engine issues.
    public var agentValidity: Duration = .seconds(30 * 86_400)
    /// The audit trail (JSON lines); nil for none.
    public var auditLogPath: String? = nil
    /// The admin API over TCP with mutual TLS, for operator certificates (roles viewer and operator).
    public var operatorListen: ListenAddress? = nil

    public init(listen: ListenAddress, identity: TLSFiles, adminSocketPath: String?, limits: SessionLimits) {
        self.listen = listen
        self.identity = identity
        self.adminSocketPath = adminSocketPath
        self.limits = limits
    }

    public static let defaultListen = ListenAddress(host: .ipv4("127.0.0.1"), port: 7443)
    public static let defaultAdminSocket = "/run/quiesce/admin.sock"

    public static func defaults(identity: TLSFiles) -> Self {
        Self(listen: Self.defaultListen, identity: identity, adminSocketPath: Self.defaultAdminSocket, limits: .defaults)
    }
}

/// The engine: the agents' gRPC listener, the registry of their sessions, the
/// admin API, and the call that sends a command to an instance.
public final class Engine: Sendable {
    public let configuration: EngineConfiguration
    public let registry: SessionRegistry
    public let startedAt = Date()
    let caFingerprint: String
    /// Issuing and revocation, when the engine has its CA directory.
    public let authority: EngineAuthority?
    public let audit: AuditLog?
    private let enrolTransport = Mutex<HTTP2ServerTransport.Posix?>(nil)
    private let operatorTransport = Mutex<HTTP2ServerTransport.Posix?>(nil)
    private let logger: Logger
    private let state = Mutex<RunState>(RunState())
    private let boundAddress = AsyncStream<Result<ListenAddress, any Error>>.makeStream(bufferingPolicy: .bufferingNewest(1))

    private struct RunState {
        var shutdownRequested = false
        var shutdownActions: [@Sendable () -> Void] = []
        var address: Result<ListenAddress, any Error>?
    }

    /// - Throws: `PKIError` naming the file when a certificate or key is unusable.
    public init(configuration: EngineConfiguration, logger: Logger = Logger(label: "quiesce.engine")) throws {
        let (_, root) = try configuration.identity.validate()
        self.configuration = configuration
        self.caFingerprint = IssuedCertificate.fingerprint(of: root)
        self.registry = SessionRegistry()
        self.logger = logger
        self.authority = try configuration.caDirectory.map { try EngineAuthority(directory: CADirectory(path: $0), agentValidity: configuration.agentValidity) }
        self.audit = try configuration.auditLogPath.map { try AuditLog(path: $0) }
        if configuration.enrolListen != nil && self.authority == nil {
            throw EngineError.listenFailed(address: configuration.enrolListen!.description, detail: "enrolment needs the CA directory (--ca-dir) to issue certificates")
        }
    }

    /// The enrolment port's address, once bound.
    public func enrolAddress() async throws -> ListenAddress { try await self.bound({ self.enrolTransport.withLock { $0 } }, "enrolment") }

    /// The remote admin port's address, once bound.
    public func operatorAddress() async throws -> ListenAddress { try await self.bound({ self.operatorTransport.withLock { $0 } }, "operator") }

    private func bound(_ slot: () -> HTTP2ServerTransport.Posix?, _ what: String) async throws -> ListenAddress {
        for _ in 0..<500 {
            if let transport = slot() {
                if let address = ListenAddress(bound: try await transport.listeningAddress) { return address }
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw EngineError.listenFailed(address: "-", detail: "no \(what) listener")
    }

    /// Serves until ``shutdown()`` or until the task is cancelled; both stop it
    /// gracefully (sessions closed, accepted connections served out), and it
    /// returns once the servers have stopped. `adminServices` are served on the
    /// admin socket next to the engine's own (`quiesce serve` adds fleet runs
    /// there).
    public func run(adminServices: [any RegistrableRPCService] = []) async throws {
        // Before any server is built (one built and never served must not be dropped):
        // a socket path another engine serves is an error for whoever waits in
        // listeningAddress() too, which would otherwise wait for good.
        if let path = self.configuration.adminSocketPath {
            do {
                try Self.prepareSocketPath(path)
            } catch {
                self.publish(.failure(error))
                throw error
            }
        }
        let registry = self.registry
        let logger = self.logger
        let agentTransport = SecureTransports.agentListener(
            address: self.configuration.listen, identity: self.configuration.identity, limits: self.configuration.limits
        ) { peer, error in
            var reason = (error as? RPCError).map { AgentSessionService.describe($0) } ?? "\(error)"
            if reason.contains("Failed to decode message") {
                // grpc-swift-nio-transport reports an over-limit message this way, without its size.
                reason += " (a gRPC frame over the \(self.configuration.limits.maxMessageBytes)-byte message limit, or a malformed frame)"
            }
            logger.warning("agent stream failed in the transport", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
            Task { await registry.recordEnd(instanceID: "?", sessionID: "-", remoteAddress: peer, reason: "transport: " + reason) }
        } refuse: { [authority = self.authority] der in
            authority?.revocationReason(der: der)
        } onRefused: { [audit = self.audit] peer, reason in
            logger.warning("revoked certificate refused at the handshake", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
            audit?.append(.init(kind: "identity", actor: "source:\(peer)", action: "handshake", instance: "?", result: "revoked", detail: reason))
            Task { await registry.recordEnd(instanceID: "?", sessionID: "-", remoteAddress: peer, reason: "revoked: " + reason) }
        }
        var agentServices: [any RegistrableRPCService] = [AgentSessionService(
            registry: self.registry, limits: self.configuration.limits, logger: self.logger,
            capabilities: ["commands", "heartbeat"], authority: self.authority, audit: self.audit)]
        var enrolServer: GRPCServer<HTTP2ServerTransport.Posix>?
        if let authority = self.authority {
            let agentPort: @Sendable () async -> Int = { (try? await self.listeningAddress().port) ?? 0 }
            agentServices.append(EnrolmentService(authority: authority, port: .agent, agentPort: agentPort, logger: self.logger, audit: self.audit))
            if let address = self.configuration.enrolListen {
                let transport = SecureTransports.enrolListener(address: address, identity: self.configuration.identity)
                self.enrolTransport.withLock { $0 = transport }
                enrolServer = GRPCServer(
                    transport: transport,
                    services: [EnrolmentService(authority: authority, port: .enrolment, agentPort: agentPort, logger: self.logger, audit: self.audit)])
            }
        }
        let agentServer = GRPCServer(transport: agentTransport, services: agentServices)
        let enrolment = enrolServer
        let adminServer: GRPCServer<HTTP2ServerTransport.Posix>?
        if let path = self.configuration.adminSocketPath {
            adminServer = GRPCServer(
                transport: SecureTransports.adminListener(socketPath: path), services: [AdminService(engine: self)] + adminServices,
                interceptors: self.audit.map { [AdminAuditInterceptor(audit: $0, actor: "admin:local")] } ?? [])
        } else {
            adminServer = nil
        }
        var operatorServer: GRPCServer<HTTP2ServerTransport.Posix>?
        if let address = self.configuration.operatorListen {
            let transport = SecureTransports.operatorListener(address: address, identity: self.configuration.identity) { [authority = self.authority] der in
                authority?.revocationReason(der: der)
            } onRefused: { [audit = self.audit] peer, reason in
                audit?.append(.init(kind: "identity", actor: "source:\(peer)", action: "handshake", instance: "", result: "revoked", detail: reason))
            }
            self.operatorTransport.withLock { $0 = transport }
            operatorServer = GRPCServer(
                transport: transport, services: [AdminService(engine: self)] + adminServices,
                interceptors: [OperatorGate(authority: self.authority, audit: self.audit, logger: self.logger)])
        }
        let operators = operatorServer
        let stopNow = self.state.withLock { state -> Bool in
            if state.shutdownRequested { return true }
            state.shutdownActions = [agentServer.beginGracefulShutdown, { adminServer?.beginGracefulShutdown() }, { enrolment?.beginGracefulShutdown() }, { operators?.beginGracefulShutdown() }]
            return false
        }
        if stopNow {
            self.publish(.failure(EngineError.stopped))
            return
        }
        // Cancelling the serving task would be unsafe: NIO traps ("Deinited
        // NIOAsyncWriter without calling finish()") when a server's task is
        // cancelled while an accepted connection still waits in its queue
        // (apple/swift-nio#3481), and connections arrive at any moment: agents
        // redialling, admin clients, an engine probing the admin socket. So the
        // servers run in a task that does not inherit cancellation, and
        // cancelling this one begins the graceful shutdown, which serves out
        // what was accepted and closes it; run returns once the servers have
        // stopped. The servers' tasks run on the event loops (see EventLoopTaskExecutor).
        let serving = Task(executorPreference: EventLoopTaskExecutor.shared) {
            try await self.serve(agentServer: agentServer, adminServer: adminServer, enrolServer: enrolment, operatorServer: operators, agentTransport: agentTransport)
        }
        try await withTaskCancellationHandler {
            try await serving.value
        } onCancel: {
            self.shutdown()
        }
    }

    private func serve(
        agentServer: GRPCServer<HTTP2ServerTransport.Posix>, adminServer: GRPCServer<HTTP2ServerTransport.Posix>?,
        enrolServer: GRPCServer<HTTP2ServerTransport.Posix>?, operatorServer: GRPCServer<HTTP2ServerTransport.Posix>?,
        agentTransport: HTTP2ServerTransport.Posix
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await agentServer.serve() }
            if let adminServer { group.addTask { try await adminServer.serve() } }
            if let enrolServer { group.addTask { try await enrolServer.serve() } }
            if let operatorServer { group.addTask { try await operatorServer.serve() } }
            if self.authority != nil {
                // Revocations take effect at once: the list is re-read when its file changes, and live
                // sessions holding a newly revoked certificate are ended (PERMISSION_DENIED, with the reason).
                group.addTask {
                    while !self.state.withLock({ $0.shutdownRequested }) {
                        try? await Task.sleep(for: .milliseconds(250))
                        await self.enforceRevocations()
                    }
                }
            }
            group.addTask {
                do {
                    let bound = try await agentTransport.listeningAddress
                    guard let address = ListenAddress(bound: bound) else {
                        throw EngineError.listenFailed(address: "\(bound)", detail: "not an IP address")
                    }
                    // Thousands of agents dialling at once must not overflow the accept queue.
                    ListenBacklog.raise(port: address.port)
                    self.publish(.success(address))
                    if let path = self.configuration.adminSocketPath {
                        _ = try await adminServer?.listeningAddress
                        chmod(path, 0o600)
                    }
                    self.logger.info("engine listening", metadata: [
                        "agents": "\(address)", "admin": "\(self.configuration.adminSocketPath ?? "none")",
                    ])
                } catch {
                    self.publish(.failure(error))
                    throw error
                }
            }
            do {
                try await group.waitForAll()
            } catch {
                self.publish(.failure(error))
                throw EngineError.listenFailed(address: self.configuration.listen.description, detail: "\(error)")
            }
        }
        if let path = self.configuration.adminSocketPath { unlink(path) }
    }

    /// Re-reads the revocation list if it changed and ends every live session it now refuses.
    public func enforceRevocations() async {
        guard let authority = self.authority, await authority.reloadIfChanged() else { return }
        let closed = await self.registry.closeRefused { session in session.certificate.flatMap { authority.revocationReason($0) } }
        for (instance, reason) in closed {
            self.logger.warning("revoked certificate: session ended", metadata: ["instance": "\(instance)", "reason": "\(reason)"])
            self.audit?.append(.init(kind: "identity", actor: "engine", action: "revoke", instance: instance, result: "session-ended", detail: reason))
        }
    }

    private func publish(_ result: Result<ListenAddress, any Error>) {
        let first = self.state.withLock { state -> Bool in
            guard state.address == nil else { return false }
            state.address = result
            return true
        }
        if first { self.boundAddress.continuation.yield(result) }
    }

    /// The address agents can dial, once the listener is bound.
    public func listeningAddress() async throws -> ListenAddress {
        if let known = self.state.withLock({ $0.address }) { return try known.get() }
        for await result in self.boundAddress.stream {
            self.boundAddress.continuation.yield(result)  // keep it for the next caller
            return try result.get()
        }
        throw EngineError.stopped
    }

    /// Closes every session (pending commands fail with `.unavailable`) and stops listening.
    public func shutdown() {
        let actions = self.state.withLock { state -> [@Sendable () -> Void] in
            state.shutdownRequested = true
            return state.shutdownActions
        }
        let registry = self.registry
        Task {
            await registry.closeAll(reason: RPCError(code: .unavailable, message: "the engine is shutting down"))
            for action in actions { action() }
        }
    }

    /// Sends `action` to `instanceID`'s agent and waits for its answer.
    /// - Throws: `EngineError.noSession` when the instance has no live session,
    ///   or the `RPCError` from ``AgentSession/send(_:deadline:grace:)``.
    public func send(_ action: AgentCommand.OneOf_Action, to instanceID: String, deadline: Duration? = nil) async throws
        -> CommandResult
    {
        try await self.liveSession(for: instanceID).send(action, deadline: deadline ?? self.configuration.limits.defaultCommandDeadline)
    }

    /// The instance's live session.
    /// - Throws: `EngineError.noSession`, with how its last session ended if it had one.
    func liveSession(for instanceID: String) async throws -> AgentSession {
        let session = await self.registry.session(for: instanceID)
        // A session that has just closed can still be registered for a moment (the
        // registry hears of the end after the session does): it is not live either.
        if let session, !session.isClosed { return session }
        let lastEnd = await self.registry.endedSessions().last { $0.instanceID == instanceID }?.reason
        throw EngineError.noSession(instanceID: instanceID, lastEnd: lastEnd ?? session?.closeReason?.message)
    }

    /// Asks an agent for its facts; `includeHookHashes` has it hash every hook (what plans pin).
    public func facts(of instanceID: String, includeHookHashes: Bool = false, timeout: Duration = .seconds(10)) async throws -> Facts {
        let result = try await self.send(.facts(.with { $0.includeHookHashes = includeHookHashes }), to: instanceID, deadline: timeout)
        guard result.status.isOK, case .facts(let facts) = result.payload else {
            throw EngineError.commandFailed(
                instanceID: instanceID, action: "facts", code: result.status.rpcCode.description, message: result.status.message)
        }
        return facts
    }

    /// Removes a stale socket file (nothing listening) and makes its directory (0700).
    static func prepareSocketPath(_ path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty && !FileManager.default.fileExists(atPath: directory) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        guard path.utf8.count < 104 else {
            throw EngineError.badSocketPath(path: path, detail: "unix socket paths must be shorter than 104 bytes")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else {
            throw EngineError.badSocketPath(path: path, detail: "exists and is not a socket; refusing to replace it")
        }
        if UnixSocket.answers(path) {
            throw EngineError.badSocketPath(path: path, detail: "another engine is already listening here")
        }
        unlink(path)
    }
}

public enum EngineError: Error, CustomStringConvertible, Sendable {
    case noSession(instanceID: String, lastEnd: String?)
    case commandFailed(instanceID: String, action: String, code: String, message: String)
    case listenFailed(address: String, detail: String)
    case badSocketPath(path: String, detail: String)
    case stopped

    public var description: String {
        switch self {
        case .noSession(let id, let lastEnd):
            "no agent session for instance \"\(id)\"" + (lastEnd.map { "; its last session ended with \($0)" } ?? " (it never connected)")
        case .commandFailed(let id, let action, let code, let message):
            "\(action) on \(id) failed: \(code): \(message)"
        case .listenFailed(let address, let detail):
            "could not listen on \(address): \(detail)"
        case .badSocketPath(let path, let detail):
            "admin socket \(path): \(detail)"
        case .stopped:
            "the engine stopped before it was listening"
        }
    }
}
