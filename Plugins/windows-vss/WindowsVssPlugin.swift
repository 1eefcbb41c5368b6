import CQuiescePlugin
import QuiescePluginKit

/// `windows-vss`: the seed's Windows behaviour, driving the agent's VSS requester.
///
///     vss-freeze (writers on: freeze, flush and hold ≤ 10 s) → [snapshot] → vss-thaw   application-consistent
///     vss-freeze (writers off, or no writer takes part)     → [snapshot] → vss-thaw   filesystem-consistent
///     (no VSS capability, service stopped, no NTFS/ReFS volume, no hold guard)  no guest action   crash-consistent
///
/// At run time the engine proves the level from the thaw reply: the set's id, writes held until the
/// engine's thaw within the hold limit, and every writer in the set STABLE after BackupComplete. A
/// writer failing with a retryable error (retry_on) gets a new snapshot set, up to `retries` times.
enum WindowsVssPlugin: QuiescePlugin {
    static let retryable = ["VSS_E_WRITERERROR_RETRYABLE", "VSS_E_WRITERERROR_TIMEOUT", "VSS_E_WRITERERROR_OUTOFRESOURCES"]

    static var info: PluginInfo {
        .with {
            $0.name = "windows-vss"
            $0.version = "1.0.0"
            $0.description_p = "Windows: a VSS snapshot set through the agent — writers freeze, the volumes' writes are held (at most 10 s) while the engine snapshots, then the writers thaw and BackupComplete runs."
            $0.platforms = ["windows"]
            $0.levels = [.crash, .filesystem, .application]
            $0.author = "Quiesce"
            $0.options = [
                .bool("vss_writers", true, "Let VSS writers take part (application-consistent); off: the volumes' writes are only flushed and held (filesystem-consistent). The seed's switch."),
                .list("include_writers", [], "Only these writers take part (names or writer ids); empty: every writer."),
                .list("exclude_writers", [], "These writers never take part (names or writer ids)."),
                .string("backup_type", "copy", allowed: ["copy", "full"], "copy leaves the applications' backup history alone (logs are not truncated); full lets writers truncate logs at BackupComplete."),
                .list("volumes", [], "Only these volumes (e.g. C:\\, D:\\); empty: every NTFS and ReFS volume."),
                .list("skip_volumes", [], "Volumes never to add to the set; an ineligible volume listed here does not lower the level."),
                .int("retries", 1, in: 0...5, "New snapshot sets after a writer fails with a retryable error (VSS_E_WRITERERROR_RETRYABLE, _TIMEOUT, _OUTOFRESOURCES)."),
                .milliseconds("freeze_timeout_ms", 6000, in: 100...60_000, "How long the set may take up to the hold (metadata, writers' prepare and freeze, the flush); it counts against the freeze budget."),
                .milliseconds("thaw_timeout_ms", 3000, in: 100...60_000, "How long releasing the hold, the writers' thaw and BackupComplete may take."),
                .milliseconds("hold_limit_ms", 10000, in: 100...10_000, "The longest the volumes' writes are held (VSS's own limit is 10 s, VSS_E_HOLD_WRITES_TIMEOUT)."),
            ]
        }
    }

