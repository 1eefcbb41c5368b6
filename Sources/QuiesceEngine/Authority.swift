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

/// The engine's side of fleet identity, when it runs with its CA directory
/// (`quiesce serve --ca-dir`): issuing agent certificates for join tokens and
/// renewals, and refusing revoked certificates. The CA's files stay the truth:
/// tokens and revocations are read from them, so `quiesce token` and
/// `quiesce ca revoke` work with the engine running or not.
public final class EngineAuthority: Sendable {
    public let directory: CADirectory
    public let tokens: TokenStore
    public let revocations: RevocationList
    /// Lifetime of the agent certificates it issues (enrolment and renewal).
    public let agentValidity: Duration
    let authority: CertificateAuthority
    let caPEM: String
    private let state = Mutex(State())

    struct State {
        var entries: [RevocationEntry] = []
        var stamp: (Int, Int) = (-1, -1)
        /// Failed enrolments per source address.
        var failures: [String: [Date]] = [:]
    }

    /// At most this many failed enrolments per source in `failureWindow`; then refused until the window passes.
    public static let failureLimit = 5
    public static let failureWindow: TimeInterval = 60

    public init(directory: CADirectory, agentValidity: Duration = .seconds(30 * 86_400)) throws {
        self.directory = directory
        self.authority = try directory.load()
        self.caPEM = try self.authority.root.certificatePEM + "\n"
        self.tokens = TokenStore(ca: directory)
        self.revocations = RevocationList(ca: directory)
        self.agentValidity = agentValidity
        let entries = (try? self.revocations.entries()) ?? []
        let stamp = self.revocationStamp()
        self.state.withLock {
            $0.entries = entries
            $0.stamp = stamp
        }
    }

    /// The revocation file's modification time ((0, 0) when there is none).
    private func revocationStamp() -> (Int, Int) {
        var info = stat()
        return stat(self.revocations.path, &info) == 0 ? (Int(info.st_mtim.tv_sec), Int(info.st_mtim.tv_nsec)) : (0, 0)
    }

    /// Re-reads the revocation list if its file changed; true when it did. The read (under the
    /// file's lock, which `quiesce ca revoke` may hold across an fsync) runs on a thread of its
    /// own, never on the event loops that carry heartbeats to frozen agents.
    @discardableResult
    public func reloadIfChanged() async -> Bool {
        let stamp = self.revocationStamp()
        guard self.state.withLock({ $0.stamp != stamp }) else { return false }
        let read = try? await DedicatedThread.run(name: "quiesce-revocations") { try self.revocations.entries() }
        self.state.withLock {
            if let read { $0.entries = read }
            $0.stamp = stamp
        }
        return true
    }

    /// Why `certificate` is refused, or nil.
    public func revocationReason(_ certificate: Certificate) -> String? {
        RevocationList.reason(for: certificate, in: self.state.withLock { $0.entries })
    }

    public func revocationReason(der: [UInt8]) -> String? {
        guard let certificate = try? Certificate(derEncoded: der) else { return nil }
        return self.revocationReason(certificate)
    }

    func rateLimited(_ source: String, now: Date = Date()) -> Bool {
        self.state.withLock { state in
            let recent = (state.failures[source] ?? []).filter { now.timeIntervalSince($0) < Self.failureWindow }
            state.failures[source] = recent
            return recent.count >= Self.failureLimit
        }
    }

    func noteFailure(_ source: String, now: Date = Date()) {
        self.state.withLock { $0.failures[source, default: []].append(now) }
    }

    /// A certificate for the holder of `csrPEM`, as `instanceID`'s agent.
    func issue(instanceID: String, csrPEM: String) throws -> Quiesce_Enrol_V1_EnrolResponse {
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(pemEncoded: csrPEM)
        } catch {
            throw RPCError(code: .invalidArgument, message: "bad-csr: expected a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----): \(error)")
        }
        let certificate: Certificate
        do {
            certificate = try self.authority.issueAgent(instanceID: instanceID, csr: csr, validity: self.agentValidity)
        } catch {
            throw RPCError(code: .invalidArgument, message: "bad-csr: \(error)")
        }
        return try .with {
            $0.instanceID = instanceID
            $0.certificatePem = try certificate.serializeAsPEM().pemString + "\n"
            $0.caPem = self.caPEM
            $0.notBeforeUnix = Int64(certificate.notValidBefore.timeIntervalSince1970)
            $0.notAfterUnix = Int64(certificate.notValidAfter.timeIntervalSince1970)
            $0.serial = RevocationList.serialHex(certificate)
        }
    }
}

/// `quiesce.enrol.v1.Enrolment`. On the enrolment port (TLS, engine-authenticated only)
/// it answers Enrol; on the agent port (mutual TLS) it answers Renew.
struct EnrolmentService: Quiesce_Enrol_V1_Enrolment.SimpleServiceProtocol {
    enum Port { case enrolment, agent }
    let authority: EngineAuthority
    let port: Port
    let agentPort: @Sendable () async -> Int
    let logger: Logger
    let audit: AuditLog?

