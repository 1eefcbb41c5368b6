/// Versions of the software and of the agent protocol.
public enum QuiesceVersion {
    /// The release of the engine, the agent and the CLI (they ship together).
    public static let software = "0.1.0"
}

/// A protocol version: a major mismatch is refused, minor versions only add fields.
public struct ProtocolVersionNumber: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32

    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    /// The agent session protocol this build speaks (`quiesce.agent.v1`).
    public static let agentSession = ProtocolVersionNumber(major: 1, minor: 0)

    public var description: String { "\(self.major).\(self.minor)" }

    public static func < (lhs: Self, rhs: Self) -> Bool {
        (lhs.major, lhs.minor) < (rhs.major, rhs.minor)
    }

    /// Returns nil when `peer` can talk to `self`, or the reason it cannot, naming both versions.
    public func incompatibility(with peer: ProtocolVersionNumber, peerRole: String, ownRole: String) -> String? {
        guard peer.major != self.major else { return nil }
        return "protocol version mismatch: the \(peerRole) speaks \(peer), the \(ownRole) speaks \(self); "
            + "major versions must match (upgrade the older side)"
    }
}
