/// How consistent a snapshot group is, from weakest to strongest.
///
/// A group is recorded at a level only when the thaw reply proves it
/// (ARCHITECTURE.md, invariant 3); the default is ``crash``.
public enum ConsistencyLevel: Int, Sendable, Comparable, CaseIterable, Codable, CustomStringConvertible {
    /// What a power cut leaves: the disks at one point in time, nothing flushed.
    case crash = 0
    /// Filesystems flushed and frozen across the snapshot.
    case filesystem = 1
    /// Applications quiesced by their freeze scripts (or VSS writers), then filesystems frozen.
    case application = 2

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }

    /// The name used on the command line, in fleet files and in JSON output.
    public var name: String {
        switch self {
        case .crash: "crash"
        case .filesystem: "filesystem"
        case .application: "application"
        }
    }

    /// The tag value the seed's cloud puts on snapshots (`APPConsistent`, `FsConsistent`).
    public var tagValue: String {
        switch self {
        case .crash: "CrashConsistent"
        case .filesystem: "FsConsistent"
        case .application: "APPConsistent"
        }
    }

    public var description: String { self.name }

    /// Parses ``name``; also accepts the usual spellings "crash-consistent", "fs", "app".
    public init?(name: String) {
        switch name.lowercased() {
        case "crash", "crash-consistent": self = .crash
        case "filesystem", "fs", "filesystem-consistent": self = .filesystem
        case "application", "app", "application-consistent": self = .application
        default: return nil
        }
    }
}
