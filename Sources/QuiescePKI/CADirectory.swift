import Foundation
#if canImport(Glibc)
import Glibc
#endif
import X509

/// The CA's files on disk:
///
///     DIR/ca.pem  DIR/ca.key                    the root (key 0600)
///     DIR/engine.pem  DIR/engine.key            the engine's server certificate
///     DIR/agents/ID.pem  DIR/agents/ID.key      one per instance
///     DIR/operators/NAME.pem  …/NAME.key        one per operator
///
/// Every private key is written with mode 0600, atomically (temp file + rename),
/// and never overwritten unless asked.
public struct CADirectory: Sendable {
    public var path: String

    public init(path: String) {
        self.path = path
    }

    public var caCertificatePath: String { self.path + "/ca.pem" }
    public var caKeyPath: String { self.path + "/ca.key" }
    public var engineFiles: TLSFiles { self.files(stem: "engine") }

    public func agentFiles(instanceID: String) -> TLSFiles { self.files(stem: "agents/\(instanceID)") }
    public func operatorFiles(name: String) -> TLSFiles { self.files(stem: "operators/\(name)") }

    private func files(stem: String) -> TLSFiles {
        TLSFiles(
            certificatePath: "\(self.path)/\(stem).pem",
            keyPath: "\(self.path)/\(stem).key",
            trustRootsPath: self.caCertificatePath
        )
    }

    public var exists: Bool { FileManager.default.fileExists(atPath: self.caCertificatePath) }

    /// Creates the CA and the engine's server certificate.
    /// - Parameters:
    ///   - names: DNS names the engine answers to (first is the common name).
    ///   - ipAddresses: IP addresses agents dial (connecting by IP checks an IP SAN).
    ///   - force: Replace an existing CA. Without it an existing CA is an error.
    @discardableResult
    public func initialize(
        commonName: String = "Quiesce CA", names: [String] = ["localhost"],
        ipAddresses: [String] = ["127.0.0.1", "::1"], force: Bool = false
    ) throws -> CertificateAuthority {
        if self.exists && !force {
            throw PKIError.fileProblem(
                path: self.caCertificatePath,
                detail: "a CA already exists here; pass --force to replace it (every issued certificate stops working)")
        }
        try Self.makeDirectory(self.path, mode: 0o700)
        let ca = try CertificateAuthority.create(commonName: commonName)
        try Self.write(ca.root, certificatePath: self.caCertificatePath, keyPath: self.caKeyPath, overwrite: true)
        let engine = try ca.issue(.engine(names: names, ipAddresses: ipAddresses))
        try Self.write(engine, files: self.engineFiles, overwrite: true)
        return ca
    }

    /// Reads the CA back, with an error that says what is wrong with which file.
    public func load() throws -> CertificateAuthority {
        guard self.exists else {
            throw PKIError.fileProblem(
                path: self.caCertificatePath, detail: "no CA here; create one with `quiesce ca init --dir \(self.path)`")
        }
        let certificate = try Self.readCertificate(self.caCertificatePath)
        let key = try Self.readPrivateKey(self.caKeyPath)
        guard key.publicKey == certificate.publicKey else {
            throw PKIError.fileProblem(path: self.caKeyPath, detail: "this key does not belong to \(self.caCertificatePath)")
        }
        return CertificateAuthority(root: IssuedCertificate(certificate: certificate, privateKey: key))
    }

    /// Issues and writes a certificate; refuses to replace an existing one unless `overwrite`.
    @discardableResult
    public func issue(_ request: CertificateAuthority.Request, overwrite: Bool = false) throws -> TLSFiles {
        let ca = try self.load()
        let files: TLSFiles
        switch request.role {
        case .agent: files = self.agentFiles(instanceID: request.commonName)
        case .operator: files = self.operatorFiles(name: request.commonName)
        case .engine: files = self.engineFiles
        }
        try Self.write(try ca.issue(request), files: files, overwrite: overwrite)
        return files
    }

