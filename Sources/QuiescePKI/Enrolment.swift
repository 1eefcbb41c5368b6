import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import X509

/// Join tokens: how a fresh instance gets its certificate without a private key
/// ever leaving it. A token is `qt_<id>_<secret>`; the store keeps the id, the
/// SHA-256 of the secret (never the secret), what it is bound to (one instance
/// id, or a pattern such as `web-*`), when it expires and how many uses remain.
/// Stored as JSON next to the CA (`DIR/tokens.json`, mode 0600), changed under
/// an exclusive lock, so the CLI and a running engine can share it.
public struct EnrolmentToken: Codable, Sendable, Equatable {
    public var id: String
    public var secretHash: String
    /// Exactly this instance id, or nil when `pattern` is set.
    public var instance: String?
    /// A shell-style pattern (`*`, `?`, `[…]`) the instance id must match.
    public var pattern: String?
    public var createdAt: Date
    public var expiresAt: Date
    public var uses: Int
    public var usesLeft: Int
    public var revoked: Bool
    /// Instance ids it enrolled, oldest first.
    public var usedBy: [String]

    public var binding: String { self.instance ?? "match \(self.pattern ?? "?")" }

    public func state(at now: Date) -> String {
        if self.revoked { return "revoked" }
        if self.usesLeft <= 0 { return "used" }
        if now >= self.expiresAt { return "expired" }
        return "valid"
    }
}

/// Why a token was refused: a stable code and words for the agent to print.
public struct TokenRefusal: Error, Sendable, CustomStringConvertible, Equatable {
    /// token-malformed, token-unknown, token-revoked, token-expired, token-used, token-mismatch.
    public var code: String
    public var detail: String
    public var description: String { "\(self.code): \(self.detail)" }
}

public struct TokenStore: Sendable {
    public var path: String

    public init(path: String) { self.path = path }
    public init(ca: CADirectory) { self.path = ca.path + "/tokens.json" }

    /// Makes a token; returns its full text (shown once) and its record.
    public func create(instance: String?, pattern: String?, ttl: Duration, uses: Int, now: Date = Date()) throws -> (text: String, token: EnrolmentToken) {
        guard (instance == nil) != (pattern == nil) else {
            throw PKIError.invalidInput("a token is bound to one instance id (--instance ID) or a pattern (--match 'web-*'), exactly one of them")
        }
        if let instance { try CertificateAuthority.validateIdentifier(instance, what: "instance id") }
        if let pattern {
            let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@*?[]!")
            guard !pattern.isEmpty, pattern.count <= 128, pattern.allSatisfy(allowed.contains) else {
                throw PKIError.invalidInput("expected a pattern of instance ids such as 'web-*' (letters, digits, -_.:@ and * ? [ ]), found \"\(pattern)\"")
            }
        }
        guard ttl > .zero, ttl <= .seconds(30 * 86_400) else {
            throw PKIError.invalidInput("expected a token lifetime between 1 s and 30 days, found \(ttl)")
        }
        guard (1...10_000).contains(uses) else { throw PKIError.invalidInput("expected 1–10000 uses, found \(uses)") }
        let id = Self.randomHex(6)
        let secret = Self.randomHex(24)
        let token = EnrolmentToken(
            id: id, secretHash: Self.sha256(secret), instance: instance, pattern: pattern, createdAt: now,
            expiresAt: now.addingTimeInterval(ttl.timeInterval), uses: uses, usesLeft: uses, revoked: false, usedBy: [])
        try self.update { $0.append(token) }
        return ("qt_\(id)_\(secret)", token)
    }

    public func list() throws -> [EnrolmentToken] { try self.update { _ in } }

    /// Revokes a token by id (or by its full text).
    @discardableResult
    public func revoke(_ idOrText: String) throws -> EnrolmentToken {
        let id = Self.parse(idOrText)?.id ?? idOrText
        var found: EnrolmentToken?
        try self.update { tokens in
            guard let index = tokens.firstIndex(where: { $0.id == id }) else { return }
            tokens[index].revoked = true
            found = tokens[index]
        }
        guard let found else { throw PKIError.invalidInput("no token with id \"\(id)\" (see `quiesce token list`)") }
        return found
    }