    func enrol(request: Quiesce_Enrol_V1_EnrolRequest, context: ServerContext) async throws -> Quiesce_Enrol_V1_EnrolResponse {
        guard self.port == .enrolment else {
            throw RPCError(code: .unimplemented, message: "enrol on the engine's enrolment port (quiesce serve --enrol-listen), not the agent port")
        }
        let source = Self.host(of: context.remotePeer)
        if self.authority.rateLimited(source) {
            self.record("enrol", request.instanceID, source, "rate-limited")
            throw RPCError(code: .resourceExhausted, message: "rate-limited: \(EngineAuthority.failureLimit) failed enrolments from \(source) within \(Int(EngineAuthority.failureWindow)) s; wait and try again")
        }
        let instance: String
        do {
            // The token store is a file changed under a lock and fsync'd: off the event loops.
            let (tokens, token, requested) = (self.authority.tokens, request.token, request.instanceID.isEmpty ? nil : request.instanceID)
            instance = try await DedicatedThread.run(name: "quiesce-enrol") { try tokens.redeem(token, requested: requested) }
        } catch let refusal as TokenRefusal {
            self.authority.noteFailure(source)
            self.logger.warning("enrolment refused", metadata: ["source": "\(source)", "reason": "\(refusal)"])
            self.record("enrol", request.instanceID, source, refusal.code)
            throw RPCError(code: .permissionDenied, message: refusal.description)
        } catch {
            throw RPCError(code: .internalError, message: "the token store could not be read: \(error)")
        }
        do {
            var response = try self.authority.issue(instanceID: instance, csrPEM: request.csrPem)
            response.agentPort = UInt32(await self.agentPort())
            self.logger.notice("agent enrolled", metadata: ["instance": "\(instance)", "source": "\(source)", "serial": "\(response.serial)"])
            self.record("enrol", instance, source, "ok serial \(response.serial)")
            return response
        } catch {
            self.authority.noteFailure(source)
            let code = (error as? RPCError).map { String($0.message.prefix { $0 != ":" }) } ?? "error"
            self.record("enrol", instance, source, code)
            throw error
        }
    }

    func renew(request: Quiesce_Enrol_V1_RenewRequest, context: ServerContext) async throws -> Quiesce_Enrol_V1_EnrolResponse {
        guard self.port == .agent, let certificate = (context.transportSpecific as? HTTP2ServerTransport.Posix.Context)?.peerCertificate else {
            throw RPCError(code: .unauthenticated, message: "renew over the agent's own mutual-TLS connection (the agent port), with the certificate to renew")
        }
        let peer = PeerIdentity(certificate: certificate)
        guard peer.role == .agent else {
            throw RPCError(code: .permissionDenied, message: "only agent certificates renew here; this one is \(peer)")
        }
        if let why = self.authority.revocationReason(certificate) {
            self.record("renew", peer.commonName, context.remotePeer, "revoked")
            throw RPCError(code: .permissionDenied, message: "revoked: \(why)")
        }
        let response = try self.authority.issue(instanceID: peer.commonName, csrPEM: request.csrPem)
        self.logger.info("agent certificate renewed", metadata: [
            "instance": "\(peer.commonName)", "old_serial": "\(RevocationList.serialHex(certificate))", "serial": "\(response.serial)",
        ])
        self.record("renew", peer.commonName, context.remotePeer, "ok serial \(response.serial)")
        return response
    }

    func check(request: Quiesce_Enrol_V1_CheckRequest, context: ServerContext) async throws -> Quiesce_Enrol_V1_CheckResponse {
        guard self.port == .agent, let certificate = (context.transportSpecific as? HTTP2ServerTransport.Posix.Context)?.peerCertificate else {
            throw RPCError(code: .unauthenticated, message: "check on the agent port, with a client certificate")
        }
        if let why = self.authority.revocationReason(certificate) { throw RPCError(code: .permissionDenied, message: "revoked: \(why)") }
        return .with {
            $0.instanceID = PeerIdentity(certificate: certificate).commonName
            $0.serial = RevocationList.serialHex(certificate)
            $0.notAfterUnix = Int64(certificate.notValidAfter.timeIntervalSince1970)
        }
    }

    private func record(_ action: String, _ instance: String, _ source: String, _ result: String) {
        self.audit?.append(.init(kind: "identity", actor: "source:\(source)", action: action, instance: instance, result: result))
    }

    /// "ipv4:127.0.0.1:5555" → "127.0.0.1".
    static func host(of peer: String) -> String {
        let parts = peer.split(separator: ":")
        if parts.first == "ipv4", parts.count >= 3 { return String(parts[1]) }
        if parts.first == "ipv6", parts.count >= 3 { return parts.dropFirst().dropLast().joined(separator: ":") }
        return peer
    }
}
