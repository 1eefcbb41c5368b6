import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import QuiesceAgent
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceWire
import Testing
import X509

/// What the engine refuses, and what the operator then sees. TLS refusals
/// happen in the handshake: the engine never sees a hello.
@Suite("Refusals")
struct RefusalTests {
    /// Runs one session attempt with `files` and returns the agent's error.
    func attempt(_ fleet: Fleet, files: TLSFiles, instanceID: String? = nil) async throws -> String {
        let runner = try await fleet.agent("unused", instanceID: instanceID, files: files)
        let end = await runner.runSession()
        #expect(!end.established)
        let error = try #require(end.error, "the session was not refused")
        return "\(error)"
    }

    @Test("a client with no certificate is refused in the handshake")
    func noCertificate() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, error) = try await fleet.rawSession(
            .tls { $0.trustRoots = .certificates([.file(path: fleet.ca.caCertificatePath, format: .pem)]) },
            sending: [try hello("i-anon").bytes])
        #expect(error?.code == .unavailable)
        #expect(await fleet.engine.registry.count == 0)
        #expect(await fleet.endReasons().isEmpty, "the refusal must happen before any session exists")
    }

    @Test("plaintext is refused")
    func plaintext() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, error) = try await fleet.rawSession(.plaintext, sending: [try hello("i-plain").bytes])
        #expect(error?.code == .unavailable)
        #expect(await fleet.engine.registry.count == 0)
    }

    @Test("a certificate from another CA is refused")
    func otherCA() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let stranger = try CertificateAuthority.create(commonName: "Some other CA")
        let files = try fleet.customIdentity("stranger", authority: stranger, request: .agent(instanceID: "i-stranger"))
        let error = try await self.attempt(fleet, files: files)
        #expect(error.contains("unavailable"))
        #expect(await fleet.engine.registry.count == 0)
    }

    @Test("an expired certificate is refused")
    func expired() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let files = try fleet.customIdentity("expired", request: .init(
            commonName: "i-expired", role: .agent, notBefore: Date().addingTimeInterval(-10 * 86_400), validity: .seconds(86_400)))
        let certificate = try CADirectory.readCertificate(files.certificatePath)
        #expect(certificate.notValidAfter < Date())
        _ = try await self.attempt(fleet, files: files)
        #expect(await fleet.engine.registry.count == 0)
    }

    @Test("a server-only certificate presented as a client is refused")
    func serverOnlyCertificate() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let files = try fleet.customIdentity("server-only", request: .init(
            commonName: "i-server", role: .agent, extendedKeyUsage: [.serverAuth]))
        _ = try await self.attempt(fleet, files: files)
        #expect(await fleet.engine.registry.count == 0)
        // The same name with clientAuth works, so it was the key usage that was refused.
        let good = try fleet.customIdentity("client", request: .agent(instanceID: "i-server"))
        let runner = try await fleet.agent("i-server", files: good)
        let task = Task { try await runner.run() }
        defer { task.cancel() }
        #expect(await fleet.engine.registry.waitFor(["i-server"], timeout: .seconds(10)).isEmpty)
    }

    @Test("a hello whose instance id differs from the certificate's is closed with the reason")
    func instanceMismatch() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let error = try await self.attempt(fleet, files: try fleet.agentFiles("i-real"), instanceID: "i-pretend")
        #expect(error.contains("permissionDenied") || error.contains("permission"))
        #expect(error.contains("\"i-pretend\"") && error.contains("\"i-real\""))
        #expect(await fleet.endReasons().contains { $0.contains("i-pretend") && $0.contains("i-real") })
    }

    @Test("an operator certificate cannot open an agent session")
    func operatorCertificate() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let files = try fleet.customIdentity("alice", request: .operator(name: "alice"))
        let error = try await self.attempt(fleet, files: files, instanceID: "alice")
        #expect(error.contains("role 'operator'"))
    }

    @Test("a major protocol mismatch is refused naming both versions")
    func protocolMismatch() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (replies, error) = try await fleet.rawSession(fleet.mTLS(try fleet.agentFiles("i-future")), sending: [try hello("i-future", major: 9).bytes])
        #expect(replies.isEmpty)
        #expect(error?.code == .failedPrecondition)
        #expect(error?.message.contains("agent speaks 9.0") == true)
        #expect(error?.message.contains("engine speaks 1.0") == true)
    }
}

/// Bad input ends that session with a logged reason; the engine serves the others.
@Suite("Bad input")
struct BadInputTests {
    func expectOthersServed(_ fleet: Fleet) async throws {
        #expect(try await fleet.engine.facts(of: "i-bystander").osFamily == "linux")
    }

    @Test("a garbage first message")
    func garbage() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-bystander")
        defer { task.cancel() }
        let (replies, error) = try await fleet.rawSession(
            fleet.mTLS(try fleet.agentFiles("i-garbage")), sending: [Array("GET / HTTP/1.1\r\n\r\n\u{ff}\u{fe}".utf8) + [0xff, 0xff, 0xff]])
        #expect(replies.isEmpty)
        #expect(error != nil)
        try await waitUntil { await fleet.endReasons().contains { $0.contains("could not read a message") } }
        try await self.expectOthersServed(fleet)
    }

    @Test("a first message that is not a hello")
    func notHello() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        var heartbeat = AgentMessage()
        heartbeat.heartbeat.sequence = 1
        let (_, error) = try await fleet.rawSession(fleet.mTLS(try fleet.agentFiles("i-rude")), sending: [try heartbeat.bytes])
        #expect(error?.code == .invalidArgument)
        #expect(error?.message == "expected a hello as the first message, found a heartbeat")
    }

    @Test("an oversized message")
    func oversized() async throws {
        let fleet = try await Fleet.start(limits: .defaults { $0.maxMessageBytes = 64 * 1024 })
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-bystander")
        defer { task.cancel() }
        var big = hello("i-big")
        big.hello.capabilities = [String(repeating: "x", count: 200 * 1024)]
        let (replies, error) = try await fleet.rawSession(fleet.mTLS(try fleet.agentFiles("i-big")), sending: [try big.bytes])
        #expect(replies.isEmpty)
        // The transport rejects it before any handler runs and resets the stream.
        #expect(error != nil)
        try await waitUntil { await fleet.endReasons().contains { $0.contains("Failed to decode message") && $0.contains("65536-byte message limit") } }
        #expect(await fleet.engine.registry.session(for: "i-big") == nil)
        try await self.expectOthersServed(fleet)
    }

    @Test("a result for a command that was never sent")
    func unknownResult() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-bystander")
        defer { task.cancel() }
        var bogus = AgentMessage()
        bogus.result.commandID = 4242
        let (replies, error) = try await fleet.rawSession(
            fleet.mTLS(try fleet.agentFiles("i-liar")), sending: [try hello("i-liar").bytes, try bogus.bytes])
        // The engine may end the session before its queued hello reply is written, so
        // replies are not checked; "never issued" (not "expected a hello") shows the
        // result was read as a message of an open session.
        _ = replies
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("never issued") == true)
        #expect(await fleet.endReasons().contains { $0.contains("result for command 4242") })
        try await self.expectOthersServed(fleet)
    }

    @Test("an agent that sends no hello is dropped after the hello timeout")
    func silentAgent() async throws {
        let fleet = try await Fleet.start(limits: .defaults { $0.helloTimeout = .milliseconds(300) })
        defer { fleet.discard() }
        let (_, error) = try await fleet.rawSession(fleet.mTLS(try fleet.agentFiles("i-mute")), sending: [])
        #expect(error?.code == .deadlineExceeded)
        #expect(error?.message.contains("no hello") == true)
    }
}
