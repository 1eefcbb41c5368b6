import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceAgent
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceFleet
import QuiesceProviders
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Synchronization
import Testing
import X509
import Crypto

/// Fleet identity end to end, with the engine's real listeners on loopback: join tokens, enrolment
/// over a pinned TLS connection, renewal over the agent's own session, revocation at the handshake
/// and mid-session, cloned images, and the audit trail. No root needed.
@Suite("Fleet identity: tokens, enrolment, renewal, revocation, clones, audit", .serialized)
struct IdentityTests {
    /// An engine with its CA directory (it issues and revokes), an enrolment port and an audit log.
    static func engine() async throws -> (fleet: Fleet, enrol: ListenAddress, fingerprint: String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-id-\(UUID().uuidString.prefix(8))").path
        let ca = CADirectory(path: directory + "/ca")
        _ = try await blocking { try ca.initialize(names: ["localhost"], ipAddresses: ["127.0.0.1"]) }
        let fleet = try await Fleet.start(directory: directory) { configuration in
            configuration.caDirectory = ca.path
            configuration.enrolListen = ListenAddress(host: .ipv4("127.0.0.1"), port: 0)
            configuration.auditLogPath = directory + "/audit.jsonl"
        }
        let enrol = try await fleet.engine.enrolAddress()
        return (fleet, enrol, try ca.load().root.fingerprint)
    }

    @Test("tokens: stored hashed; single use; expiring; bound to an id or a pattern; revocable; each refusal with its code")
    func tokens() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-tokens-\(UUID().uuidString.prefix(8)).json").path
        defer { try? FileManager.default.removeItem(atPath: path); try? FileManager.default.removeItem(atPath: path + ".lock") }
        let store = TokenStore(path: path)
        let (text, token) = try store.create(instance: "web-1", pattern: nil, ttl: .seconds(3600), uses: 1)
        let stored = try String(contentsOfFile: path, encoding: .utf8)
        #expect(!stored.contains(String(text.split(separator: "_")[2])), "the secret is never stored")
        let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
        #expect(stored.contains(token.id) && mode == 0o600)
        func refusal(_ body: () throws -> String) -> String {
            do { return "issued \(try body())" } catch let refusal as TokenRefusal { return refusal.code } catch { return "\(error)" }
        }
        #expect(refusal { try store.redeem(text, requested: "web-2") } == "token-mismatch")
        #expect(refusal { try store.redeem(text, requested: nil) } == "issued web-1")
        #expect(refusal { try store.redeem(text, requested: nil) } == "token-used", "replay")
        #expect(refusal { try store.redeem("qt_zz_nope", requested: nil) } == "token-malformed")
        #expect(refusal { try store.redeem("qt_\(token.id)_" + String(repeating: "0", count: 48), requested: nil) } == "token-unknown", "right id, wrong secret")

