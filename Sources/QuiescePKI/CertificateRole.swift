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

/// What an operator certificate lets its holder do over the remote admin API. Carried in the
/// subject as a second organizational unit, `OU=role:viewer` or `OU=role:operator`.
public enum OperatorPermission: String, Sendable, CaseIterable, Comparable {
    /// Read: agents, facts, engine info, plans.
    case viewer
    /// Also act: fleet runs (and, through the engine, whatever a run does).
    case `operator`

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs == .viewer && rhs == .operator }
}

/// The holder of a certificate, as read from its subject.
public struct PeerIdentity: Sendable, Hashable, CustomStringConvertible {
    public var commonName: String
    /// Nil when the subject carries no role this engine knows.
    public var role: CertificateRole?
    public var roleText: String?
    /// For operator certificates: `OU=role:…` (viewer when absent: least privilege).
    public var permission: OperatorPermission?

    public init(commonName: String, role: CertificateRole?, roleText: String? = nil) {
        self.commonName = commonName
        self.role = role
        self.roleText = roleText ?? role?.rawValue
    }

    /// Reads the common name and role of `certificate`'s subject.
    public init(certificate: Certificate) {
        var commonName = ""
        var roleText: String?
        var permissionText: String?
        for rdn in certificate.subject {
            for attribute in rdn {
                if attribute.type == .RDNAttributeType.commonName {
                    commonName = String(describing: attribute.value)
                } else if attribute.type == .RDNAttributeType.organizationalUnitName {
                    let text = String(describing: attribute.value)
                    if text.hasPrefix("role:") { permissionText = String(text.dropFirst(5)) } else { roleText = text }
                }
            }
        }
        self.commonName = commonName
        self.roleText = roleText
        self.role = roleText.flatMap(CertificateRole.init(rawValue:))
        if self.role == .operator { self.permission = permissionText.flatMap(OperatorPermission.init(rawValue:)) ?? .viewer }
    }

    public var description: String { "\(self.roleText ?? "no-role")/\(self.commonName)" }
}
