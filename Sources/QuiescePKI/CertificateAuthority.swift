import Crypto
import Foundation
import QuiesceCore
import SwiftASN1
import X509

/// A certificate and its private key, PEM-encoded.
public struct IssuedCertificate: Sendable {
    public var certificate: Certificate
    public var privateKey: Certificate.PrivateKey

    public var certificatePEM: String { get throws { try self.certificate.serializeAsPEM().pemString } }
    public var privateKeyPEM: String { get throws { try self.privateKey.serializeAsPEM().pemString } }

    /// SHA-256 of the DER certificate, lower-case hex: what `quiesce agents` shows.
    public var fingerprint: String { Self.fingerprint(of: self.certificate) }

    public static func fingerprint(of certificate: Certificate) -> String {
        var serializer = DER.Serializer()
        guard (try? serializer.serialize(certificate)) != nil else { return "" }
        return SHA256.hash(data: serializer.serializedBytes).map { String(format: "%02x", $0) }.joined()
    }
}

/// The engine's small certificate authority: one self-signed root that signs
/// the engine's server certificate and the agents' and operators' client
/// certificates. Keys are ECDSA P-256.
public struct CertificateAuthority: Sendable {
    public var root: IssuedCertificate

    public init(root: IssuedCertificate) {
        self.root = root
    }

    /// Makes a new self-signed root.
    /// - Parameters:
    ///   - commonName: Subject common name, e.g. "Quiesce CA (prod-eu)".
    ///   - validity: How long the root is valid.
    ///   - now: The start of validity (back-dated five minutes for clock skew).
    public static func create(
        commonName: String = "Quiesce CA",
        validity: Duration = .seconds(10 * 365 * 86_400),
        now: Date = Date()
    ) throws -> CertificateAuthority {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName {
            OrganizationName("Quiesce")
            CommonName(commonName)
        }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(validity.timeInterval),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
            },
            issuerPrivateKey: key
        )
        return CertificateAuthority(root: IssuedCertificate(certificate: certificate, privateKey: key))
    }

    /// What a new certificate should say.
    public struct Request: Sendable {
        public var commonName: String
        public var role: CertificateRole
        public var dnsNames: [String]
        public var ipAddresses: [String]
        /// Validity starts at `notBefore` (default: now less five minutes).
        public var notBefore: Date?
        public var validity: Duration
        /// Extended key usages; by default serverAuth for `.engine`, clientAuth otherwise.
        public var extendedKeyUsage: [ExtendedKeyUsage.Usage]?
        /// Operators only: what they may do over the remote admin API.
        public var permission: OperatorPermission?

        public init(
            commonName: String, role: CertificateRole, dnsNames: [String] = [], ipAddresses: [String] = [],
            notBefore: Date? = nil, validity: Duration = .seconds(397 * 86_400),
            extendedKeyUsage: [ExtendedKeyUsage.Usage]? = nil
        ) {
            self.commonName = commonName
            self.role = role
            self.dnsNames = dnsNames
            self.ipAddresses = ipAddresses
            self.notBefore = notBefore
            self.validity = validity
            self.extendedKeyUsage = extendedKeyUsage
        }

        /// A server certificate for the engine, reachable at these names and addresses.
        public static func engine(names: [String], ipAddresses: [String]) -> Request {
            Request(commonName: names.first ?? "quiesce-engine", role: .engine, dnsNames: names, ipAddresses: ipAddresses)
        }

        /// A client certificate for the agent of one instance.
        public static func agent(instanceID: String) -> Request {
            Request(commonName: instanceID, role: .agent)
        }

        /// A client certificate for an operator (viewer unless said otherwise).
        public static func `operator`(name: String, permission: OperatorPermission = .viewer) -> Request {
            var request = Request(commonName: name, role: .operator)
            request.permission = permission
            return request
        }
    }

    /// Issues a certificate signed by this authority.
    public func issue(_ request: Request, now: Date = Date()) throws -> IssuedCertificate {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        return IssuedCertificate(certificate: try self.certificate(request, publicKey: key.publicKey, now: now), privateKey: key)
    }

    /// A certificate for `publicKey` (a key the holder made and kept), signed by this authority.
    public func certificate(_ request: Request, publicKey: Certificate.PublicKey, now: Date = Date()) throws -> Certificate {
        try Self.validateIdentifier(request.commonName, what: "common name")
        let subject = try DistinguishedName {
            OrganizationName("Quiesce")
            OrganizationalUnitName(request.role.rawValue)
            if request.role == .operator { OrganizationalUnitName("role:" + (request.permission ?? .viewer).rawValue) }
            CommonName(request.commonName)
        }
        var sans: [GeneralName] = request.dnsNames.map { .dnsName($0) }
        for ip in request.ipAddresses {
            guard let bytes = IPAddressBytes(ip) else {
                throw PKIError.invalidInput("expected an IPv4 or IPv6 address for a subject alternative name, found \"\(ip)\"")
            }
            sans.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(bytes.bytes))))
        }
        let usages = request.extendedKeyUsage ?? (request.role == .engine ? [.serverAuth] : [.clientAuth])
        let notBefore = request.notBefore ?? now.addingTimeInterval(-300)
        return try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: notBefore,
            notValidAfter: notBefore.addingTimeInterval(request.validity.timeInterval),
            issuer: self.root.certificate.subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyAgreement: true))
                try ExtendedKeyUsage(usages)
                SubjectKeyIdentifier(hash: publicKey)
                AuthorityKeyIdentifier(keyIdentifier: SubjectKeyIdentifier(hash: self.root.certificate.publicKey).keyIdentifier)
                if !sans.isEmpty {
                    SubjectAlternativeNames(sans)
                }
            },
            issuerPrivateKey: self.root.privateKey
        )
    }

    /// Instance ids and operator names become file names and certificate
    /// subjects: keep them to a conservative alphabet.
    public static func validateIdentifier(_ value: String, what: String) throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@")
        guard !value.isEmpty, value.count <= 128, value.allSatisfy(allowed.contains), value != ".", value != ".." else {
            throw PKIError.invalidInput(
                "expected a \(what) of 1–128 characters from [A-Za-z0-9-_.:@], found \"\(value)\"")
        }
    }
}

/// Parses textual IP addresses into their network-order bytes.
struct IPAddressBytes {
    var bytes: [UInt8]

    init?(_ text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self.bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            self.bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }
}

/// Errors from the PKI module; each says what was expected and what was found.
public enum PKIError: Error, CustomStringConvertible, Sendable {
    case invalidInput(String)
    case fileProblem(path: String, detail: String)

    public var description: String {
        switch self {
        case .invalidInput(let detail): detail
        case .fileProblem(let path, let detail): "\(path): \(detail)"
        }
    }
}
