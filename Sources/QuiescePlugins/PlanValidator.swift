import Foundation
import QuiesceCore
import QuiescePluginProto

/// Checks a plugin's answers before the engine uses them. A plan is data from
/// third-party code: nothing in it is trusted until every rule here holds.
public enum PlanValidator {
    public static let maxTimeoutMs: UInt32 = 3_600_000
    public static let maxRetries: UInt32 = 5

    /// Problems with a PluginInfo (empty when it is usable).
    public static func problems(in info: PluginInfo) -> [String] {
        var problems: [String] = []
        if !Self.isName(info.name, allowing: "-") { problems.append("name \"\(info.name)\" must be lower-case letters, digits and '-' (1–64 characters)") }
        if info.version.isEmpty { problems.append("version is empty") }
        if info.levels.isEmpty { problems.append("levels is empty (a plugin delivers at least one level)") }
        for level in info.levels where ConsistencyLevel(level) == nil { problems.append("levels lists unknown level \(level.rawValue)") }
        var seen: Set<String> = []
        for option in info.options {
            if !Self.isName(option.name, allowing: "_") { problems.append("option name \"\(option.name)\" must be lower-case letters, digits and '_'") }
            if !seen.insert(option.name).inserted { problems.append("option \(option.name) is declared twice") }
            let matches: Bool
            switch (option.type, option.defaultValue.value) {
            case (.bool, .boolValue?), (.int, .intValue?), (.durationMs, .intValue?), (.string, .stringValue?), (.stringList, .listValue?): matches = true
            default: matches = false
            }
            if case .UNRECOGNIZED(let raw) = option.type {
                problems.append("option \(option.name) has unknown type \(raw)")
            } else if option.type == .unspecified {
                problems.append("option \(option.name) has no type")
            } else if !matches {
                problems.append("option \(option.name): default \(option.defaultValue.text) does not match its type (\(option.typeName))")
            }
        }
        return problems
    }

