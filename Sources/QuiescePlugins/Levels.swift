import QuiesceCore
import QuiescePluginProto

public typealias PluginInfo = Quiesce_Plugin_V1_PluginInfo
public typealias PlanRequest = Quiesce_Plugin_V1_PlanRequest
public typealias Plan = Quiesce_Plugin_V1_Plan
public typealias PlanStep = Quiesce_Plugin_V1_Step
public typealias PlanPolicy = Quiesce_Plugin_V1_Policy
public typealias InstanceFacts = Quiesce_Plugin_V1_InstanceFacts
public typealias OptionValue = Quiesce_Plugin_V1_OptionValue
public typealias OptionSpec = Quiesce_Plugin_V1_OptionSpec

// The plugin contract defines the levels (proto/quiesce/plugin/v1/plugin.proto);
// ConsistencyLevel is the same scale in Swift, with the same numbers.
extension ConsistencyLevel {
    public init?(_ level: Quiesce_Plugin_V1_Level) {
        self.init(rawValue: level.rawValue)
    }
    public var planLevel: Quiesce_Plugin_V1_Level {
        Quiesce_Plugin_V1_Level(rawValue: self.rawValue) ?? .crash
    }
}

extension Quiesce_Plugin_V1_Level {
    /// "crash", "filesystem", "application", or "unknown(7)" for a level this engine does not know.
    public var name: String { ConsistencyLevel(self)?.name ?? "unknown(\(self.rawValue))" }
}

extension PlanStep {
    /// "run-hook prescript", "freeze /data, /", "thaw", "hold db (hook db-hold)", "release db" (see ActionKind.summary).
    public var actionSummary: String { ActionKind.of(self.action)?.summary(self.action) ?? "unknown action" }

    /// The action's kind as one word.
    public var actionKind: String { ActionKind.of(self.action)?.name ?? "unknown" }

    /// "downgrade to filesystem (prescript-failed)", "fail (freeze-failed)", or "".
    public var failureSummary: String {
        switch self.onFailure.outcome {
        case .downgradeTo(let level)?: "downgrade to \(level.name) (\(self.onFailure.reason))"
        case .fail?: "fail (\(self.onFailure.reason))"
        case nil: ""
        }
    }
}

extension Quiesce_Plugin_V1_HookRef {
    /// "prescript", "hook db-hold", with the first 12 hex digits of the pinned hash.
    public var label: String {
        let name: String
        switch self.hook {
        case .seed(let seed)?: name = seed.which
        case .name(let hook)?: name = "hook \(hook)"
        case nil: name = "unnamed hook"
        }
        return self.sha256.isEmpty ? name : "\(name) sha256:\(self.sha256.prefix(12))"
    }
}
