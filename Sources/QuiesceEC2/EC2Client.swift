import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import QuiesceCore

/// One failed EC2 call, typed: what the API said (its error code), or that the
/// network failed, and whether the request may have reached EC2 anyway.
public struct EC2Error: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// EC2 answered with an error code ("RequestLimitExceeded", "UnauthorizedOperation", …).
        case api(code: String, message: String, status: Int)
        /// No answer: refused, reset, timed out. `sent` when the request may have arrived.
        case network(String, sent: Bool)
        /// An answer that is not what EC2 sends.
        case badReply(String)
    }

    public var action: String
    public var kind: Kind
    public var requestID: String?
    /// From a `Retry-After` header, when the endpoint gave one.
    public var retryAfter: Duration?

    public init(action: String, kind: Kind, requestID: String? = nil, retryAfter: Duration? = nil) {
        self.action = action
        self.kind = kind
        self.requestID = requestID
        self.retryAfter = retryAfter
    }

    public var code: String? { if case .api(let code, _, _) = self.kind { code } else { nil } }

    /// Error codes that mean "slow down".
    public static let throttleCodes: Set<String> = [
        "RequestLimitExceeded", "SnapshotCreationPerVolumeRateExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
        "TooManyRequestsException", "SnapshotLimitExceeded_Rate",
    ]
    /// Error codes that mean the caller may not do this.
    public static let deniedCodes: Set<String> = [
        "UnauthorizedOperation", "AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "OptInRequired", "Blocked",
        "AccessDenied", "AccessDeniedException",
    ]

    public var isThrottle: Bool { self.code.map(Self.throttleCodes.contains) ?? false }
    public var isDenied: Bool { self.code.map(Self.deniedCodes.contains) ?? false }
    /// A 5xx, an internal error, or the network: worth trying again.
    public var isTransient: Bool {
        switch self.kind {
        case .api(let code, _, let status): status >= 500 || ["InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"].contains(code)
        case .network: true
        case .badReply: false
        }
    }
    /// The request may have been carried out although no success came back.
    public var isAmbiguous: Bool {
        switch self.kind {
        case .api(_, _, let status): status >= 500
        case .network(_, let sent): sent
        case .badReply: true
        }
    }

    public var description: String {
        let id = self.requestID.map { " (request \($0))" } ?? ""
        switch self.kind {
        case .api(let code, let message, let status): return "EC2 \(self.action): \(code): \(message) [HTTP \(status)]\(id)"
        case .network(let detail, _): return "EC2 \(self.action): no answer: \(detail)"
        case .badReply(let detail): return "EC2 \(self.action): unexpected reply: \(detail)\(id)"
        }
    }

    /// As the coordinator's typed error.
    public var providerError: ProviderError {
        if self.isThrottle { return .throttled(retryAfter: self.retryAfter, detail: self.description) }
        if self.isTransient { return .transient(self.description) }
        if let code = self.code, code.hasSuffix(".NotFound") || code.hasSuffix(".Malformed") && code.hasPrefix("InvalidSnapshot") {
            return .notFound(self.description)
        }
        if self.isDenied { return .permanent(self.description + " — the IAM policy in docs/ec2-iam-policy.json lists what Quiesce needs") }
        return .permanent(self.description)
    }
}

/// The EC2 Query API (version 2016-11-15): form-encoded POSTs signed with SigV4,
/// XML replies. No retries here: the provider decides what may be repeated.
public struct EC2Client: Sendable {
    public let endpoint: URL
    public let region: String
    let credentials: AWSCredentials
    let http: HTTPClient
    public var timeout: Duration
    /// For tests: a fixed clock for the signature's date.
    var now: @Sendable () -> Date = { Date() }

