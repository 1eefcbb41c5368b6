import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import QuiesceAgent
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Synchronization
import X509

/// A real engine on 127.0.0.1 with a throw-away CA, and helpers to dial it the
/// way a good agent, a bad agent or a stock gRPC client would.
final class Fleet: Sendable {
    let directory: String
    let ca: CADirectory
    let engine: Engine
    let address: ListenAddress
    let engineTask: Task<Void, any Error>

    static func start(limits: SessionLimits = .defaults, port: Int = 0, directory: String? = nil,
                      configure: (inout EngineConfiguration) -> Void = { _ in }) async throws -> Fleet {
        let directory = directory ?? FileManager.default.temporaryDirectory
            .appendingPathComponent("quiesce-test-\(UUID().uuidString.prefix(8))").path
        let ca = CADirectory(path: directory + "/ca")
        // Key files are written and fsynced: on a thread of its own, not the cooperative pool.
        if !ca.exists { _ = try await blocking { try ca.initialize(names: ["localhost"], ipAddresses: ["127.0.0.1"]) } }
        var logger = Logger(label: "test.engine")
        logger.logLevel = ProcessInfo.processInfo.environment["QUIESCE_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
        var configuration = EngineConfiguration(
            listen: ListenAddress(host: .ipv4("127.0.0.1"), port: port), identity: ca.engineFiles,
            adminSocketPath: directory + "/admin.sock", limits: limits)
        configure(&configuration)
        let engine = try Engine(configuration: configuration, logger: logger)
        let task = Task { try await engine.run() }
        let address: ListenAddress
        do {
            address = try await engine.listeningAddress()
        } catch {
            // An engine that could not listen must not keep its admin socket (a retry would meet it).
            engine.shutdown()
            task.cancel()
            throw error
        }
        return Fleet(directory: directory, ca: ca, engine: engine, address: address, task: task)
    }

    private init(directory: String, ca: CADirectory, engine: Engine, address: ListenAddress, task: Task<Void, any Error>) {
        self.directory = directory
        self.ca = ca
        self.engine = engine
        self.address = address
        self.engineTask = task
    }

    /// For `defer`: begins the engine's shutdown and removes the test's files now,
    /// without waiting (a `defer` cannot await, and a Task might outlive the test run).
    func discard() {
        self.engine.shutdown()
        self.engineTask.cancel()
        // The engine unlinks its admin socket as it stops, racing the removal: retry briefly.
        for _ in 0..<50 where FileManager.default.fileExists(atPath: self.directory) {
            try? FileManager.default.removeItem(atPath: self.directory)
            usleep(20_000)
        }
    }

    /// Stops the engine; keeps the directory when `keepFiles` (an engine restart test).
    func stop(keepFiles: Bool = false) async {
        self.engine.shutdown()
        _ = try? await self.engineTask.value
        if !keepFiles { try? FileManager.default.removeItem(atPath: self.directory) }
    }

    func agentFiles(_ id: String) throws -> TLSFiles {
        let files = self.ca.agentFiles(instanceID: id)
        if !FileManager.default.fileExists(atPath: files.certificatePath) { try self.ca.issue(.agent(instanceID: id)) }
        return files
    }

    /// The same from async code, on a thread of its own: issuing writes and
    /// fsyncs key files, which must not hold up the cooperative pool that the
    /// engines and agents of the tests running beside this one depend on.
    func agentFiles(_ id: String) async throws -> TLSFiles {
        try await blocking { try self.agentFiles(id) }
    }

    func agent(_ id: String, instanceID: String? = nil, handler: any CommandHandling = BuiltinCommandHandler(),
               files: TLSFiles? = nil, backoff: Backoff = Backoff(base: .milliseconds(50), cap: .milliseconds(200))) async throws -> AgentRunner {
        let identity: TLSFiles
        if let files { identity = files } else { identity = try await self.agentFiles(id) }
        var logger = Logger(label: "test.agent")
        logger.logLevel = .critical
        return AgentRunner(
            configuration: AgentConfiguration(
                engine: self.address, identity: identity, instanceID: instanceID, backoff: backoff),
            handler: handler, logger: logger)
    }

    /// Starts an agent and waits for its session.
    func connect(_ id: String, handler: any CommandHandling = BuiltinCommandHandler()) async throws -> (AgentRunner, Task<Void, any Error>) {
        let runner = try await self.agent(id, handler: handler)
        let task = Task { try await runner.run() }
        let missing = await self.engine.registry.waitFor([id], timeout: .seconds(10))
        guard missing.isEmpty else { throw TestFailure("agent \(id) did not connect: \(runner.lastError ?? "no error")") }
        await runner.waitForPhase { if case .connected = $0 { true } else { false } }
        return (runner, task)
    }

    /// Issues a certificate with arbitrary properties into a side directory.
    func customIdentity(_ name: String, authority: CertificateAuthority? = nil, request: CertificateAuthority.Request) throws -> TLSFiles {
        let authority = try authority ?? self.ca.load()
        let files = TLSFiles(
            certificatePath: "\(self.directory)/custom/\(name).pem", keyPath: "\(self.directory)/custom/\(name).key",
            trustRootsPath: self.ca.caCertificatePath)
        try CADirectory.write(try authority.issue(request), files: files, overwrite: true)
        return files
    }

    /// A client transport with any security, for clients the engine must refuse.
    func transport(_ security: HTTP2ClientTransport.Posix.TransportSecurity) throws -> HTTP2ClientTransport.Posix {
        try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: self.address.port), transportSecurity: security)
    }

    func mTLS(_ files: TLSFiles) -> HTTP2ClientTransport.Posix.TransportSecurity {
        .mTLS(certificateChain: [.file(path: files.certificatePath, format: .pem)], privateKey: .file(path: files.keyPath, format: .pem)) {
            $0.trustRoots = .certificates([.file(path: self.ca.caCertificatePath, format: .pem)])
            $0.serverCertificateVerification = .fullVerification
        }
    }

    /// Opens a session as a stock client would, sends `messages` (already
    /// serialized, so they can be garbage), and returns what came back until
    /// the engine ended the RPC, with the status it ended with.
    func rawSession(
        _ security: HTTP2ClientTransport.Posix.TransportSecurity, sending messages: [[UInt8]], holdOpen: Duration = .seconds(3)
    ) async throws -> (replies: [EngineMessage], error: RPCError?) {
        let transport = try self.transport(security)
        return try await withGRPCClient(transport: transport) { client in
            var options = CallOptions.defaults
            options.waitForReady = false
            options.timeout = .seconds(15)
            let request = StreamingClientRequest<[UInt8]> { writer in
                for message in messages { try await writer.write(message) }
                try await Task.sleep(for: holdOpen)
            }
            do {
                return try await client.bidirectionalStreaming(
                    request: request, descriptor: Quiesce_Agent_V1_AgentService.Method.Session.descriptor,
                    serializer: RawSerializer(), deserializer: ProtobufDeserializer<EngineMessage>(), options: options
                ) { response in
                    var replies: [EngineMessage] = []
                    do {
                        for try await message in response.messages { replies.append(message) }
                        return (replies, nil)
                    } catch let error as RPCError {
                        return (replies, error)
                    }
                }
            } catch let error as RPCError {
                return ([], error)
            }
        }
    }

    /// The reasons recorded for sessions that ended.
    func endReasons() async -> [String] { await self.engine.registry.endedSessions().map(\.reason) }
}