    static func plan(_ request: PlanRequest) throws -> Plan {
        let facts = request.facts, policy = request.policy
        let options = Options(policy)
        guard facts.osFamily == "windows" else {
            throw PluginRefusal("windows-vss plans Windows instances; \(facts.instanceID) reports os_family \"\(facts.osFamily)\"")
        }
        var plan = Plan(plugin: "windows-vss", policy: policy)
        plan.quiesceRetries = UInt32(try options.int("retries"))
        guard policy.wanted != .crash else { return plan }

        // Volumes.
        let only = try options.list("volumes"), skip = Set(try options.list("skip_volumes").map { $0.uppercased() })
        let onlySet = Set(only.map { $0.uppercased() })
        var eligible: [String] = [], ineligible: [String] = []
        for mount in facts.mounts where (onlySet.isEmpty || onlySet.contains(mount.mountPoint.uppercased())) && !skip.contains(mount.mountPoint.uppercased()) {
            if mount.freezable {
                eligible.append(mount.mountPoint)
            } else if !mount.readOnly {
                ineligible.append("\(mount.mountPoint) is \(mount.fsType)")
            }
        }
        let missing = only.filter { name in !facts.mounts.contains { $0.mountPoint.uppercased() == name.uppercased() } }
        if !facts.capabilities.isEmpty && !facts.capabilities.contains("vss") {
            plan.lower(to: .crash, "vss-not-offered: the agent does not drive VSS (it offers \(facts.capabilities.joined(separator: ", ")))")
        } else if !facts.guardReady {
            plan.lower(to: .crash, "guard-missing: the agent's hold guard is not running, and no writes are held without it")
        } else if facts.vssService != "running" {
            plan.lower(to: .crash, "vss-service-not-running: the Volume Shadow Copy service is \(facts.vssService.isEmpty ? "not reported" : facts.vssService)")
        } else if !missing.isEmpty {
            plan.lower(to: .crash, "volume-not-found: volumes names \(missing.joined(separator: ", ")), which the instance does not have")
        } else if eligible.isEmpty {
            plan.lower(to: .crash, "no-eligible-volume: " + (ineligible.isEmpty ? "no NTFS or ReFS volume" : ineligible.joined(separator: ", ") + " (VSS snapshots NTFS and ReFS)"))
        } else if !ineligible.isEmpty {
            plan.lower(to: .crash, "fs-not-eligible: \(ineligible.joined(separator: ", ")) (VSS snapshots NTFS and ReFS; list it in skip_volumes to leave it out)")
        }
        guard plan.expected != .crash else { return plan }

        // Writers.
        let include = try options.list("include_writers"), exclude = try options.list("exclude_writers")
        var writersOn = policy.wanted == .application
        if writersOn {
            let named = { (writer: Quiesce_Plugin_V1_VssWriterFact, names: [String]) in names.contains(writer.name) || names.contains(writer.writerID) }
            let unknown = include.filter { name in !facts.vssWriters.contains { $0.name == name || $0.writerID == name } }
            let taking = facts.vssWriters.filter { (include.isEmpty || named($0, include)) && !named($0, exclude) }
            if !(try options.bool("vss_writers")) {
                plan.lower(to: .filesystem, "vss-writers-off: policy \(policy.name) turns VSS writers off")
                writersOn = false
            } else if !unknown.isEmpty {
                let present = facts.vssWriters.map(\.name).joined(separator: ", ")
                plan.lower(to: .filesystem, "vss-writer-missing: \(unknown.joined(separator: ", ")) not on this instance (its writers: \(present.isEmpty ? "none" : present))")
                writersOn = false
            } else if taking.isEmpty {
                plan.lower(to: .filesystem, "vss-no-writers: no VSS writer takes part, so no application is quiesced")
                writersOn = false
            }
        }

        let minimum = policy.minimum
        let holdLimit = UInt32(try options.int("hold_limit_ms"))
        let backupType = try options.string("backup_type")
        plan.quiesce.append(.make(
            "vss-freeze",
            writersOn ? "VSS snapshot set of \(eligible.joined(separator: ", ")): writers freeze, then writes are held" : "VSS snapshot set of \(eligible.joined(separator: ", ")) without writers: writes flushed and held",
            .vssFreeze(.with {
                $0.volumes = eligible
                $0.includeWriters = writersOn
                $0.backupType = backupType
                if writersOn {
                    $0.includeWritersNamed = include
                    $0.excludeWritersNamed = exclude
                }
                $0.holdLimitMs = holdLimit
                $0.retryOn = Self.retryable
            }),
            timeoutMs: UInt32(try options.int("freeze_timeout_ms")), undo: "vss-thaw",
            onFailure: .downgrade(to: .crash, "vss-freeze-failed", minimum: minimum), blocking: true))
        plan.thaw.append(.make(
            "vss-thaw", "release the hold; writers thaw; BackupComplete", .vssThaw(.init()),
            timeoutMs: UInt32(try options.int("thaw_timeout_ms")), blocking: true))
        return plan
    }
}

private let table = PluginExport.table(
    describe: { PluginExport.describe(WindowsVssPlugin.self, into: $0) },
    plan: { PluginExport.plan(WindowsVssPlugin.self, $0, $1, into: $2) })

@_cdecl("quiesce_plugin_entry")
public func quiescePluginEntry() -> UnsafePointer<quiesce_plugin> { table.pointer }
