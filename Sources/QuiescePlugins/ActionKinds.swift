import QuiesceCore
import QuiescePluginProto

public typealias PlanAction = Quiesce_Plugin_V1_Action

/// Everything the engine knows about one kind of plan action, in one place:
/// where it may stand, what it blocks, what undoes it, the level it can prove
/// and how the thaw reply proves it (as text and as the check itself). The
/// validator, the plan's display and the runner's proof all read this table; a
/// new platform's action is one entry here, one case in the plugin contract,
/// and its performer in the engine's table (PlanRunner.performers).
public struct ActionKind: Sendable {
    /// The kind's word ("freeze", "vss-freeze").
    public let name: String
    /// The phases a step of this kind may stand in.
    public let phases: Set<String>
    /// What it blocks while in place (for `quiesce plan` and the docs).
    public let blocks: String
    /// Whether it holds filesystem writes across the snapshot: at most one such step per plan,
    /// and a plan above crash needs one.
    public let holdsWrites: Bool
    /// The kinds that may undo it (a quiesce step names a thaw-phase step of one of these).
    public let undoneBy: Set<String>
    /// The highest level this step can prove when every check of the thaw reply passes
    /// (nil: it proves nothing by itself — a thaw, a release).
    public let proves: @Sendable (PlanAction) -> ConsistencyLevel?
    /// How the thaw reply proves that level (shown by `quiesce plan`, and the docs).
    public let proof: String
    /// The check itself: what the run's evidence says against this step's level, most serious
    /// first (none: proven). Called for each quiesce step that succeeded in the run's last attempt.
    public let verdict: @Sendable (PlanAction, ThawEvidence) -> [ProofFinding]
    /// "freeze /data, /", "vss-freeze C:\, D:\ (writers, copy)".
    public let summary: @Sendable (PlanAction) -> String
    /// Problems with one step's action in `phase` (empty when valid).
    public let problems: @Sendable (PlanAction, _ phase: String, _ step: String) -> [String]
    /// Whether `undo` (a thaw-phase action of a kind in `undoneBy`) undoes `action` (e.g. the same hold id).
    public let undoes: @Sendable (_ action: PlanAction, _ undo: PlanAction) -> Bool

    /// The kind of `action`, nil for an action this engine does not know.
    public static func of(_ action: PlanAction) -> ActionKind? {
        switch action.kind {
        case .runHook?: .runHook
        case .freeze?: .freeze
        case .thaw?: .thaw
        case .hold?: .hold
        case .release?: .release
        case .vssFreeze?: .vssFreeze
        case .vssThaw?: .vssThaw
        case nil: nil
        }
    }

    /// Every kind, in the contract's order.
    public static let all: [ActionKind] = [.runHook, .freeze, .thaw, .hold, .release, .vssFreeze, .vssThaw]

    // MARK: - The table

    public static let runHook = ActionKind(
        name: "run-hook", phases: ["prepare", "quiesce", "thaw", "cleanup"],
        blocks: "the application, from the quiesce phase on (the seed's freeze script)", holdsWrites: false, undoneBy: ["run-hook"],
        proves: { _ in .application },
        proof: "the hook exited 0 before the freeze, and the freeze's own proof holds",
        verdict: { _, _ in [] },
        summary: { action in
            guard case .runHook(let hook)? = action.kind else { return "run-hook" }
            return "run-hook \(hook.hook.label)" + (hook.args.isEmpty ? "" : " " + hook.args.joined(separator: " "))
        },
        problems: { action, _, step in
            guard case .runHook(let hook)? = action.kind else { return [] }
            return PlanValidator.problems(in: hook.hook, step: step)
        },
        undoes: { _, _ in true })

    public static let freeze = ActionKind(
        name: "freeze", phases: ["quiesce"], blocks: "every write to the listed filesystems (FIFREEZE)", holdsWrites: true, undoneBy: ["thaw"],
        proves: { _ in .filesystem },
        proof: "the thaw reply names this freeze, was caused by the engine's thaw command, and came within the budget",
        verdict: { _, evidence in Proof.freeze(evidence) },
        summary: { action in
            guard case .freeze(let freeze)? = action.kind else { return "freeze" }
            return "freeze \(freeze.mountPoints.joined(separator: ", "))" + (freeze.skipSyncfs ? " (no syncfs)" : "")
        },
        problems: { action, _, step in
            guard case .freeze(let freeze)? = action.kind else { return [] }
            var problems: [String] = []
            if freeze.mountPoints.isEmpty { problems.append("\(step) freezes no mount point") }
            for mount in freeze.mountPoints where !mount.hasPrefix("/") { problems.append("\(step): mount point \"\(mount)\" is not an absolute path") }
            if Set(freeze.mountPoints).count != freeze.mountPoints.count { problems.append("\(step) names a mount point twice") }
            return problems
        },
        undoes: { _, _ in true })

    public static let thaw = ActionKind(
        name: "thaw", phases: ["thaw"], blocks: "nothing (it ends the freeze)", holdsWrites: false, undoneBy: [],
        proves: { _ in nil }, proof: "its reply is the freeze's proof", verdict: { _, _ in [] },
        summary: { _ in "thaw" }, problems: { _, _, _ in [] }, undoes: { _, _ in false })