    /// Problems with a plan for `policy` (empty when the engine may run it).
    public static func problems(in plan: Plan, policy: PlanPolicy) -> [String] {
        var problems: [String] = []
        guard let expected = ConsistencyLevel(plan.expected) else {
            return ["expected level \(plan.expected.rawValue) is not a level this engine knows"]
        }
        if let wanted = ConsistencyLevel(policy.wanted), expected > wanted {
            problems.append("expects \(expected.name), above the policy's wanted \(wanted.name)")
        }
        if plan.quiesceRetries > Self.maxRetries { problems.append("quiesce_retries is \(plan.quiesceRetries) (at most \(Self.maxRetries))") }

        let phases: [(String, [PlanStep])] = [("prepare", plan.prepare), ("quiesce", plan.quiesce), ("thaw", plan.thaw), ("cleanup", plan.cleanup)]
        var ids: Set<String> = []
        var freezes: [String] = [], holds: Set<String> = []
        for (phase, steps) in phases {
            for step in steps {
                let name = step.id.isEmpty ? "a \(phase) step" : "step \(step.id)"
                if step.id.isEmpty {
                    problems.append("\(name) has no id")
                } else if !Self.isName(step.id, allowing: "-_.") {
                    problems.append("\(name): id must be lower-case letters, digits, '-', '_' and '.'")
                } else if !ids.insert(step.id).inserted {
                    problems.append("\(name): id used twice")
                }
                if step.timeoutMs == 0 {
                    problems.append("\(name) has no timeout")
                } else if step.timeoutMs > Self.maxTimeoutMs {
                    problems.append("\(name): timeout \(step.timeoutMs) ms is above the limit of \(Self.maxTimeoutMs) ms")
                }
                guard let kind = ActionKind.of(step.action) else {
                    problems.append("\(name) has no action this engine knows (unset, or from a newer plugin ABI)")
                    continue
                }
                problems += kind.problems(step.action, phase, name)
                if !kind.phases.contains(phase) {
                    let allowed = ["prepare", "quiesce", "thaw", "cleanup"].filter(kind.phases.contains)
                    problems.append("\(name): \(kind.name) steps belong in the \(allowed.joined(separator: " or ")) phase, not \(phase)")
                }
                if kind.holdsWrites { freezes.append(step.id) }
                switch step.action.kind {
                case .hold(let hold)?:
                    if !holds.insert(hold.holdID).inserted { problems.append("\(name): hold \(hold.holdID) is started twice") }
                case .release(let release)?:
                    if !holds.contains(release.holdID) { problems.append("\(name) releases hold \(release.holdID), which no quiesce step starts") }
                default: break
                }
                if phase == "quiesce" || phase == "prepare" {
                    switch step.onFailure.outcome {
                    case nil: problems.append("\(name) does not say what its failure means (on_failure: downgrade_to or fail)")
                    case .downgradeTo(let level)?:
                        if ConsistencyLevel(level) == nil { problems.append("\(name) downgrades to unknown level \(level.rawValue)") }
                        else if level.rawValue > plan.expected.rawValue { problems.append("\(name) \"downgrades\" to \(level.name), above the plan's \(plan.expected.name)") }
                    case .fail?: break
                    }
                    if step.onFailure.outcome != nil && step.onFailure.reason.isEmpty { problems.append("\(name): on_failure has no reason code") }
                }
            }
        }
        if freezes.count > 1 {
            problems.append("the plan holds writes in \(freezes.count) steps (\(freezes.joined(separator: ", "))); at most one: list every mount or volume in one step")
        }
        let holdsWrites = plan.quiesce.contains { ActionKind.of($0.action)?.holdsWrites == true }
        if expected >= .filesystem && !holdsWrites {
            problems.append("expects \(expected.name) but no quiesce step freezes a filesystem or holds a volume's writes")
        } else if expected == .application {
            // Some quiesce step must be able to prove application (a script, a hold, VSS writers).
            let best = plan.quiesce.compactMap { ActionKind.of($0.action)?.proves($0.action) }.max() ?? .crash
            if best < .application {
                problems.append("expects application but no quiesce step can prove more than \(best.name) (a freeze script, a hold, or VSS with writers)")
            }
        }

        // Every quiesce step names its undo: a thaw-phase step with the matching
        // action, in reverse order of the quiesce steps.
        let thawIndex = Dictionary(plan.thaw.enumerated().map { ($1.id, $0) }, uniquingKeysWith: { first, _ in first })
        var lastUndoIndex = Int.max
        var undone: Set<String> = []
        for step in plan.quiesce {
            let name = step.id.isEmpty ? "a quiesce step" : "step \(step.id)"
            guard !step.undo.isEmpty else {
                problems.append("\(name) has no undo (every quiesce step names the thaw-phase step that undoes it)")
                continue
            }
            guard let index = thawIndex[step.undo] else {
                problems.append("\(name): its undo \(step.undo) is not a thaw-phase step")
                continue
            }
            if !undone.insert(step.undo).inserted { problems.append("\(name): \(step.undo) already undoes another step") }
            if index > lastUndoIndex { problems.append("\(name): its undo \(step.undo) must come before the undo of the steps before it (thaw in reverse order)") }
            lastUndoIndex = min(lastUndoIndex, index)
            let undo = plan.thaw[index]
            let kind = ActionKind.of(step.action), undoKind = ActionKind.of(undo.action)
            if let kind, let undoKind, !(kind.undoneBy.contains(undoKind.name) && kind.undoes(step.action, undo.action)) {
                problems.append("\(name) (\(step.actionKind)) cannot be undone by \(undo.id) (\(undo.actionKind))")
            }
        }
        for step in plan.prepare + plan.thaw + plan.cleanup where !step.undo.isEmpty {
            problems.append("step \(step.id): only quiesce steps have an undo")
        }

        // Writes may be blocked for at most the freeze budget.
        let budget = policy.freezeBudgetMs == 0 ? 10_000 : policy.freezeBudgetMs
        let blocking = (plan.quiesce + plan.thaw).filter(\.blocking)
        let total = blocking.reduce(UInt64(0)) { $0 + UInt64($1.timeoutMs) }
        if total > budget {
            let parts = blocking.map { "\($0.id) \($0.timeoutMs)" }.joined(separator: " + ")
            problems.append("its blocking steps may take \(total) ms (\(parts)), more than the freeze budget of \(budget) ms")
        }
        for step in plan.prepare + plan.cleanup where step.blocking {
            problems.append("step \(step.id): \(step.id) is in a phase that must not block writes")
        }
        return problems
    }

    static func problems(in hook: Quiesce_Plugin_V1_HookRef, step: String) -> [String] {
        var problems: [String] = []
        switch hook.hook {
        case nil: problems.append("\(step) names no hook")
        case .seed(let seed)?:
            if seed.which != "prescript" && seed.which != "postscript" { problems.append("\(step): seed script \"\(seed.which)\" is not prescript or postscript") }
        case .name(let name)?:
            if name.isEmpty || name.contains("/") || name.hasPrefix(".") || name.utf8.count > 255 {
                problems.append("\(step): hook name \"\(name)\" must be a file name in the agent's hook directory")
            }
        }
        let hex = hook.sha256.lowercased()
        if hex.count != 64 || !hex.allSatisfy({ $0.isHexDigit }) {
            problems.append("\(step) does not pin its hook's SHA-256 (found \"\(hook.sha256)\", expected 64 hex digits)")
        }
        return problems
    }

    static func isName(_ text: String, allowing extra: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 64
            && text.unicodeScalars.allSatisfy { ("a"..."z").contains($0) || ("0"..."9").contains($0) || extra.unicodeScalars.contains($0) }
    }
}