    /// Spends one use of the token for `requested` (the instance id the agent asks for; nil: the token's own).
    /// - Returns: The instance id the certificate is for.
    /// - Throws: `TokenRefusal`.
    public func redeem(_ text: String, requested: String?, now: Date = Date()) throws -> String {
        guard let (id, secret) = Self.parse(text) else {
            throw TokenRefusal(code: "token-malformed", detail: "expected a token such as qt_1a2b3c4d5e6f_…, from `quiesce token create`")
        }
        var outcome: Result<String, TokenRefusal> = .failure(TokenRefusal(code: "token-unknown", detail: "no token \(id) on this engine"))
        try self.update { tokens in
            guard let index = tokens.firstIndex(where: { $0.id == id }) else { return }
            let token = tokens[index]
            // Compare hashes in constant time.
            let given = Array(Self.sha256(secret).utf8), stored = Array(token.secretHash.utf8)
            guard given.count == stored.count, zip(given, stored).reduce(0, { $0 | ($1.0 ^ $1.1) }) == 0 else {
                outcome = .failure(TokenRefusal(code: "token-unknown", detail: "no token \(id) with this secret on this engine"))
                return
            }
            if token.revoked {
                outcome = .failure(TokenRefusal(code: "token-revoked", detail: "token \(id) was revoked"))
                return
            }
            if now >= token.expiresAt {
                outcome = .failure(TokenRefusal(code: "token-expired", detail: "token \(id) expired at \(Self.iso(token.expiresAt))"))
                return
            }
            if token.usesLeft <= 0 {
                let who = token.usedBy.last.map { " (last by \($0))" } ?? ""
                outcome = .failure(TokenRefusal(code: "token-used", detail: "token \(id) has been used \(token.uses) time\(token.uses == 1 ? "" : "s") already\(who); it cannot be replayed"))
                return
            }
            let instance: String
            if let bound = token.instance {
                if let requested, requested != bound {
                    outcome = .failure(TokenRefusal(code: "token-mismatch", detail: "token \(id) is for instance \(bound), not \(requested)"))
                    return
                }
                instance = bound
            } else {
                guard let requested else {
                    outcome = .failure(TokenRefusal(code: "token-mismatch", detail: "token \(id) matches '\(token.pattern ?? "")': name the instance (quiesce-agent enrol --instance-id ID)"))
                    return
                }
                guard (try? CertificateAuthority.validateIdentifier(requested, what: "instance id")) != nil,
                      fnmatch(token.pattern ?? "", requested, 0) == 0 else {
                    outcome = .failure(TokenRefusal(code: "token-mismatch", detail: "instance id \(requested) does not match token \(id)'s pattern '\(token.pattern ?? "")'"))
                    return
                }
                instance = requested
            }
            tokens[index].usesLeft -= 1
            tokens[index].usedBy.append(instance)
            outcome = .success(instance)
        }
        return try outcome.get()
    }

    static func parse(_ text: String) -> (id: String, secret: String)? {
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "_", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "qt", parts[1].count == 12, parts[2].count == 48,
              (parts[1] + parts[2]).allSatisfy(\.isHexDigit) else { return nil }
        return (String(parts[1]), String(parts[2]))
    }

    /// Reads the tokens, lets `change` edit them, writes them back: all under an exclusive lock.
    @discardableResult
    func update(_ change: (inout [EnrolmentToken]) throws -> Void) throws -> [EnrolmentToken] {
        try updateJSONList(at: self.path, what: "the token store", writeWhenMissing: true, change)
    }

    /// Runs `body` holding an exclusive flock on `path.lock`.
    static func locked<T>(_ path: String, _ body: () throws -> T) throws -> T {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty { try? CADirectory.makeDirectory(directory, mode: 0o700) }
        let fd = open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw PKIError.fileProblem(path: path + ".lock", detail: "cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else { throw PKIError.fileProblem(path: path + ".lock", detail: "cannot lock: \(String(cString: strerror(errno)))") }
        }
        defer { flock(fd, LOCK_UN) }
        return try body()
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return encoder
    }()
    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }()

    static func sha256(_ text: String) -> String { SHA256.hash(data: Data(text.utf8)).map { String(format: "%02x", $0) }.joined() }

    static func randomHex(_ bytes: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
    }

    static func iso(_ date: Date) -> String { ISO8601DateFormatter().string(from: date) }
}

/// Revoked certificates: by serial, or every certificate of an identity issued
/// up to a moment (an agent or operator revoked by name). `DIR/revoked.json`,
/// mode 0600, changed under a lock; the engine re-reads it when it changes.
public struct RevocationEntry: Codable, Sendable, Equatable {
    /// Hex serial, for one certificate.
    public var serial: String?
    /// "agent/web-1" or "operator/alice": every certificate of that identity issued up to `revokedAt`.
    public var identity: String?
    public var revokedAt: Date
    public var reason: String
}

public struct RevocationList: Sendable {
    public var path: String
    public init(path: String) { self.path = path }
    public init(ca: CADirectory) { self.path = ca.path + "/revoked.json" }

    public func entries() throws -> [RevocationEntry] {
        // Nothing revoked yet: no file to read, and a read creates nothing (no lock file, no directory).
        guard FileManager.default.fileExists(atPath: self.path) else { return [] }
        return try self.update { _ in }
    }

