import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiescePKI
import Synchronization

/// Who is asking, for the audit trail: a run ("run:r-20261207"), an operator
/// ("operator:alice"), the local admin socket ("admin:local"). Set with
/// `AuditContext.$actor.withValue(…)` around the work it asks for.
public enum AuditContext {
    @TaskLocal public static var actor: String = "engine"
}

/// The engine's audit trail: one JSON object per line, appended, never
/// rewritten — every command sent to an agent (who asked, what, to which
/// instance, when, the result and why), every admin call, every enrolment,
/// renewal, revocation and identity conflict. Never a secret: tokens, keys and
/// hook output are not written. Lines are written off the caller's path, in
/// order, by one queue.
public final class AuditLog: Sendable {
    public struct Entry: Codable, Sendable, Equatable {
        public var time: Date
        /// "command", "admin", "identity".
        public var kind: String
        public var actor: String
        public var action: String
        public var instance: String
        /// "ok", or the status code and reason ("failed-precondition freeze-ebusy").
        public var result: String
        public var detail: String?
        public var durationMs: Double?

        public init(time: Date = Date(), kind: String, actor: String, action: String, instance: String, result: String,
                    detail: String? = nil, durationMs: Double? = nil) {
            self.time = time
            self.kind = kind
            self.actor = actor
            self.action = action
            self.instance = instance
            self.result = result
            self.detail = detail.map { String($0.prefix(500)) }
            self.durationMs = durationMs
        }
    }

    public let path: String
    private let fd: Int32
    private let queue = DispatchQueue(label: "quiesce.audit")

    public init(path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw AuditError(detail: "cannot open the audit log \(path): \(String(cString: strerror(errno)))")
        }
        self.path = path
        self.fd = fd
    }

    deinit { close(self.fd) }

    /// Queues `entry`; encoding and writing happen on the log's own queue, so a command's
    /// answer (a freeze's, inside the frozen window) never waits for the audit trail.
    public func append(_ entry: Entry) {
        let fd = self.fd
        self.queue.async {
            guard let data = try? Self.encoder.encode(entry) else { return }
            let line = Array(data) + [0x0a]
            _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        }
    }

    /// Waits until every line appended so far is written.
    public func flush() { self.queue.sync {} }

    /// Reads a log back: entries for `instance` (if given) since `since` (if given), oldest first.
    public static func read(path: String, instance: String? = nil, since: Date? = nil) throws -> [Entry] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw AuditError(detail: "cannot read the audit log \(path) (does the engine write it there? quiesce serve --audit-log)")
        }
        var entries: [Entry] = []
        for (number, line) in data.split(separator: 0x0a).enumerated() where !line.isEmpty {
            do {
                let entry = try Self.decoder.decode(Entry.self, from: Data(line))
                if let instance, entry.instance != instance { continue }
                if let since, entry.time < since { continue }
                entries.append(entry)
            } catch {
                throw AuditError(detail: "\(path):\(number + 1): expected one JSON audit entry per line, found something unreadable")
            }
        }
        return entries
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            try container.encode(AuditLog.timestamp(date))
        }
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return encoder
    }()

    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .custom { decoder in
            let text = try decoder.singleValueContainer().decode(String.self)
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            guard let date = formatter.date(from: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "expected an ISO 8601 time, found \(text)"))
            }
            return date
        }
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }()

    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }
}

public struct AuditError: Error, CustomStringConvertible {
    public var detail: String
    public var description: String { self.detail }
}

/// Appends every admin call to the audit trail: the method, the caller, the outcome.
struct AdminAuditInterceptor: ServerInterceptor {
    let audit: AuditLog
    let actor: String

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let began = ContinuousClock.now
        let method = context.descriptor.method
        let caller = self.actor
        do {
            let response = try await AuditContext.$actor.withValue(caller) { try await next(request, context) }
            let result: String = switch response.accepted { case .success: "ok"; case .failure(let error): "\(error.code)" }
            self.audit.append(.init(kind: "admin", actor: caller, action: method, instance: "", result: result,
                                    durationMs: Double((ContinuousClock.now - began).nanoseconds) / 1e6))
            return response
        } catch {
            self.audit.append(.init(kind: "admin", actor: caller, action: method, instance: "", result: "error", detail: "\(error)"))
            throw error
        }
    }
}

/// The remote admin API's door: only operator certificates (an agent's is refused), not revoked,
/// and each call within the certificate's role — viewer reads, operator also runs. Every call,
/// allowed or not, goes to the audit trail with the operator's name.
struct OperatorGate: ServerInterceptor {
    let authority: EngineAuthority?
    let audit: AuditLog?
    let logger: Logger

    /// Calls that act; every other call reads.
    static let acting: Set<String> = ["RunFleet", "Restore", "Prune", "Reconcile"]

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let method = context.descriptor.method
        func refuse(_ actor: String, _ error: RPCError) -> RPCError {
            self.audit?.append(.init(kind: "admin", actor: actor, action: method, instance: "", result: "refused", detail: error.message))
            self.logger.warning("remote admin call refused", metadata: ["actor": "\(actor)", "method": "\(method)", "reason": "\(error.message)"])
            return error
        }
        guard let certificate = (context.transportSpecific as? HTTP2ServerTransport.Posix.Context)?.peerCertificate else {
            throw refuse("source:\(context.remotePeer)", RPCError(code: .unauthenticated, message: "the remote admin API needs an operator certificate"))
        }
        let peer = PeerIdentity(certificate: certificate)
        let actor = "\(peer.roleText ?? "unknown"):\(peer.commonName)"
        guard peer.role == .operator, let permission = peer.permission else {
            throw refuse(actor, RPCError(
                code: .permissionDenied,
                message: "the remote admin API takes operator certificates (quiesce ca issue --operator NAME --role viewer|operator); this is \(peer)"))
        }
        if let why = self.authority?.revocationReason(certificate) {
            throw refuse(actor, RPCError(code: .permissionDenied, message: "revoked: \(why)"))
        }
        let needed: OperatorPermission = Self.acting.contains(method) ? .operator : .viewer
        guard permission >= needed else {
            throw refuse(actor, RPCError(
                code: .permissionDenied,
                message: "operator \(peer.commonName) is a \(permission.rawValue); \(method) needs the \(needed.rawValue) role"))
        }
        guard let audit = self.audit else { return try await AuditContext.$actor.withValue(actor) { try await next(request, context) } }
        return try await AdminAuditInterceptor(audit: audit, actor: actor).intercept(request: request, context: context, next: next)
    }
}