    public static let hold = ActionKind(
        name: "hold", phases: ["quiesce"], blocks: "the application, from its ready line until the release (e.g. FLUSH TABLES WITH READ LOCK)",
        holdsWrites: false, undoneBy: ["release"],
        proves: { _ in .application },
        proof: "the hold was alive at the thaw, and its hook exited 0 when released",
        verdict: { action, evidence in
            guard case .hold(let hold)? = action.kind else { return [] }
            return Proof.hold(hold.holdID, evidence)
        },
        summary: { action in
            guard case .hold(let hold)? = action.kind else { return "hold" }
            return "hold \(hold.holdID) (\(hold.hook.label), ready on \"\(hold.readyLine)\")"
        },
        problems: { action, _, step in
            guard case .hold(let hold)? = action.kind else { return [] }
            var problems = PlanValidator.problems(in: hold.hook, step: step)
            if hold.holdID.isEmpty || !PlanValidator.isName(hold.holdID, allowing: "-_.") { problems.append("\(step): hold_id \"\(hold.holdID)\" must be a short name") }
            if hold.readyLine.isEmpty { problems.append("\(step): a hold needs a ready_line") }
            return problems
        },
        undoes: { action, undo in
            guard case .hold(let hold)? = action.kind, case .release(let release)? = undo.kind else { return false }
            return hold.holdID == release.holdID
        })

    public static let release = ActionKind(
        name: "release", phases: ["thaw", "cleanup"], blocks: "nothing (it ends a hold)", holdsWrites: false, undoneBy: [],
        proves: { _ in nil }, proof: "its hook's exit status says whether the hold's lock held to the end", verdict: { _, _ in [] },
        summary: { action in
            guard case .release(let release)? = action.kind else { return "release" }
            return "release \(release.holdID)"
        },
        problems: { _, _, _ in [] }, undoes: { _, _ in false })

    public static let vssFreeze = ActionKind(
        name: "vss-freeze", phases: ["quiesce"],
        blocks: "the writers' applications from their freeze, and every write to the listed volumes (VSS's flush and hold, at most 10 s)",
        holdsWrites: true, undoneBy: ["vss-thaw"],
        proves: { action in
            guard case .vssFreeze(let vss)? = action.kind else { return nil }
            return vss.includeWriters ? .application : .filesystem
        },
        proof: "the thaw reply names this freeze and its snapshot set, writes were held until the engine's thaw command within the hold limit, "
            + "and (for application) every writer in the set was STABLE after BackupComplete",
        verdict: { _, evidence in Proof.vss(evidence) },
        summary: { action in
            guard case .vssFreeze(let vss)? = action.kind else { return "vss-freeze" }
            var parts: [String] = [vss.includeWriters ? "writers" : "no writers", vss.backupType.isEmpty ? "copy" : vss.backupType]
            if !vss.includeWritersNamed.isEmpty { parts.append("only " + vss.includeWritersNamed.joined(separator: ", ")) }
            if !vss.excludeWritersNamed.isEmpty { parts.append("not " + vss.excludeWritersNamed.joined(separator: ", ")) }
            parts.append("hold ≤ \(vss.holdLimitMs == 0 ? VssErrors.holdLimitMs : vss.holdLimitMs) ms")
            return "vss-freeze \(vss.volumes.joined(separator: ", ")) (\(parts.joined(separator: ", ")))"
        },
        problems: { action, _, step in
            guard case .vssFreeze(let vss)? = action.kind else { return [] }
            var problems: [String] = []
            if vss.volumes.isEmpty { problems.append("\(step) adds no volume to the snapshot set") }
            if Set(vss.volumes).count != vss.volumes.count { problems.append("\(step) names a volume twice") }
            for volume in vss.volumes where volume.isEmpty || volume.utf8.count > 260 { problems.append("\(step): volume \"\(volume)\" is not a volume name") }
            if !["", "copy", "full"].contains(vss.backupType) { problems.append("\(step): backup_type \"\(vss.backupType)\" is not copy or full") }
            if vss.holdLimitMs > VssErrors.holdLimitMs { problems.append("\(step): hold_limit_ms \(vss.holdLimitMs) is above VSS's limit of \(VssErrors.holdLimitMs) ms") }
            if !vss.includeWriters && !(vss.includeWritersNamed.isEmpty && vss.excludeWritersNamed.isEmpty) {
                problems.append("\(step) names writers but leaves writers out (include_writers is false)")
            }
            for name in vss.retryOn where VssErrors.code(of: name) == nil { problems.append("\(step): retry_on names \"\(name)\", not a VSS error this engine knows") }
            return problems
        },
        undoes: { _, _ in true })

    public static let vssThaw = ActionKind(
        name: "vss-thaw", phases: ["thaw"], blocks: "nothing (it releases the hold, then the writers thaw and BackupComplete runs)",
        holdsWrites: false, undoneBy: [],
        proves: { _ in nil }, proof: "its reply is the vss-freeze's proof", verdict: { _, _ in [] },
        summary: { _ in "vss-thaw (release the hold, writers thaw, BackupComplete)" }, problems: { _, _, _ in [] }, undoes: { _, _ in false })
}
