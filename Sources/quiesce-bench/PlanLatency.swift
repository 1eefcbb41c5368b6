import ArgumentParser
import Foundation
import QuiesceCore
import QuiescePluginProto
import QuiescePlugins

/// How long planning costs: loading each plugin in its host process, and one
/// plan (request encoded, through the pipe, the plugin, the answer decoded and
/// validated) for an instance with many mounts and hooks.
struct PlanLatency: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan", abstract: "Plugin load time and plan latency through the plugin host.")

    @Option(name: .customLong("plugin-path"), help: ArgumentHelp("More plugins to measure (repeatable).", valueName: "path"))
    var pluginPaths: [String] = []
    @Option(help: "Plans per plugin.")
    var runs: Int = 1000
    @Option(help: "Mounts in the synthetic instance's facts.")
    var mounts: Int = 16

    func run() async throws {
        let loadStart = ContinuousClock.now
        let registry = await PluginRegistry.load(searchPath: .standard(extra: self.pluginPaths))
        let loadTime = ContinuousClock.now - loadStart
        defer { Task { await registry.shutdown() } }
        for failure in registry.failures { FileHandle.standardError.write(Data("bench: \(failure)\n".utf8)) }
        let facts = InstanceFacts.with {
            $0.instanceID = "bench-1"
            $0.osFamily = "linux"
            $0.guardReady = true
            $0.capabilities = ["facts", "hooks", "fsfreeze", "holds"]
            $0.mounts = (0..<self.mounts).map { i in
                .with {
                    $0.mountPoint = i == 0 ? "/" : "/data\(i)"
                    $0.device = "/dev/vd\(i)"
                    $0.fsType = i % 2 == 0 ? "ext4" : "xfs"
                    $0.freezable = true
                }
            }
            $0.hooks = ["prescript", "postscript", "db-hold"].map { name in
                .with {
                    $0.name = name
                    $0.path = name == "db-hold" ? "/etc/quiesce/hooks.d/db-hold" : "/tmp/\(name).sh"
                    $0.exists = true
                    $0.regularFile = true
                    $0.mode = 0o700
                    $0.sha256 = String(repeating: "ab", count: 32)
                }
            }
        }
        // The same instance as Windows reports it, for plugins that plan Windows (windows-vss).
        let windows = InstanceFacts.with {
            $0.instanceID = "bench-win-1"
            $0.osFamily = "windows"
            $0.guardReady = true
            $0.capabilities = ["facts", "vss"]
            $0.vssService = "running"
            $0.mounts = (0..<self.mounts).map { i in
                .with {
                    $0.mountPoint = String(UnicodeScalar(UInt8(67 + i % 24))) + ":\\" + (i < 24 ? "" : "Data\(i)\\")
                    $0.fsType = i % 2 == 0 ? "NTFS" : "ReFS"
                    $0.freezable = true
                }
            }
            $0.vssWriters = ["SqlServerWriter", "Registry Writer", "WMI Writer"].map { name in .with { $0.name = name; $0.state = "STABLE" } }
        }
        print("loaded \(registry.plugins.count) plugins in \(String(format: "%.1f", loadTime.timeInterval * 1000)) ms (each in its own host process, in parallel)\n")
        var table = TextTable(headers: ["PLUGIN", "EXPECTED", "STEPS", "RUNS", "P50 µs", "P99 µs", "MAX µs", "PLANS/S"])
        for plugin in registry.plugins {
            let facts = plugin.info.platforms == ["windows"] ? windows : facts
            let policy = try PlanPolicy.with {
                $0.name = "bench"
                $0.wanted = .application
                $0.freezeBudgetMs = 10_000
                $0.options = try plugin.resolveOptions([:])
            }
            _ = try await plugin.plan(facts: facts, policy: policy)  // warm-up
            var samples: [Duration] = []
            samples.reserveCapacity(self.runs)
            var last = Plan()
            let start = ContinuousClock.now
            for _ in 0..<self.runs {
                let begin = ContinuousClock.now
                last = try await plugin.plan(facts: facts, policy: policy)
                samples.append(ContinuousClock.now - begin)
            }
            let total = ContinuousClock.now - start
            samples.sort()
            func us(_ d: Duration) -> String { String(d.nanoseconds / 1000) }
            table.append([
                plugin.name, last.expected.name, "\(last.quiesce.count + last.thaw.count)", "\(self.runs)",
                us(samples[samples.count / 2]), us(samples[min(samples.count - 1, samples.count * 99 / 100)]), us(samples.last!),
                String(format: "%.0f", Double(self.runs) / total.timeInterval),
            ])
        }
        print(table.render())
    }
}
