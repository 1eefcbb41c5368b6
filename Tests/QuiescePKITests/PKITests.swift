import Foundation
import QuiescePKI
import Testing
import X509

@Suite("Certificate authority")
struct PKITests {
    func scratch() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-pki-\(UUID().uuidString.prefix(8))").path
    }

    func mode(_ path: String) -> mode_t {
        var info = stat()
        stat(path, &info)
        return info.st_mode & 0o777
    }

    @Test("init writes the CA and the engine certificate; keys are 0600")
    func initialize() throws {
        let dir = self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = CADirectory(path: dir)
        try ca.initialize(names: ["engine.example"], ipAddresses: ["127.0.0.1", "::1"])
        #expect(self.mode(ca.caKeyPath) == 0o600)
        #expect(self.mode(ca.engineFiles.keyPath) == 0o600)
        #expect(self.mode(dir) == 0o700)

        let root = try CADirectory.readCertificate(ca.caCertificatePath)
        let engine = try CADirectory.readCertificate(ca.engineFiles.certificatePath)
        #expect(try root.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: 0))
        #expect(engine.issuer == root.subject)
        #expect(root.publicKey.isValidSignature(engine.signature, for: engine))
        let sans = try #require(try engine.extensions.subjectAlternativeNames)
        #expect(sans.contains(.dnsName("engine.example")))
        #expect(sans.contains(.ipAddress(.init(contentBytes: [127, 0, 0, 1]))))
        #expect(try engine.extensions.extendedKeyUsage?.contains(.serverAuth) == true)
        #expect(PeerIdentity(certificate: engine).role == .engine)
    }

    @Test("agent and operator certificates carry the id and role; a second init needs --force")
    func issue() throws {
        let dir = self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = CADirectory(path: dir)
        try ca.initialize()
        let agent = try ca.issue(.agent(instanceID: "i-0abc"))
        let certificate = try CADirectory.readCertificate(agent.certificatePath)
        #expect(PeerIdentity(certificate: certificate) == PeerIdentity(commonName: "i-0abc", role: .agent))
        #expect(try certificate.extensions.extendedKeyUsage?.contains(.clientAuth) == true)
        #expect(try certificate.extensions.extendedKeyUsage?.contains(.serverAuth) == false)
        #expect(self.mode(agent.keyPath) == 0o600)
        _ = try agent.validate()

        let op = try ca.issue(.operator(name: "alice"))
        #expect(PeerIdentity(certificate: try CADirectory.readCertificate(op.certificatePath)).role == .operator)

        #expect(throws: PKIError.self) { try ca.issue(.agent(instanceID: "i-0abc")) }
        #expect(throws: PKIError.self) { try ca.initialize() }
        _ = try ca.issue(.agent(instanceID: "i-0abc"), overwrite: true)
    }

    @Test("revoking an identity: every certificate issued before it is refused, one issued a second after it is not, whatever the sub-second clock said")
    func revocationBySecond() throws {
        let authority = try CertificateAuthority.create()
        let revokedAt = Date(timeIntervalSince1970: 1_800_000_000.9)
        let dir = self.scratch()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let list = RevocationList(path: dir + "/revoked.json")
        try list.revoke(identity: "agent/web-1", reason: "stolen", now: revokedAt)
        let entries = try list.entries()
        func reason(issuedAt: Double, name: String = "web-1") throws -> String? {
            let cert = try authority.issue(.agent(instanceID: name), now: Date(timeIntervalSince1970: issuedAt)).certificate
            return RevocationList.reason(for: cert, in: entries)
        }
        #expect(try reason(issuedAt: 1_799_999_000)?.contains("stolen") == true)
        #expect(try reason(issuedAt: 1_800_000_000.89) != nil, "just before")
        #expect(try reason(issuedAt: 1_800_000_000.95) != nil, "just after, but the same whole second: the safe side of the tie")
        #expect(try reason(issuedAt: 1_800_000_001.3) != nil)
        #expect(try reason(issuedAt: 1_800_000_001.9) == nil, "a second later (X.509 keeps whole seconds)")
        #expect(try reason(issuedAt: 1_800_000_005) == nil)
        #expect(try reason(issuedAt: 1_799_999_000, name: "web-2") == nil, "another identity")
    }

    @Test("ids that would escape the directory or confuse a subject are refused")
    func identifiers() throws {
        let dir = self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = CADirectory(path: dir)
        try ca.initialize()
        for bad in ["../etc/passwd", "", "a b", "x/y", "..", String(repeating: "a", count: 200)] {
            #expect(throws: PKIError.self, "\(bad)") { try ca.issue(.agent(instanceID: bad)) }
        }
    }

    @Test("unusable files give an error naming the file and what was found")
    func badFiles() throws {
        let dir = self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = CADirectory(path: dir)
        try ca.initialize()
        try "hello\n".write(toFile: dir + "/garbage.pem", atomically: true, encoding: .utf8)
        do {
            _ = try CADirectory.readCertificate(dir + "/garbage.pem")
            Issue.record("garbage parsed as a certificate")
        } catch let error as PKIError {
            #expect(error.description.contains("garbage.pem"))
            #expect(error.description.contains("expected a PEM certificate"))
            #expect(error.description.contains("\"hello\""))
        }
        let missing = TLSFiles(certificatePath: dir + "/nope.pem", keyPath: dir + "/nope.key", trustRootsPath: ca.caCertificatePath)
        #expect(throws: PKIError.self) { try missing.validate() }
        // A key that belongs to another certificate.
        let mixed = TLSFiles(certificatePath: ca.engineFiles.certificatePath, keyPath: ca.caKeyPath, trustRootsPath: ca.caCertificatePath)
        do {
            _ = try mixed.validate()
            Issue.record("a mismatched key was accepted")
        } catch let error as PKIError {
            #expect(error.description.contains("does not belong to"))
        }
        #expect(throws: PKIError.self) { try CADirectory(path: dir + "/empty").load() }
    }
}