    // MARK: files

    public static func write(_ issued: IssuedCertificate, files: TLSFiles, overwrite: Bool) throws {
        try self.write(issued, certificatePath: files.certificatePath, keyPath: files.keyPath, overwrite: overwrite)
    }

    static func write(_ issued: IssuedCertificate, certificatePath: String, keyPath: String, overwrite: Bool) throws {
        if !overwrite && FileManager.default.fileExists(atPath: certificatePath) {
            throw PKIError.fileProblem(path: certificatePath, detail: "already exists; pass --force to issue a new one")
        }
        try self.makeDirectory((certificatePath as NSString).deletingLastPathComponent, mode: 0o700)
        try self.atomicWrite(try issued.privateKeyPEM + "\n", to: keyPath, mode: 0o600)
        try self.atomicWrite(try issued.certificatePEM + "\n", to: certificatePath, mode: 0o644)
    }

    public static func readCertificate(_ path: String) throws -> Certificate {
        let text = try self.readText(path, expecting: "a PEM certificate")
        do {
            return try Certificate(pemEncoded: text)
        } catch {
            throw PKIError.fileProblem(
                path: path,
                detail: "expected a PEM certificate (-----BEGIN CERTIFICATE-----), found \(Self.describeStart(text)): \(error)")
        }
    }

    public static func readPrivateKey(_ path: String) throws -> Certificate.PrivateKey {
        let text = try self.readText(path, expecting: "a PEM private key")
        do {
            return try Certificate.PrivateKey(pemEncoded: text)
        } catch {
            throw PKIError.fileProblem(
                path: path, detail: "expected a PEM private key (-----BEGIN PRIVATE KEY-----), found \(Self.describeStart(text))")
        }
    }

    static func readText(_ path: String, expecting: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw PKIError.fileProblem(path: path, detail: "expected \(expecting), but the file is missing or unreadable")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw PKIError.fileProblem(path: path, detail: "expected \(expecting), found binary data (\(data.count) bytes)")
        }
        return text
    }

    static func describeStart(_ text: String) -> String {
        let first = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        if first.isEmpty { return "an empty file" }
        return "\"\(first.prefix(40))\(first.count > 40 ? "…" : "")\""
    }

    static func makeDirectory(_ path: String, mode: Int) throws {
        try FileManager.default.createDirectory(
            atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: mode])
    }

    /// Writes via a temporary file created with `mode` from the start, then renames.
    static func atomicWrite(_ text: String, to path: String, mode: mode_t) throws {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw PKIError.fileProblem(path: temporary, detail: "cannot create: \(String(cString: strerror(errno)))")
        }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd)
        fchmod(fd, mode)
        close(fd)
        guard written == bytes.count, synced == 0, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw PKIError.fileProblem(path: path, detail: "cannot write: \(String(cString: strerror(errno)))")
        }
    }
}

/// The three files a TLS endpoint needs.
public struct TLSFiles: Sendable, Hashable, Codable {
    public var certificatePath: String
    public var keyPath: String
    public var trustRootsPath: String

    public init(certificatePath: String, keyPath: String, trustRootsPath: String) {
        self.certificatePath = certificatePath
        self.keyPath = keyPath
        self.trustRootsPath = trustRootsPath
    }

    /// Reads and checks all three files, so a bad file is reported by name
    /// before any connection is tried.
    public func validate() throws -> (certificate: Certificate, trustRoot: Certificate) {
        let certificate = try CADirectory.readCertificate(self.certificatePath)
        let key = try CADirectory.readPrivateKey(self.keyPath)
        guard key.publicKey == certificate.publicKey else {
            throw PKIError.fileProblem(path: self.keyPath, detail: "this key does not belong to \(self.certificatePath)")
        }
        let root = try CADirectory.readCertificate(self.trustRootsPath)
        return (certificate, root)
    }
}
