import X509

/// What a certificate lets its holder do. Carried in the subject's
/// organizational unit; the common name is the holder's id.
public enum CertificateRole: String, Sendable, CaseIterable {
    /// The engine's server certificate on the agent and enrolment ports.
    case engine
    /// A guest agent; the common name is the instance id.
    case agent
    /// A person or tool allowed to use the admin API remotely.
    case `operator`
}

/// The holder of a certificate, as read from its subject.
public struct PeerIdentity: Sendable, Hashable, CustomStringConvertible {
    public var commonName: String
    /// Nil when the subject carries no role this engine knows.
    public var role: CertificateRole?
    public var roleText: String?

    public init(commonName: String, role: CertificateRole?, roleText: String? = nil) {
        self.commonName = commonName
        self.role = role
        self.roleText = roleText ?? role?.rawValue
    }

    /// Reads the common name and role of `certificate`'s subject.
    public init(certificate: Certificate) {
        var commonName = ""
        var roleText: String?
        for rdn in certificate.subject {
            for attribute in rdn {
                if attribute.type == .RDNAttributeType.commonName {
                    commonName = String(describing: attribute.value)
                } else if attribute.type == .RDNAttributeType.organizationalUnitName {
                    roleText = String(describing: attribute.value)
                }
            }
        }
        self.commonName = commonName
        self.roleText = roleText
        self.role = roleText.flatMap(CertificateRole.init(rawValue:))
    }

    public var description: String { "\(self.roleText ?? "no-role")/\(self.commonName)" }
}
