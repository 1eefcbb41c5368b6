import CQuiescePlugin
import QuiescePluginKit

/// `mariadb`: MariaDB 10.4+ / MySQL 8 held still by a *hold* whose lifetime
/// spans the filesystem freeze.
///
///     quiesce:  hold mariadb (hook "mariadb-hold", pinned)   undo: release
///               freeze the eligible mounts                    undo: thaw
///     thaw:     thaw, release                                 application-consistent
///
/// The hook (examples/mariadb/hold, installed in the agent's hook directory)
/// takes `BACKUP STAGE … BLOCK_COMMIT` (MariaDB; reads and writes that do not
/// commit go on) or `FLUSH TABLES WITH READ LOCK` in one client session, prints
/// the binary-log position, GTID and an optional marker as `quiesce-meta`
/// lines under the lock, then its ready line; the release ends the lock through
/// the same session. The engine records the `quiesce-meta` lines with the
/// snapshot group (catalog and tags). A lock it cannot get within
/// `lock_wait_ms` (a long query in the way) downgrades to filesystem with
/// reason `mariadb-lock-timeout`, naming the query. Credentials never appear in
/// the fleet file or the plan: `defaults_file` names a client option file on
/// the instance (root-only), read by the hook.
enum MariaDBPlugin: QuiescePlugin {
    static var info: PluginInfo {
        .with {
            $0.name = "mariadb"
            $0.version = "1.0.0"
            $0.description_p = "MariaDB 10.4+ / MySQL 8: a lock held across the filesystem freeze (BACKUP STAGE BLOCK_COMMIT or FTWRL), binlog position and GTID recorded with the snapshot."
            $0.platforms = ["linux"]
            $0.levels = [.crash, .filesystem, .application]
            $0.author = "Quiesce"
            $0.options = [
                .string("mode", "backup-stage", allowed: ["backup-stage", "ftwrl"],
                        "backup-stage: MariaDB's BACKUP STAGE up to BLOCK_COMMIT (reads and non-committing writes go on); ftwrl: FLUSH TABLES WITH READ LOCK (MySQL 8 too)."),
                .string("hook", "mariadb-hold", "The hold hook in the agent's hook directory (examples/mariadb/hold)."),
                .string("defaults_file", "/root/.quiesce-mariadb.cnf", "A client option file on the instance with user and password (mode 0600); the hook reads it, the engine never sees it."),
                .string("socket", "", "The server's unix socket (empty: the defaults file's or the client's default)."),
                .milliseconds("lock_wait_ms", 2000, in: 50...60_000, "How long to wait for the lock; a long query in the way then downgrades to filesystem (mariadb-lock-timeout) instead of stalling the application."),
                .string("marker_query", "", "A query run under the lock whose one value is recorded with the snapshot (e.g. SELECT MAX(id) FROM app.orders)."),
                .milliseconds("freeze_timeout_ms", 2000, in: 100...60_000, "How long flushing and freezing every mount may take."),
                .milliseconds("thaw_timeout_ms", 2000, in: 100...60_000, "How long the thaw and the release may each take."),
                .list("only_mounts", [], "Freeze only these mount points (empty: every eligible mount)."),
                .list("skip_mounts", [], "Mount points never to freeze."),
            ]
        }
    }

    static func plan(_ request: PlanRequest) throws -> Plan {
        let facts = request.facts, policy = request.policy
        let options = Options(policy)
        guard facts.osFamily == "linux" else {
            throw PluginRefusal("mariadb plans Linux instances; \(facts.instanceID) reports os_family \"\(facts.osFamily)\"")
        }
        var plan = Plan(plugin: "mariadb", policy: policy)
        guard policy.wanted != .crash else { return plan }

        let only = Set(try options.list("only_mounts")), skip = Set(try options.list("skip_mounts"))
        let eligible = facts.mounts
            .filter { $0.freezable && (only.isEmpty || only.contains($0.mountPoint)) && !skip.contains($0.mountPoint) }
            .map(\.mountPoint)
        if let blocker = facts.freezeBlocker(only: only) {
            plan.lower(to: .crash, blocker)
        } else if eligible.isEmpty {
            plan.lower(to: .crash, "no-eligible-filesystem: no ext3, ext4 or XFS mount to freeze")
        }
        guard plan.expected != .crash else { return plan }

        var hook: HookFact?
        if policy.wanted == .application {
            let name = try options.string("hook")
            if !facts.capabilities.isEmpty && !facts.capabilities.contains("holds") {
                plan.lower(to: .filesystem, "agent-cannot-hold: the agent does not offer holds (it offers \(facts.capabilities.joined(separator: ", ")))")
            } else if let found = facts.hooks.first(where: { $0.name == name }) {
                if let problem = found.problem { plan.lower(to: .filesystem, problem) } else { hook = found }
            } else {
                plan.lower(to: .filesystem, "hook-not-offered: the agent's hook directory has no \(name) (install examples/mariadb/hold there, root:root, mode 0700)")
            }
        }

        let minimum = policy.minimum
        let thawTimeout = UInt32(try options.int("thaw_timeout_ms"))
        if let hook {
            let lockWait = try options.int("lock_wait_ms")
            // The hook's own limit on its life: the lock wait, the freeze budget and slack, so a hook
            // whose agent vanished lets go by itself (the agent's max_hold_ms ends it first).
            let budget = Int64(policy.freezeBudgetMs == 0 ? 10_000 : policy.freezeBudgetMs)
            var args = ["--mode", try options.string("mode"), "--defaults-file", try options.string("defaults_file"),
                        "--lock-wait-ms", "\(lockWait)", "--max-hold-ms", "\(lockWait + budget + 5000)"]
            let socket = try options.string("socket"), marker = try options.string("marker_query")
            if !socket.isEmpty { args += ["--socket", socket] }
            if !marker.isEmpty { args += ["--marker-query", marker] }
            // Ready within the lock wait plus a client start; the hook gives up on the lock by itself first.
            plan.quiesce.append(.make(
                "hold-mariadb", "lock MariaDB (\(try options.string("mode"))) until released",
                .hold(.with {
                    $0.holdID = "mariadb"
                    $0.hook = .pinned(hook)
                    $0.args = args
                    $0.readyLine = "READY"
                }),
                timeoutMs: UInt32(lockWait + 2000), undo: "release-mariadb",
                onFailure: .downgrade(to: .filesystem, "mariadb-lock-failed", minimum: minimum), blocking: true))
        }
        plan.quiesce.append(.make(
            "freeze", "flush and freeze \(eligible.joined(separator: ", "))",
            .freeze(.with { $0.mountPoints = eligible }),
            timeoutMs: UInt32(try options.int("freeze_timeout_ms")), undo: "thaw",
            onFailure: .downgrade(to: .crash, "freeze-failed", minimum: minimum), blocking: true))
        plan.thaw.append(.make("thaw", "thaw \(eligible.reversed().joined(separator: ", "))", .thaw(.init()),
                               timeoutMs: thawTimeout, blocking: true))
        if hook != nil {
            plan.thaw.append(.make("release-mariadb", "release the MariaDB lock", .release(.with { $0.holdID = "mariadb" }),
                                   timeoutMs: thawTimeout, blocking: true))
        }
        return plan
    }
}

private let table = PluginExport.table(
    describe: { PluginExport.describe(MariaDBPlugin.self, into: $0) },
    plan: { PluginExport.plan(MariaDBPlugin.self, $0, $1, into: $2) })

@_cdecl("quiesce_plugin_entry")
public func quiescePluginEntry() -> UnsafePointer<quiesce_plugin> { table.pointer }