struct RawSerializer: MessageSerializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func hello(_ instanceID: String, major: UInt32 = ProtocolVersionNumber.agentSession.major) -> AgentMessage {
    var message = AgentMessage()
    message.hello.protocol.major = major
    message.hello.protocol.minor = 0
    message.hello.agentVersion = "test"
    message.hello.instanceID = instanceID
    return message
}

extension AgentMessage {
    var bytes: [UInt8] { get throws { try self.serializedBytes() } }
}

/// A test handler around the built-in agent's: everything passes to `inner` but what the handler changes.
protocol WrapsBuiltinHandler: CommandHandling {
    var inner: BuiltinCommandHandler { get }
}

extension WrapsBuiltinHandler {
    var capabilities: [String] { self.inner.capabilities }
    func prepare() async { await self.inner.prepare() }
    func sessionOpened(events: @escaping @Sendable (Quiesce_Agent_V1_AgentEvent) -> Void) { self.inner.sessionOpened(events: events) }
    func engineHeard() { self.inner.engineHeard() }
    func sessionEnded() async { await self.inner.sessionEnded() }
    func shutdown() async { await self.inner.shutdown() }
    var isFrozen: Bool { self.inner.isFrozen }
}

/// A handler whose commands take as long as the test says, and that records cancellations.
final class ScriptedHandler: CommandHandling {
    let delays: Mutex<[UInt64: Duration]> = Mutex([:])
    let cancelled: Mutex<Set<UInt64>> = Mutex([])
    let delay: @Sendable (AgentCommand) -> Duration

    init(delay: @escaping @Sendable (AgentCommand) -> Duration) { self.delay = delay }

    var capabilities: [String] { ["facts"] }

    func perform(_ command: AgentCommand) async -> CommandResult {
        var result = CommandResult()
        result.commandID = command.id
        do {
            try await Task.sleep(for: self.delay(command))
            result.facts.hostname = "answered-\(command.id)"
        } catch {
            _ = self.cancelled.withLock { $0.insert(command.id) }
            result.status = .init(code: .cancelled, message: "cancelled")
        }
        return result
    }
}

/// Answers every command late, whatever happens: it ignores cancellation and the
/// command's deadline (what a wedged agent looks like to the engine).
final class DeafHandler: CommandHandling {
    let answerAfter: Duration
    init(answerAfter: Duration) { self.answerAfter = answerAfter }
    var capabilities: [String] { ["facts"] }

    func perform(_ command: AgentCommand) async -> CommandResult {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().asyncAfter(deadline: .now() + self.answerAfter.timeInterval) { continuation.resume() }
        }
        var result = CommandResult()
        result.commandID = command.id
        result.facts.hostname = "too-late-\(command.id)"
        return result
    }
}