        let (pattern, _) = try store.create(instance: nil, pattern: "web-*", ttl: .seconds(3600), uses: 2)
        #expect(refusal { try store.redeem(pattern, requested: "db-1") } == "token-mismatch")
        #expect(refusal { try store.redeem(pattern, requested: nil) } == "token-mismatch", "a pattern needs the id named")
        #expect(refusal { try store.redeem(pattern, requested: "web-7") } == "issued web-7")
        let (late, _) = try store.create(instance: "web-3", pattern: nil, ttl: .seconds(60), uses: 1, now: Date().addingTimeInterval(-120))
        #expect(refusal { try store.redeem(late, requested: nil) } == "token-expired")
        let (revoked, record) = try store.create(instance: "web-4", pattern: nil, ttl: .seconds(60), uses: 1)
        try store.revoke(record.id)
        #expect(refusal { try store.redeem(revoked, requested: nil) } == "token-revoked")
        #expect(try store.list().map { $0.state(at: Date()) } == ["used", "valid", "expired", "revoked"])
        #expect(throws: PKIError.self) { try store.create(instance: "a b", pattern: nil, ttl: .seconds(60), uses: 1) }
    }

    @Test("enrol: key made here (0600), CA pinned by fingerprint, certificate for the token's id only; wrong pin sends nothing; replay, mismatch and a flood refused")
    func enrol() async throws {
        let (fleet, enrol, fingerprint) = try await Self.engine()
        defer { fleet.discard() }
        let tokens = TokenStore(ca: fleet.ca)
        let (token, record) = try tokens.create(instance: "web-1", pattern: nil, ttl: .seconds(600), uses: 1)
        let dir = fleet.directory + "/instance"

        // A wrong fingerprint: refused in the handshake, the token untouched.
        let wrong = String(repeating: "0", count: 64)
        await #expect { try await Enroller.enrol(engine: enrol, token: token, caFingerprint: wrong, instanceID: nil, directory: dir) } throws: { error in
            "\(error)".contains("nothing was sent") && "\(error)".contains(fingerprint)
        }
        #expect(try tokens.list().first { $0.id == record.id }?.usesLeft == 1, "a refused pin spends nothing")
        #expect(!FileManager.default.fileExists(atPath: dir + "/agent.key"))

        let result = try await Enroller.enrol(engine: enrol, token: token, caFingerprint: fingerprint, instanceID: nil, directory: dir)
        #expect(result.instanceID == "web-1" && result.agentPort == fleet.address.port)
        let attributes = try FileManager.default.attributesOfItem(atPath: result.files.keyPath)
        #expect(attributes[.posixPermissions] as? Int == 0o600)
        let (certificate, root) = try result.files.validate()
        #expect(IssuedCertificate.fingerprint(of: root) == fingerprint)
        #expect(PeerIdentity(certificate: certificate) == PeerIdentity(commonName: "web-1", role: .agent))
        let life = certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore)
        #expect(abs(life - (30 * 86_400)) < 1, "30 days by default")
        #expect(certificate.notValidBefore < Date().addingTimeInterval(-200), "back-dated for clock skew")
        // It works: the agent connects with what it got.
        let runner = try await fleet.agent("web-1", files: result.files)
        let task = Task { try await runner.run() }
        defer { task.cancel() }
        #expect(await fleet.engine.registry.waitFor(["web-1"], timeout: .seconds(10)).isEmpty, "\(runner.lastError ?? "")")

        // Replay.
        await #expect { try await Enroller.enrol(engine: enrol, token: token, caFingerprint: fingerprint, instanceID: nil, directory: dir + "2") } throws: { error in
            "\(error)".contains("token-used")
        }
        // A CSR asking for OU=operator and another name: the certificate is still the token's agent.
        let (other, _) = try tokens.create(instance: "web-2", pattern: nil, ttl: .seconds(600), uses: 1)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { OrganizationalUnitName("operator"); CommonName("root") }, privateKey: key,
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        let report = PinReport()
        let issued = try await withGRPCClient(transport: SecureTransports.enrolDialer(engine: enrol, caFingerprint: fingerprint, found: report)) { client in
            try await Quiesce_Enrol_V1_Enrolment.Client(wrapping: client).enrol(.with {
                $0.token = other
                $0.csrPem = try! csr.serializeAsPEM().pemString
            })
        }
        let greedy = try Certificate(pemEncoded: issued.certificatePem)
        #expect(PeerIdentity(certificate: greedy) == PeerIdentity(commonName: "web-2", role: .agent))
        #expect(greedy.publicKey == key.publicKey)
        let usage = try greedy.extensions.extendedKeyUsage
        #expect(usage.map(Array.init) == [.clientAuth])
        // A token bound to another id.
        let (bound, _) = try tokens.create(instance: "db-1", pattern: nil, ttl: .seconds(600), uses: 1)
        await #expect { try await Enroller.enrol(engine: enrol, token: bound, caFingerprint: fingerprint, instanceID: "web-3", directory: dir + "3") } throws: { error in
            "\(error)".contains("token-mismatch: token") && "\(error)".contains("is for instance db-1, not web-3")
        }
        // Failures from one source are rate-limited: after 5, even a good token waits.
        for _ in 0..<5 {
            _ = try? await Enroller.enrol(engine: enrol, token: "qt_000000000000_" + String(repeating: "1", count: 48), caFingerprint: fingerprint,
                                          instanceID: nil, directory: dir + "4")
        }
        let (good, _) = try tokens.create(instance: "web-9", pattern: nil, ttl: .seconds(600), uses: 1)
        await #expect { try await Enroller.enrol(engine: enrol, token: good, caFingerprint: fingerprint, instanceID: nil, directory: dir + "5") } throws: { error in
            "\(error)".contains("rate-limited")
        }
        fleet.engine.audit?.flush()
        let trail = try AuditLog.read(path: fleet.directory + "/audit.jsonl").filter { $0.action == "enrol" }
        #expect(trail.contains { $0.instance == "web-1" && $0.result.hasPrefix("ok serial") })
        #expect(trail.contains { $0.result == "token-used" } && trail.contains { $0.result == "rate-limited" })
        #expect(!(try String(contentsOfFile: fleet.directory + "/audit.jsonl", encoding: .utf8)).contains(String(token.split(separator: "_")[2])),
                "no token secret in the audit trail")
    }

    @Test("revocation: persisted; the live session ends at once with the reason; the next handshake is refused")
    func revocation() async throws {
        let (fleet, _, _) = try await Self.engine()
        defer { fleet.discard() }
        let runner = try await fleet.agent("web-r")
        let task = Task { try await runner.run() }
        defer { task.cancel() }
        #expect(await fleet.engine.registry.waitFor(["web-r"], timeout: .seconds(10)).isEmpty)
        let began = ContinuousClock.now
        try RevocationList(ca: fleet.ca).revoke(identity: "agent/web-r", reason: "laptop stolen")
        var ended: SessionRegistry.EndedSession?
        for _ in 0..<100 {
            ended = await fleet.engine.registry.endedSessions().first { $0.instanceID == "web-r" && $0.reason.contains("revoked") }
            if ended != nil { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        let reasons = await fleet.engine.registry.endedSessions().map(\.reason)
        #expect(ended?.reason.contains("laptop stolen") == true, "\(reasons)")
        #expect(ContinuousClock.now - began < .seconds(2), "ended within \(ContinuousClock.now - began)")
        // It dials again and is refused at the handshake, before any request.
        for _ in 0..<100 {
            if await fleet.engine.registry.endedSessions().contains(where: { $0.reason.hasPrefix("revoked: ") && $0.instanceID == "?" }) { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(await fleet.engine.registry.endedSessions().contains { $0.reason.hasPrefix("revoked: agent/web-r") && $0.instanceID == "?" })
        #expect(await fleet.engine.registry.session(for: "web-r") == nil)
        // A certificate issued after the revocation (a new enrolment) is accepted; in whole seconds,
        // so up to 1.5 s after it a new one may still count as revoked.
        try await Task.sleep(for: .seconds(2))
        let fresh = try fleet.ca.issue(.agent(instanceID: "web-r"), overwrite: true)
        task.cancel()
        let again = try await fleet.agent("web-r", files: fresh)
        let second = Task { try await again.run() }
        defer { second.cancel() }
        #expect(await fleet.engine.registry.waitFor(["web-r"], timeout: .seconds(10)).isEmpty, "\(again.lastError ?? "")")
    }

    @Test("renewal at two thirds of the lifetime (the agent's clock moved by the test): over the live session, tried, then swapped; the old one kept")
    func renewal() async throws {
        let (fleet, _, _) = try await Self.engine()
        defer { fleet.discard() }
        let files = try await fleet.agentFiles("web-n")
        let old = try CADirectory.readCertificate(files.certificatePath)
        let clock = Mutex(Date())
        var configuration = AgentConfiguration(engine: fleet.address, identity: files, backoff: Backoff(base: .milliseconds(50), cap: .milliseconds(200)))
        configuration.renewal = RenewalPolicy(checkEvery: .milliseconds(100), now: { clock.withLock { $0 } })
        var logger = Logger(label: "test.agent")
        logger.logLevel = .critical
        let runner = AgentRunner(configuration: configuration, handler: BuiltinCommandHandler(startsGuard: false), logger: logger)
        let task = Task { try await runner.run() }
        defer { task.cancel() }
        #expect(await fleet.engine.registry.waitFor(["web-n"], timeout: .seconds(10)).isEmpty)
        try await Task.sleep(for: .milliseconds(400))
        #expect(runner.renewals == 0, "not due before two thirds")
        // 2/3 of 397 days after notBefore, plus a minute.
        clock.withLock { $0 = old.notValidBefore.addingTimeInterval(old.notValidAfter.timeIntervalSince(old.notValidBefore) * 2 / 3 + 60) }
        for _ in 0..<100 where runner.renewals == 0 { try await Task.sleep(for: .milliseconds(50)) }
        #expect(runner.renewals >= 1)
        let renewed = try CADirectory.readCertificate(files.certificatePath)
        #expect(renewed.serialNumber != old.serialNumber && PeerIdentity(certificate: renewed).commonName == "web-n")
        #expect(abs(renewed.notValidAfter.timeIntervalSince(renewed.notValidBefore) - 30 * 86_400) < 1)
        #expect(try CADirectory.readCertificate(files.certificatePath + ".previous").serialNumber == old.serialNumber)
        _ = try files.validate()  // the key on disk belongs to the new certificate
        #expect(runner.sessionsOpened == 1, "no gap: the session went on")
        #expect(await fleet.engine.registry.session(for: "web-n")?.certificate?.serialNumber == old.serialNumber)
        // The next session uses the new certificate.
        if let live = await fleet.engine.registry.session(for: "web-n") { await fleet.engine.registry.closeForTest(live, reason: "test: reconnect") }
        for _ in 0..<100 {
            if await fleet.engine.registry.session(for: "web-n")?.certificate?.serialNumber == renewed.serialNumber { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(await fleet.engine.registry.session(for: "web-n")?.certificate?.serialNumber == renewed.serialNumber)
    }

    @Test("a cloned image: the second machine with the same certificate is refused while the first answers; reported; a reconnect of the same agent is not a clone")
    func clones() async throws {
        let (fleet, _, _) = try await Self.engine()
        defer { fleet.discard() }
        let first = try await fleet.agent("web-c")
        let firstTask = Task { try await first.run() }
        defer { firstTask.cancel() }
        #expect(await fleet.engine.registry.waitFor(["web-c"], timeout: .seconds(10)).isEmpty)
        let holder = await fleet.engine.registry.session(for: "web-c")!
        let clone = try await fleet.agent("web-c")
        let cloneTask = Task { try await clone.run() }
        defer { cloneTask.cancel() }
        for _ in 0..<100 where clone.lastError == nil { try await Task.sleep(for: .milliseconds(50)) }
        #expect(clone.lastError?.contains("identity-conflict: instance web-c already has a live session") == true, "\(clone.lastError ?? "")")
        let conflict = try #require(await fleet.engine.registry.conflict(for: "web-c"))
        #expect(conflict.holderSessionID == holder.sessionID && conflict.attempts >= 1)
        #expect(await fleet.engine.registry.session(for: "web-c") === holder && !holder.isClosed, "the holder keeps its session")
        // A fleet run will not quiesce an instance whose identity is in conflict.
        let registry = await PluginPlanRunTests.registry()
        defer { Task { await registry.shutdown() } }
        let fleetText = [
            "providers:", "  mem: { kind: local, pool: /nonexistent-not-opened }", "policies:", "  baseline: { plugin: crash, wanted: crash }",
            "instances:", "  - { id: web-c, policy: baseline, disks: [web-c-a] }",
        ].joined(separator: "\n") + "\n"
        let file = try FleetFile.parse(fleetText, path: "mem.yaml", plugins: registry)
        let provider = MemoryProvider(disks: ["web-c-a"], pendingPolls: 0)
        let coordinator = Coordinator(
            engine: fleet.engine, plugins: registry, providers: ["mem": .init(provider: provider, bucket: TokenBucket(burst: 5, perSecond: 100))],
            catalog: try SQLiteCatalog(path: fleet.directory + "/catalog.db"), fleet: file)
        let report = await coordinator.run(runID: "clone-run", agentWait: .zero)
        let outcome = try #require(report.instances.first)
        #expect(outcome.state == .failed && outcome.groupID == nil && provider.groups.isEmpty)
        #expect(outcome.reasons.first?.hasPrefix("identity-conflict: ") == true && outcome.reasons.first?.hasSuffix("nothing was frozen") == true, "\(outcome.reasons)")
        // A reconnect of the holder's own process (same run id) is not a conflict.
        cloneTask.cancel()
        await fleet.engine.registry.closeForTest(holder, reason: "test: network blip")
        for _ in 0..<100 {
            if let now = await fleet.engine.registry.session(for: "web-c"), now !== holder, !now.isClosed { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(await fleet.engine.registry.session(for: "web-c")?.agentRunID == first.runID)
        fleet.engine.audit?.flush()
        let trail = try AuditLog.read(path: fleet.directory + "/audit.jsonl", instance: "web-c")
        #expect(trail.contains { $0.kind == "identity" && $0.result == "identity-conflict" })
        #expect(trail.contains { $0.kind == "command" && $0.actor == "identity-probe" && $0.action == "freeze-status" })
    }
}
