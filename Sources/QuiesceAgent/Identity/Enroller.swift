import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire
import X509

/// `quiesce-agent enrol`: a fresh instance joins with a token. The key pair is made
/// here and never leaves; the engine is trusted only if its chain ends in the CA
/// whose SHA-256 the operator gave (nothing is sent to anyone else); the token and
/// a CSR go to the engine's enrolment port; the certificate and the CA come back.
public enum Enroller {
    public struct Result: Sendable {
        public var instanceID: String
        public var files: TLSFiles
        public var serial: String
        public var notAfter: Date
        /// The engine's agent port, for `quiesce-agent run`.
        public var agentPort: Int
    }

    public enum Failure: Error, CustomStringConvertible {
        /// The engine's chain does not end in the pinned CA: nothing was sent.
        case pinMismatch(String)
        /// The engine refused (the token's code and words).
        case refused(String)
        case unreachable(String)
        case exists(String)

        public var description: String {
            switch self {
            case .pinMismatch(let detail): "not the engine you pinned: \(detail); nothing was sent (check --ca-fingerprint against `quiesce token create`)"
            case .refused(let detail): "the engine refused the enrolment: \(detail)"
            case .unreachable(let detail): "could not reach the enrolment port: \(detail)"
            case .exists(let path): "\(path) exists: this instance is enrolled already (pass --force to enrol again with a new key)"
            }
        }
    }

    /// The files `enrol` writes in `directory`.
    public static func files(in directory: String) -> TLSFiles {
        TLSFiles(certificatePath: directory + "/agent.pem", keyPath: directory + "/agent.key", trustRootsPath: directory + "/ca.pem")
    }

    public static func enrol(
        engine: ListenAddress, token: String, caFingerprint: String, instanceID: String?, directory: String, force: Bool = false
    ) async throws -> Result {
        let files = Self.files(in: directory)
        if !force && FileManager.default.fileExists(atPath: files.certificatePath) { throw Failure.exists(files.certificatePath) }
        // The CSR's name is only a wish: the engine issues for the id the token allows.
        let (_, keyPEM, csrPEM) = try CertificateRequestMaker.make(commonName: instanceID ?? "enrolling")
        let report = PinReport()
        let transport = SecureTransports.enrolDialer(engine: engine, caFingerprint: caFingerprint, found: report)
        let response: Quiesce_Enrol_V1_EnrolResponse
        do {
            response = try await withGRPCClient(transport: transport) { client in
                var options = CallOptions.defaults
                options.timeout = .seconds(20)
                options.waitForReady = false
                return try await Quiesce_Enrol_V1_Enrolment.Client(wrapping: client).enrol(.with {
                    $0.token = token
                    $0.csrPem = csrPEM
                    $0.instanceID = instanceID ?? ""
                    $0.agentVersion = QuiesceVersion.software
                }, options: options)
            }
        } catch let error as RPCError {
            if let problem = report.problem { throw Failure.pinMismatch(problem) }
            if [.permissionDenied, .invalidArgument, .resourceExhausted, .unimplemented, .internalError].contains(error.code) { throw Failure.refused(error.message) }
            throw Failure.unreachable("\(error.code): \(error.message)")
        }
        // What came back must be for our key, from the CA we pinned.
        let certificate = try Certificate(pemEncoded: response.certificatePem)
        let ca = try Certificate(pemEncoded: response.caPem)
        let key = try Certificate.PrivateKey(pemEncoded: keyPEM)
        guard certificate.publicKey == key.publicKey else { throw Failure.refused("the certificate returned is not for the key made here") }
        guard IssuedCertificate.fingerprint(of: ca) == caFingerprint.lowercased().replacingOccurrences(of: ":", with: ""),
              ca.publicKey.isValidSignature(certificate.signature, for: certificate) else {
            throw Failure.pinMismatch("the CA returned is not the pinned one")
        }
        try CertificateRequestMaker.write(keyPEM: keyPEM, certificatePEM: response.certificatePem, caPEM: response.caPem, to: files)
        return Result(instanceID: response.instanceID, files: files, serial: response.serial,
                      notAfter: Date(timeIntervalSince1970: TimeInterval(response.notAfterUnix)), agentPort: Int(response.agentPort))
    }
}

