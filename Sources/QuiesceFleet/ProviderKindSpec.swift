import Foundation

/// What one provider kind accepts in a fleet file: the keys of its block under
/// `providers:`, the keys it adds to an instance, and whether an instance must
/// list its disks. The checks are data, so every kind's errors read alike
/// (file, line, field, expected, found); `QuiesceProviders` builds the provider
/// from the checked values. A new kind adds a spec here and a builder there.
public struct ProviderKindSpec: Sendable {
    public enum ValueKind: Sendable {
        case string
        case absolutePath
        /// http:// or https:// with a host.
        case url
        /// Letters, digits, '.', '_', '-'.
        case name
        /// Matches the pattern (a regular expression), described in words for errors.
        case pattern(String, String)
        case int(ClosedRange<Int>)
        case bool
        /// A list of strings, each matching the pattern.
        case list(String, String)
    }

    public struct Key: Sendable {
        public var name: String
        public var kind: ValueKind
        public var required: Bool
        public init(_ name: String, _ kind: ValueKind, required: Bool = false) {
            self.name = name
            self.kind = kind
            self.required = required
        }
    }

    public var name: String
    public var keys: [Key]
    public var instanceKeys: [Key]
    /// When an instance may leave `disks` out: never (nil), or when it gives this key.
    public var disksOptionalWith: String?
    /// What a disk id looks like, for errors ("vol-0abc…"); nil: any name.
    public var diskPattern: (regex: String, words: String)?
    public var defaultBurst: Int
    public var defaultPerSecond: Double

    public static let local = ProviderKindSpec(
        name: "local", keys: [Key("pool", .absolutePath, required: true)], instanceKeys: [], disksOptionalWith: nil, diskPattern: nil,
        defaultBurst: 20, defaultPerSecond: 50)

    /// EC2: the region, a profile of the shared AWS files, an endpoint (moto, a VPC endpoint).
    public static let ec2 = ProviderKindSpec(
        name: "ec2",
        keys: [
            Key("region", .pattern("^[a-z]{2}(-[a-z]+)+-[0-9]+$", "an AWS region such as us-east-1")),
            Key("profile", .name),
            Key("endpoint_url", .url),
            Key("snapshot_timeout_s", .int(10...86_400)),
            Key("poll_ms", .int(10...60_000)),
        ],
        instanceKeys: [
            Key("ec2_instance", .pattern("^i-[0-9a-f]{8,17}$", "an EC2 instance id such as i-0abc12345def67890")),
            Key("exclude_boot_volume", .bool),
            Key("exclude_volumes", .list("^vol-[0-9a-f]{8,17}$", "EC2 volume ids such as vol-0abc12345def67890")),
        ],
        disksOptionalWith: "ec2_instance", diskPattern: ("^vol-[0-9a-f]{8,17}$", "EC2 volume ids such as vol-0abc12345def67890"),
        defaultBurst: 20, defaultPerSecond: 5)

    public static let builtIn: [ProviderKindSpec] = [.local, .ec2]

    public static func named(_ name: String) -> ProviderKindSpec? { self.builtIn.first { $0.name == name } }

    static func matches(_ text: String, _ regex: String) -> Bool { text.range(of: regex, options: .regularExpression) != nil }
}

/// A kind-specific value from a fleet file, with where it was written.
public struct FleetSetting: Sendable, Equatable {
    public enum Value: Sendable, Equatable {
        case string(String)
        case int(Int)
        case bool(Bool)
        case list([String])
    }

    public var value: Value
    public var line: Int
    public var column: Int

    public init(_ value: Value, line: Int = 0, column: Int = 0) {
        self.value = value
        self.line = line
        self.column = column
    }

    public var string: String? { if case .string(let text) = self.value { text } else { nil } }
    public var int: Int? { if case .int(let number) = self.value { number } else { nil } }
    public var bool: Bool? { if case .bool(let flag) = self.value { flag } else { nil } }
    public var list: [String]? { if case .list(let items) = self.value { items } else { nil } }

    /// The value as text, for the catalog's record of a provider.
    public var text: String {
        switch self.value {
        case .string(let text): text
        case .int(let number): "\(number)"
        case .bool(let flag): "\(flag)"
        case .list(let items): items.joined(separator: ",")
        }
    }
}
