import QuiescePluginProto

// Small builders so a plan reads like the steps it describes.

extension OptionSpec {
    public static func bool(_ name: String, _ value: Bool, _ description: String) -> Self {
        .make(name, .bool, description) { $0.boolValue = value }
    }
    public static func int(_ name: String, _ value: Int64, in range: ClosedRange<Int64>? = nil, _ description: String) -> Self {
        var spec = Self.make(name, .int, description) { $0.intValue = value }
        if let range { spec.minimum = range.lowerBound; spec.maximum = range.upperBound }
        return spec
    }
    public static func milliseconds(_ name: String, _ value: Int64, in range: ClosedRange<Int64>, _ description: String) -> Self {
        var spec = Self.make(name, .durationMs, description) { $0.intValue = value }
        spec.minimum = range.lowerBound
        spec.maximum = range.upperBound
        return spec
    }
    public static func string(_ name: String, _ value: String, allowed: [String] = [], _ description: String) -> Self {
        var spec = Self.make(name, .string, description) { $0.stringValue = value }
        spec.allowed = allowed
        return spec
    }
    public static func list(_ name: String, _ value: [String], _ description: String) -> Self {
        .make(name, .stringList, description) { $0.listValue = .with { $0.values = value } }
    }
    private static func make(_ name: String, _ type: Quiesce_Plugin_V1_OptionType, _ description: String, _ value: (inout OptionValue) -> Void) -> Self {
        .with {
            $0.name = name
            $0.type = type
            $0.description_p = description
            var option = OptionValue()
            value(&option)
            $0.defaultValue = option
        }
    }
}

/// Reads the policy's options. The engine fills in every declared option's
/// default before calling `plan`, so a missing option is a bug: it throws.
public struct Options {
    let values: [String: OptionValue]
    public init(_ policy: Quiesce_Plugin_V1_Policy) { self.values = policy.options }

    public func bool(_ name: String) throws -> Bool {
        guard case .boolValue(let v)? = try self.value(name).value else { throw self.wrongType(name, "bool") }
        return v
    }
    public func int(_ name: String) throws -> Int64 {
        guard case .intValue(let v)? = try self.value(name).value else { throw self.wrongType(name, "integer") }
        return v
    }
    public func string(_ name: String) throws -> String {
        guard case .stringValue(let v)? = try self.value(name).value else { throw self.wrongType(name, "string") }
        return v
    }
    public func list(_ name: String) throws -> [String] {
        guard case .listValue(let v)? = try self.value(name).value else { throw self.wrongType(name, "list of strings") }
        return v.values
    }
    private func value(_ name: String) throws -> OptionValue {
        guard let value = self.values[name] else { throw PluginRefusal("option \(name) is missing from the policy (the engine fills in defaults)") }
        return value
    }
    private func wrongType(_ name: String, _ expected: String) -> PluginRefusal {
        PluginRefusal("option \(name): expected a \(expected), found \(String(describing: self.values[name]?.value))")
    }
}

extension Quiesce_Plugin_V1_HookRef {
    /// A seed script ("prescript"/"postscript") or a hook-directory file, pinned by hash.
    public static func pinned(_ hook: Quiesce_Plugin_V1_HookFact) -> Self {
        .with {
            if hook.name == "prescript" || hook.name == "postscript" {
                $0.seed = .with { $0.which = hook.name }
            } else {
                $0.name = hook.name
            }
            $0.sha256 = hook.sha256
        }
    }
}

extension Quiesce_Plugin_V1_OnFailure {
    public static func downgrade(to level: PlanLevel, _ reason: String) -> Self {
        .with { $0.downgradeTo = level; $0.reason = reason }
    }
    public static func fail(_ reason: String) -> Self {
        .with { $0.fail = true; $0.reason = reason }
    }
    /// Downgrade to `level`, or fail when that is below the policy's minimum.
    public static func downgrade(to level: PlanLevel, _ reason: String, minimum: PlanLevel) -> Self {
        level.rawValue < minimum.rawValue ? .fail(reason) : .downgrade(to: level, reason)
    }
}

extension PlanStep {
    public static func make(
        _ id: String, _ description: String, _ action: Quiesce_Plugin_V1_Action.OneOf_Kind, timeoutMs: UInt32,
        undo: String = "", onFailure: Quiesce_Plugin_V1_OnFailure? = nil, blocking: Bool = false
    ) -> Self {
        .with {
            $0.id = id
            $0.description_p = description
            $0.action = .with { $0.kind = action }
            $0.timeoutMs = timeoutMs
            $0.undo = undo
            if let onFailure { $0.onFailure = onFailure }
            $0.blocking = blocking
        }
    }
}

extension Quiesce_Plugin_V1_HookFact {
    /// Why this hook cannot be used, as "code: detail", or nil when it can. The code
    /// starts with the seed script's name ("prescript-wrong-mode") or "hook-".
    public var problem: String? {
        let code = self.name == "prescript" || self.name == "postscript" ? self.name : "hook"
        let what = code == "hook" ? "hook \(self.name) (\(self.path))" : self.path
        switch self.refusal {
        case "": return self.sha256.isEmpty ? "\(code)-unhashed: the agent reported no SHA-256 for \(what)" : nil
        case "missing": return "\(code)-missing: \(what) does not exist"
        case "not-regular": return "\(code)-not-regular: \(what) is not a regular file"
        case "wrong-owner": return "\(code)-wrong-owner: \(what) is owned by uid \(self.ownerUid), needs root (0)"
        case "wrong-mode":
            return "\(code)-wrong-mode: \(what) has mode 0\(String(self.mode & 0o7777, radix: 8)), needs 0700 or stricter (no group or other bits)"
        default: return "\(code)-\(self.refusal): \(what)"
        }
    }
}

extension Quiesce_Plugin_V1_InstanceFacts {
    /// Why nothing can be frozen on this instance whatever its mounts — the thaw guard
    /// is not running, the agent does not offer fsfreeze, or `only` names a mount the
    /// instance does not have — as "code: detail" (the plan is then crash-consistent),
    /// or nil.
    public func freezeBlocker(only: Set<String> = []) -> String? {
        if !self.guardReady {
            return "guard-missing: the agent's thaw guard is not running, and nothing is frozen without it"
        }
        if !self.capabilities.isEmpty && !self.capabilities.contains("fsfreeze") {
            return "agent-cannot-freeze: the agent does not offer fsfreeze (it offers \(self.capabilities.joined(separator: ", ")))"
        }
        let missing = only.subtracting(self.mounts.map(\.mountPoint))
        if !missing.isEmpty {
            return "mount-not-found: only_mounts names \(missing.sorted().joined(separator: ", ")), which the instance does not have"
        }
        return nil
    }
}

extension Plan {
    /// A plan by `plugin` that expects what the policy wants, until ``lower(to:_:)`` says otherwise.
    public init(plugin: String, policy: Quiesce_Plugin_V1_Policy) {
        self.init()
        self.plugin = plugin
        self.expected = policy.wanted
    }

    /// Records why the plan reaches less than the policy wants, and lowers its expected level
    /// to `level` (never raises it).
    public mutating func lower(to level: PlanLevel, _ reason: String) {
        if level.rawValue < self.expected.rawValue { self.expected = level }
        self.reasons.append(reason)
    }
}