/// When and how an agent renews its certificate.
public struct RenewalPolicy: Sendable {
    /// How often the agent looks at its certificate's age while connected.
    public var checkEvery: Duration
    /// The share of the lifetime after which it renews (two thirds).
    public var at: Double
    /// The agent's clock (tests move it).
    public var now: @Sendable () -> Date
    public var enabled: Bool

    public init(checkEvery: Duration = .seconds(600), at: Double = 2.0 / 3.0, now: @escaping @Sendable () -> Date = { Date() }, enabled: Bool = true) {
        self.checkEvery = checkEvery
        self.at = at
        self.now = now
        self.enabled = enabled
    }

    /// When `certificate` is due for renewal.
    public func due(_ certificate: Certificate) -> Date {
        let life = certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore)
        return certificate.notValidBefore.addingTimeInterval(life * self.at)
    }
}

extension AgentRunner {
    /// Renews over the session's own connection, tries the new certificate on a second connection,
    /// and only then puts it in place (the old one is kept as .previous). The live session goes on.
    /// - Returns: The new serial, or nil when not due.
    func renewIfDue(client: GRPCClient<HTTP2ClientTransport.Posix>) async throws -> String? {
        let policy = self.configuration.renewal
        let files = self.configuration.identity
        let current = try CADirectory.readCertificate(files.certificatePath)
        guard policy.enabled, policy.now() >= policy.due(current) else { return nil }
        let instance = PeerIdentity(certificate: current).commonName
        let (key, keyPEM, csrPEM) = try CertificateRequestMaker.make(commonName: instance)
        var options = CallOptions.defaults
        options.timeout = .seconds(20)
        let response = try await Quiesce_Enrol_V1_Enrolment.Client(wrapping: client).renew(.with { $0.csrPem = csrPEM }, options: options)
        let renewed = try Certificate(pemEncoded: response.certificatePem)
        guard renewed.publicKey == key.publicKey, PeerIdentity(certificate: renewed).commonName == instance else {
            throw RenewalError(detail: "the engine returned a certificate for another key or identity")
        }
        let staged = TLSFiles(certificatePath: files.certificatePath + ".new", keyPath: files.keyPath + ".new", trustRootsPath: files.trustRootsPath)
        // File writes (with fsync) on a thread of their own: if a freeze starts meanwhile they wait for
        // the thaw there, never on the agent's event loop, which must go on answering the engine.
        let certificatePEM = response.certificatePem
        try await DedicatedThread.run(name: "quiesce-renew") {
            try CertificateRequestMaker.write(keyPEM: keyPEM, certificatePEM: certificatePEM, caPEM: nil, to: staged)
        }
        // Does the new one work? A second connection with it asks the engine which certificate it saw.
        let seen = try await withGRPCClient(transport: SecureTransports.agentDialer(engine: self.configuration.engine, identity: staged)) { second in
            var options = CallOptions.defaults
            options.timeout = .seconds(10)
            options.waitForReady = false
            return try await Quiesce_Enrol_V1_Enrolment.Client(wrapping: second).check(.init(), options: options)
        }
        guard seen.serial == response.serial else {
            throw RenewalError(detail: "the engine saw certificate \(seen.serial) on the trial connection, not the renewed \(response.serial)")
        }
        // Keep the old pair until now; then swap (each rename is atomic).
        try await DedicatedThread.run(name: "quiesce-renew") {
            _ = try? FileManager.default.removeItem(atPath: files.certificatePath + ".previous")
            _ = try? FileManager.default.removeItem(atPath: files.keyPath + ".previous")
            link(files.certificatePath, files.certificatePath + ".previous")
            link(files.keyPath, files.keyPath + ".previous")
            guard rename(staged.keyPath, files.keyPath) == 0, rename(staged.certificatePath, files.certificatePath) == 0 else {
                throw RenewalError(detail: "could not put the renewed certificate in place: \(String(cString: strerror(errno)))")
            }
        }
        return response.serial
    }
}

public struct RenewalError: Error, CustomStringConvertible {
    public var detail: String
    public var description: String { self.detail }
}
