import CQuiescePlugin
import QuiescePluginKit

/// `crash`: the baseline. No guest action; the disks are snapshotted at one
/// point in time, as a power cut would leave them.
enum CrashPlugin: QuiescePlugin {
    static var info: PluginInfo {
        .with {
            $0.name = "crash"
            $0.version = "1.0.0"
            $0.description_p = "Crash-consistent baseline: snapshot the disks at one point in time, no guest action."
            $0.levels = [.crash]
            $0.author = "Quiesce"
        }
    }

    static func plan(_ request: PlanRequest) throws -> Plan {
        .with {
            $0.plugin = "crash"
            $0.expected = .crash
            if request.policy.wanted != .crash {
                $0.reasons = ["crash-plugin: the crash plugin never quiesces (policy \(request.policy.name) wants \(request.policy.wanted))"]
            }
        }
    }
}

private let table = PluginExport.table(
    describe: { PluginExport.describe(CrashPlugin.self, into: $0) },
    plan: { PluginExport.plan(CrashPlugin.self, $0, $1, into: $2) })

@_cdecl("quiesce_plugin_entry")
public func quiescePluginEntry() -> UnsafePointer<quiesce_plugin> { table.pointer }
