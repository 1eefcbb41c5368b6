import CQuiescePlugin
import QuiescePluginKit

/// `linux-freeze`: the seed's Linux behaviour.
///
///     prescript → freeze eligible mounts → [snapshot] → thaw → postscript   application-consistent
///     (scripts missing or not root-only)  freeze → [snapshot] → thaw        filesystem-consistent
///     (freeze off, no guard, nothing eligible)  no guest action              crash-consistent
///
/// Every level below the policy's wanted one comes with its reasons.
enum LinuxFreezePlugin: QuiescePlugin {
    static var info: PluginInfo {
        .with {
            $0.name = "linux-freeze"
            $0.version = "1.0.0"
            $0.description_p = "Linux: the freeze script, FIFREEZE of every eligible mount (ext3, ext4, XFS), the thaw script."
            $0.platforms = ["linux"]
            $0.levels = [.crash, .filesystem, .application]
            $0.author = "Quiesce"
            $0.options = [
                .bool("application_consistent", true, "Run the freeze and thaw scripts around the filesystem freeze (the seed's application-consistency switch)."),
                .bool("fs_freeze", true, "Freeze and thaw the filesystems (the seed's \"filesystem IO freeze and thaw\"); off means crash-consistent."),
                .string("prescript_path", "/tmp/prescript.sh", "The freeze script. The agent must offer it: quiesce-agent --prescript (the engine never names a path to run)."),
                .string("postscript_path", "/tmp/postscript.sh", "The thaw script, offered by quiesce-agent --postscript."),
                .milliseconds("prescript_timeout_ms", 2000, in: 100...600_000, "How long the freeze script may run; it counts against the freeze budget."),
                .milliseconds("postscript_timeout_ms", 2000, in: 100...600_000, "How long the thaw script may run; it counts against the freeze budget."),
                .milliseconds("freeze_timeout_ms", 2000, in: 100...60_000, "How long flushing and freezing every mount may take."),
                .milliseconds("thaw_timeout_ms", 2000, in: 100...60_000, "How long the thaw may take."),
                .list("only_mounts", [], "Freeze only these mount points (empty: every eligible mount)."),
                .list("skip_mounts", [], "Mount points never to freeze; an ineligible filesystem listed here does not lower the level."),
                .int("retries", 0, in: 0...5, "Attempts of the whole quiesce phase after a failure (e.g. another freezer holds a mount), each after undoing what started."),
                .bool("skip_syncfs", false, "Never syncfs before freezing (the agent's default flushes first only when 16 MiB or more is dirty; see README, syncfs before FIFREEZE)."),
            ]
        }
    }

    static func plan(_ request: PlanRequest) throws -> Plan {
        let facts = request.facts, policy = request.policy
        let options = Options(policy)
        guard facts.osFamily == "linux" else {
            throw PluginRefusal("linux-freeze plans Linux instances; \(facts.instanceID) reports os_family \"\(facts.osFamily)\"")
        }
        var plan = Plan(plugin: "linux-freeze", policy: policy)
        plan.quiesceRetries = UInt32(try options.int("retries"))
        guard policy.wanted != .crash else { return plan }

        // Filesystems.
        let only = Set(try options.list("only_mounts")), skip = Set(try options.list("skip_mounts"))
        var eligible: [String] = []
        var ineligible: [String] = []
        for mount in facts.mounts where (only.isEmpty || only.contains(mount.mountPoint)) && !skip.contains(mount.mountPoint) {
            if mount.freezable {
                eligible.append(mount.mountPoint)
            } else if mount.notFreezableReason.hasPrefix("fs-not-eligible:") && (mount.device.hasPrefix("/dev/") || only.contains(mount.mountPoint)) {
                // A disk-backed filesystem nobody can freeze: its disk is only crash-consistent.
                ineligible.append("\(mount.mountPoint) is \(mount.fsType)")
            }
            // read-only and second mounts of a frozen filesystem need no freeze of their own.
        }
        if !(try options.bool("fs_freeze")) {
            plan.lower(to: .crash, "fs-freeze-off: policy \(policy.name) turns the filesystem freeze off")
        } else if let blocker = facts.freezeBlocker(only: only) {
            plan.lower(to: .crash, blocker)
        } else if eligible.isEmpty {
            let detail = ineligible.isEmpty ? "no ext3, ext4 or XFS mount to freeze" : ineligible.joined(separator: ", ") + " (eligible: ext3, ext4, XFS)"
            plan.lower(to: .crash, "no-eligible-filesystem: \(detail)")
        } else if !ineligible.isEmpty {
            plan.lower(to: .crash, "fs-not-eligible: \(ineligible.joined(separator: ", ")) (eligible: ext3, ext4, XFS; list it in skip_mounts to leave it out)")
        }
        guard plan.expected != .crash else { return plan }

        // Scripts.
        var scripts: (pre: HookFact, post: HookFact)?
        if policy.wanted == .application {
            if !(try options.bool("application_consistent")) {
                plan.lower(to: .filesystem, "application-consistency-off: policy \(policy.name) turns the scripts off")
            } else {
                let prePath = try options.string("prescript_path"), postPath = try options.string("postscript_path")
                let pre = facts.hooks.first { $0.path == prePath }, post = facts.hooks.first { $0.path == postPath }
                var problems: [String] = []
                if pre == nil { problems.append("prescript-not-offered: the agent offers no hook at \(prePath) (quiesce-agent --prescript)") }
                if post == nil { problems.append("postscript-not-offered: the agent offers no hook at \(postPath) (quiesce-agent --postscript)") }
                if let problem = pre?.problem { problems.append(problem) }
                if let problem = post?.problem { problems.append(problem) }
                if let pre, let post, problems.isEmpty {
                    scripts = (pre, post)
                } else {
                    for problem in problems { plan.lower(to: .filesystem, problem) }
                }
            }
        }

        let minimum = policy.minimum
        let skipSyncfs = try options.bool("skip_syncfs")
        if let scripts {
            plan.quiesce.append(.make(
                "prescript", "run the freeze script \(scripts.pre.path)",
                .runHook(.with { $0.hook = .pinned(scripts.pre) }),
                timeoutMs: UInt32(try options.int("prescript_timeout_ms")), undo: "postscript",
                onFailure: .downgrade(to: .filesystem, "prescript-failed", minimum: minimum), blocking: true))
        }
        plan.quiesce.append(.make(
            "freeze", "flush and freeze \(eligible.joined(separator: ", "))",
            .freeze(.with { $0.mountPoints = eligible; $0.skipSyncfs = skipSyncfs }),
            timeoutMs: UInt32(try options.int("freeze_timeout_ms")), undo: "thaw",
            onFailure: .downgrade(to: .crash, "freeze-failed", minimum: minimum), blocking: true))
        plan.thaw.append(.make("thaw", "thaw \(eligible.reversed().joined(separator: ", "))", .thaw(.init()),
                               timeoutMs: UInt32(try options.int("thaw_timeout_ms")), blocking: true))
        if let scripts {
            plan.thaw.append(.make(
                "postscript", "run the thaw script \(scripts.post.path)", .runHook(.with { $0.hook = .pinned(scripts.post) }),
                timeoutMs: UInt32(try options.int("postscript_timeout_ms")), blocking: true))
        }
        return plan
    }
}

private let table = PluginExport.table(
    describe: { PluginExport.describe(LinuxFreezePlugin.self, into: $0) },
    plan: { PluginExport.plan(LinuxFreezePlugin.self, $0, $1, into: $2) })

@_cdecl("quiesce_plugin_entry")
public func quiescePluginEntry() -> UnsafePointer<quiesce_plugin> { table.pointer }