    @discardableResult
    public func revoke(serial: String? = nil, identity: String? = nil, reason: String, now: Date = Date()) throws -> RevocationEntry {
        guard (serial == nil) != (identity == nil) else { throw PKIError.invalidInput("revoke one serial or one identity") }
        if let serial {
            let hex = serial.lowercased().replacingOccurrences(of: ":", with: "")
            guard !hex.isEmpty, hex.count <= 64, hex.allSatisfy(\.isHexDigit) else {
                throw PKIError.invalidInput("expected a certificate serial in hex (as `quiesce agents` shows it), found \"\(serial)\"")
            }
        }
        // Stored in whole seconds (the list's ISO 8601 dates and X.509's times keep no fraction):
        // the next whole second, so every certificate issued up to now is covered.
        let entry = RevocationEntry(serial: serial.map { $0.lowercased().replacingOccurrences(of: ":", with: "") }, identity: identity,
                                    revokedAt: Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.up)), reason: reason)
        try self.update { $0.append(entry) }
        return entry
    }

    /// Why `certificate` is revoked, or nil.
    public static func reason(for certificate: Certificate, in entries: [RevocationEntry]) -> String? {
        let serial = Self.serialHex(certificate)
        let peer = PeerIdentity(certificate: certificate)
        let identity = "\(peer.roleText ?? "none")/\(peer.commonName)"
        // Issued = notBefore + 5 min (certificates are back-dated that much for clock skew). X.509
        // keeps whole seconds (swift-certificates rounds to the nearest) and `revokedAt` is the whole
        // second after the revocation, so every certificate issued before it is revoked, and one
        // issued up to 1.5 s after it may be too (the safe side of the tie).
        let issued = certificate.notValidBefore.timeIntervalSince1970.rounded() + 300
        for entry in entries {
            if entry.serial == serial { return "certificate \(serial) was revoked at \(TokenStore.iso(entry.revokedAt)): \(entry.reason)" }
            if entry.identity == identity && issued <= entry.revokedAt.timeIntervalSince1970.rounded(.up) {
                return "\(identity)'s certificates were revoked at \(TokenStore.iso(entry.revokedAt)): \(entry.reason)"
            }
        }
        return nil
    }

    public static func serialHex(_ certificate: Certificate) -> String {
        certificate.serialNumber.bytes.map { String(format: "%02x", $0) }.joined()
    }

    @discardableResult
    func update(_ change: (inout [RevocationEntry]) throws -> Void) throws -> [RevocationEntry] {
        try updateJSONList(at: self.path, what: "the revocation list", writeWhenMissing: false, change)
    }
}

/// Reads the JSON list at `path`, lets `change` edit it, and writes it back (mode 0600,
/// atomically) when it changed — all under the file's exclusive lock, so the CLI and a
/// running engine can share it. `writeWhenMissing` also writes an unchanged list to a
/// file that does not exist yet.
func updateJSONList<Element: Codable & Equatable>(
    at path: String, what: String, writeWhenMissing: Bool, _ change: (inout [Element]) throws -> Void
) throws -> [Element] {
    try TokenStore.locked(path) {
        var elements: [Element] = []
        if let data = FileManager.default.contents(atPath: path), !data.isEmpty {
            do {
                elements = try TokenStore.decoder.decode([Element].self, from: data)
            } catch {
                throw PKIError.fileProblem(path: path, detail: "expected \(what) (a JSON list), found something unreadable: \(error)")
            }
        }
        let before = elements
        try change(&elements)
        if elements != before || (writeWhenMissing && !FileManager.default.fileExists(atPath: path)) {
            try CADirectory.atomicWrite(String(decoding: try TokenStore.encoder.encode(elements), as: UTF8.self) + "\n", to: path, mode: 0o600)
        }
        return elements
    }
}

extension CertificateAuthority {
    /// Issues an agent certificate for `instanceID` to the holder of the CSR's key. Only the key is
    /// taken from the CSR (its signature proves the requester holds it); the subject, the role
    /// (`OU=agent`), the usage (clientAuth) and the validity are the CA's, whatever the CSR asks.
    public func issueAgent(instanceID: String, csr: CertificateSigningRequest, validity: Duration, now: Date = Date()) throws -> Certificate {
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw PKIError.invalidInput("the certificate signing request's signature does not verify with its own key")
        }
        var request = Request.agent(instanceID: instanceID)
        request.validity = validity
        return try self.certificate(request, publicKey: csr.publicKey, now: now)
    }
}

/// The agent's side of enrolment: a key pair made here, and a CSR that proves it holds the key.
public enum CertificateRequestMaker {
    public static func make(commonName: String) throws -> (key: Certificate.PrivateKey, keyPEM: String, csrPEM: String) {
        try CertificateAuthority.validateIdentifier(commonName, what: "instance id")
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let subject = try DistinguishedName {
            OrganizationName("Quiesce")
            OrganizationalUnitName("agent")
            CommonName(commonName)
        }
        let csr = try CertificateSigningRequest(
            version: .v1, subject: subject, privateKey: key, attributes: CertificateSigningRequest.Attributes(),
            signatureAlgorithm: .ecdsaWithSHA256)
        return (key, try key.serializeAsPEM().pemString + "\n", try csr.serializeAsPEM().pemString + "\n")
    }

    /// Writes a key (0600, first) and its certificate and CA, each atomically.
    public static func write(keyPEM: String, certificatePEM: String, caPEM: String?, to files: TLSFiles) throws {
        try CADirectory.makeDirectory((files.keyPath as NSString).deletingLastPathComponent, mode: 0o700)
        try CADirectory.atomicWrite(keyPEM, to: files.keyPath, mode: 0o600)
        try CADirectory.atomicWrite(certificatePEM, to: files.certificatePath, mode: 0o644)
        if let caPEM { try CADirectory.atomicWrite(caPEM, to: files.trustRootsPath, mode: 0o644) }
    }
}
