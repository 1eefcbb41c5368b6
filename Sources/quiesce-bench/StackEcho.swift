import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire

/// The bare stack's round trip: the same transports as the engine and the
/// agent (SecureTransports: mutual TLS, HTTP/2, the session's flush settings),
/// the same Session RPC and messages, but none of Quiesce's engine code on the
/// path — no registry, no command tracking, no deadlines. The server (in the
/// bench's process, as the engine is) writes a command and waits for the
/// answer. Its peer is either `quiesce-bench stack-echo` (its own process with
/// one event loop, as the agent: it echoes each command's id back, no agent
/// code either), which gives the floor for any engine ↔ agent exchange built on
/// grpc-swift here; or the real quiesce-agent, which gives the agent's share of
/// what a command adds to that (the rest is the engine's).
enum StackRoundTrip {
    struct Result: Sendable {
        var warm: [Duration] = []
        var afterIdle: [Duration] = []
    }

    /// The process at the other end: the executable, and its arguments before the
    /// connection's (`--engine host:port --cert … --key … --ca …` are appended).
    struct Peer {
        var executable: String
        var arguments: [String]
        var environment: [String: String] = [:]
        /// SIGTERM and wait (an agent thaws, ends its guard), or SIGKILL.
        var gentle = false
    }

    /// Times `runs` round trips back to back and `runs` after `idle` of quiet each.
    static func measure(ca: CADirectory, peer: Peer, instance: String, work: String, runs: Int, idle: Duration) async throws -> Result {
        let probe = Probe(runs: runs, idle: idle)
        let listener = SecureTransports.agentListener(
            address: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles)
        let server = GRPCServer(transport: listener, services: [probe])
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.serve() }
            defer { server.beginGracefulShutdown() }
            guard let bound = try await listener.listeningAddress.ipv4 else { throw ValidationError("the echo listener has no IPv4 address") }
            if !FileManager.default.fileExists(atPath: ca.agentFiles(instanceID: instance).certificatePath) {
                try ca.issue(.agent(instanceID: instance))
            }
            let files = ca.agentFiles(instanceID: instance)
            let log = work + "/\(instance).log"
            let process = try FreezeWindow.start(
                peer.executable,
                peer.arguments + [
                    "--engine", "127.0.0.1:\(bound.port)", "--cert", files.certificatePath, "--key", files.keyPath, "--ca", files.trustRootsPath,
                ],
                log: log, environment: peer.environment)
            defer {
                kill(process.processIdentifier, peer.gentle ? SIGTERM : SIGKILL)
                process.waitUntilExit()
            }
            // The probe's outcome, or nothing within a minute (a peer that never dialled).
            let outcome = await withTaskGroup(of: Swift.Result<Result, any Error>?.self) { race in
                race.addTask { await probe.outcome.first { _ in true } }
                race.addTask { try? await Task.sleep(for: .seconds(60)); return nil }
                defer { race.cancelAll() }
                return await race.next() ?? nil
            }
            guard let outcome else { throw ValidationError("\(peer.executable) did not finish its round trips; see \(log)") }
            return try outcome.get()
        }
    }

    /// The engine's end: one session, commands written straight from the handler.
    final class Probe: Quiesce_Agent_V1_AgentService.SimpleServiceProtocol, Sendable {
        let runs: Int
        let idle: Duration
        /// The session's measurements or its error, once.
        let outcome: AsyncStream<Swift.Result<Result, any Error>>
        private let report: AsyncStream<Swift.Result<Result, any Error>>.Continuation

        init(runs: Int, idle: Duration) {
            self.runs = runs
            self.idle = idle
            (self.outcome, self.report) = AsyncStream.makeStream()
        }

        func session(
            request: RPCAsyncSequence<Quiesce_Agent_V1_AgentMessage, any Error>, response: RPCWriter<Quiesce_Agent_V1_EngineMessage>,
            context: ServerContext
        ) async throws {
            var iterator = request.makeAsyncIterator()
            do {
                guard let first = try await iterator.next() else { throw ValidationError("the peer closed before its first message") }
                if case .hello = first.kind {
                    // What a real agent needs before it takes commands: the engine's hello (no idle
                    // heartbeats from it for an hour, so every answer read below is a command's).
                    var hello = Quiesce_Agent_V1_EngineMessage()
                    hello.hello.protocol = .init(ProtocolVersionNumber.agentSession)
                    hello.hello.sessionID = "stack-probe"
                    hello.hello.heartbeatIntervalMs = 3_600_000
                    try await response.write(hello)
                }
                var result = Result()
                var id: UInt64 = 0
                for pause in [Duration.zero, self.idle] {
                    for _ in 0..<self.runs {
                        if pause > .zero { try await Task.sleep(for: pause) }
                        id += 1
                        var message = Quiesce_Agent_V1_EngineMessage()
                        message.command.id = id
                        message.command.freezeStatus = .init()
                        let t0 = ContinuousClock.now
                        try await response.write(message)
                        var answer: Quiesce_Agent_V1_CommandResult?
                        while answer == nil {  // an agent's heartbeat or event is not the answer
                            guard let next = try await iterator.next() else { throw ValidationError("the peer closed after \(id - 1) answers") }
                            if case .result(let result) = next.kind { answer = result }
                        }
                        let elapsed = ContinuousClock.now - t0
                        guard let answer, answer.commandID == id else {
                            throw ValidationError("expected the answer to command \(id), found one to \(answer?.commandID ?? 0)")
                        }
                        if pause > .zero { result.afterIdle.append(elapsed) } else { result.warm.append(elapsed) }
                    }
                }
                self.deliver(.success(result))
            } catch {
                self.deliver(.failure(error))
                throw error
            }
        }

        private func deliver(_ result: Swift.Result<Result, any Error>) {
            self.report.yield(result)
            self.report.finish()
        }
    }
}

/// The agent's end of the bare round trip (started by `freeze`, not by hand).
struct StackEcho: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stack-echo",
        abstract: "Dial an engine-like listener and answer every command at once (the bare stack's round trip; started by 'freeze').",
        shouldDisplay: false)

    @Option(help: ArgumentHelp("The listener to dial.", valueName: "host:port"))
    var engine: String
    @Option(help: ArgumentHelp("Client certificate (PEM).", valueName: "path"))
    var cert: String
    @Option(help: ArgumentHelp("Its private key (PEM).", valueName: "path"))
    var key: String
    @Option(help: ArgumentHelp("The CA certificate to trust (PEM).", valueName: "path"))
    var ca: String

    func run() async throws {
        let transport = SecureTransports.agentDialer(
            engine: try ListenAddress(parsing: self.engine), identity: TLSFiles(certificatePath: self.cert, keyPath: self.key, trustRootsPath: self.ca))
        try await withGRPCClient(transport: transport) { client in
            let service = Quiesce_Agent_V1_AgentService.Client(wrapping: client)
            let (outbound, continuation) = AsyncStream<Quiesce_Agent_V1_AgentMessage>.makeStream()
            var hello = Quiesce_Agent_V1_AgentMessage()
            hello.hello.instanceID = "bench-stack-echo"
            continuation.yield(hello)
            let request = StreamingClientRequest<Quiesce_Agent_V1_AgentMessage> { writer in
                for await message in outbound { try await writer.write(message) }
            }
            try await service.session(request: request) { response in
                for try await message in response.messages {
                    guard case .command(let command) = message.kind else { continue }
                    var answer = Quiesce_Agent_V1_AgentMessage()
                    answer.result.commandID = command.id
                    continuation.yield(answer)
                }
                continuation.finish()
            }
        }
    }
}