    /// One client for the process, never shut down (it lives as long as the process): its pool
    /// holds up to 64 connections per endpoint, so that the creates of frozen instances do not
    /// queue behind a fleet's other calls (async-http-client's shared client allows 8).
    public static let http: HTTPClient = {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        configuration.timeout = .init(connect: .seconds(10), read: .seconds(60))
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    public init(endpoint: URL, region: String, credentials: AWSCredentials, http: HTTPClient = EC2Client.http, timeout: Duration = .seconds(30)) {
        self.endpoint = endpoint
        self.region = region
        self.credentials = credentials
        self.http = http
        self.timeout = timeout
    }

    /// The form body for `action` and `parameters` ("Action=…&Version=2016-11-15&…").
    static func body(_ action: String, _ parameters: [(String, String)]) -> String {
        ([("Action", action), ("Version", "2016-11-15")] + parameters).map { "\(SigV4.encode($0.0))=\(SigV4.encode($0.1))" }.joined(separator: "&")
    }

    /// Calls `action`; the reply's root element on success.
    public func call(_ action: String, _ parameters: [(String, String)]) async throws -> XMLTree {
        let body = Self.body(action, parameters)
        guard let host = self.endpoint.host else { throw EC2Error(action: action, kind: .badReply("endpoint \(self.endpoint) has no host")) }
        let hostHeader = self.endpoint.port.map { "\(host):\($0)" } ?? host
        let date = SigV4.amzDate(self.now())
        let contentType = "application/x-www-form-urlencoded; charset=utf-8"
        var headers = [("host", hostHeader), ("content-type", contentType), ("x-amz-date", date)]
        if let token = self.credentials.sessionToken { headers.append(("x-amz-security-token", token)) }
        let signed = SigV4.sign(method: "POST", path: self.endpoint.path.isEmpty ? "/" : self.endpoint.path, headers: headers,
                                payloadSHA256: SigV4.hexSHA256(Data(body.utf8)), accessKeyID: self.credentials.accessKeyID,
                                secretAccessKey: self.credentials.secretAccessKey, region: self.region, service: "ec2", amzDate: date)
        var request = HTTPClientRequest(url: self.endpoint.absoluteString)
        request.method = .POST
        for (name, value) in headers { request.headers.replaceOrAdd(name: name, value: value) }
        request.headers.replaceOrAdd(name: "authorization", value: signed.authorization)
        request.headers.replaceOrAdd(name: "user-agent", value: "quiesce/\(QuiesceVersion.software)")
        request.body = .bytes(ByteBuffer(string: body))

        let response: HTTPClientResponse
        let data: Data
        do {
            response = try await self.http.execute(request, timeout: .nanoseconds(self.timeout.nanoseconds))
            let buffer = try await response.body.collect(upTo: 32 << 20)
            data = Data(buffer.readableBytesView)
        } catch {
            throw EC2Error(action: action, kind: .network(Self.describe(error), sent: Self.maySent(error)))
        }
        let status = Int(response.status.code)
        let tree = XMLTree.parse(data)
        let requestID = tree?.value("RequestID") ?? tree?.value("requestId")
        guard (200..<300).contains(status) else {
            let error = tree?.child("Errors")?.child("Error")
            let retryAfter = response.headers.first(name: "retry-after").flatMap(Double.init).map { Duration.milliseconds(Int64($0 * 1000)) }
            if let error, let code = error.value("Code") {
                throw EC2Error(action: action, kind: .api(code: code, message: error.value("Message") ?? "", status: status),
                               requestID: requestID, retryAfter: retryAfter)
            }
            let text = String(decoding: data.prefix(200), as: UTF8.self)
            throw EC2Error(action: action, kind: .api(code: status >= 500 ? "HTTP\(status)" : "HTTP\(status)", message: text.isEmpty ? "(no body)" : text, status: status),
                           requestID: requestID, retryAfter: retryAfter)
        }
        guard let tree else {
            throw EC2Error(action: action, kind: .badReply("expected an XML document, found \(data.count) bytes: \(String(decoding: data.prefix(120), as: UTF8.self))"))
        }
        return tree
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? HTTPClientError { return "\(error)" }
        return "\(type(of: error)): \(error)"
    }

    /// A refused connection never reached EC2; a reset or a timeout after sending may have.
    static func maySent(_ error: any Error) -> Bool {
        let text = "\(error)".lowercased()
        if text.contains("connection refused") || text.contains("connectTimeout".lowercased()) { return false }
        return true
    }
}
