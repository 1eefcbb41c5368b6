import ArgumentParser
import Foundation
import Logging
import QuiesceAgent
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceDemo
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePKI
import QuiescePlugins
import QuiesceWire

/// A fleet backup at scale: N instances × 2 disks (loop-mounted ext4 images in an
/// XFS reflink pool), one agent each over mutual TLS on loopback, the coordinator
/// against the local provider with a token bucket. Prints makespan against the
/// rate-limit bound, the frozen windows and peak memory.
struct FleetRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "fleet", abstract: "Fleet backup makespan, frozen windows and memory (root).")

    @Option(help: "Instance counts to run, comma-separated (each a separate run).")
    var instances = "10,100"
    @Option(help: ArgumentHelp("A directory on an XFS filesystem with reflink (the pool goes here).", valueName: "dir"))
    var pool: String
    @Option(help: "Provider burst.")
    var burst = 20
    @Option(name: .customLong("per-second"), help: "Provider creates per second.")
    var perSecond = 50.0
    @Option(help: "Instances backed up at once.")
    var concurrency = 32

    func run() async throws {
        var results: [[String]] = []
        for count in self.instances.split(separator: ",").compactMap({ Int($0) }) {
            results.append(try await self.measure(count))
        }
        var table = TextTable(headers: ["INSTANCES", "DISKS", "MAKESPAN S", "RATE BOUND S", "RATIO", "FROZEN P50 MS", "P99 MS", "MAX MS",
                                        "LEVELS", "PEAK RSS MIB"])
        for row in results { table.append(row) }
        print(table.render())
        print("""
            RATE BOUND: (instances - burst) / per_second (one group create per instance, burst \(self.burst), \(self.perSecond)/s).
            FROZEN: FIFREEZE -> last FITHAW on the guest (thaw reply frozen_us), per instance, over real loop-mounted ext4.
            PEAK RSS: this process (engine, coordinator and every in-process agent together); the thaw guards are separate processes.
            """)
    }

    func measure(_ count: Int) async throws -> [String] {
        let system = System()
        let root = self.pool + "/bench-fleet-\(getpid())-\(count)"
        defer {
            let left = system.cleanUp()
            if left.isEmpty { try? FileManager.default.removeItem(atPath: root) } else { print("bench: could not undo \(left)") }
        }
        let provider = try LocalProvider(pool: root + "/pool", createBurst: self.burst, createsPerSecond: self.perSecond)
        FileHandle.standardError.write(Data("bench: making \(count) instances × 2 disks …\n".utf8))
        var mounts: [String: [String]] = [:]
        for index in 1...count {
            let id = String(format: "vm-%03d", index)
            var points: [String] = []
            for disk in ["a", "b"] {
                let image = try provider.diskPath("\(id)-\(disk)")
                let point = root + "/mnt/\(id)-\(disk)"
                try await system.blocking {
                    try system.run("truncate", "-s", "16M", image)
                    try system.run("mkfs.ext4", "-q", "-F", image)
                    _ = try system.mount(try system.attach(image), at: point)
                }
                points.append(point)
            }
            mounts[id] = points
        }
        let ids = mounts.keys.sorted()
        let ca = CADirectory(path: root + "/ca")
        try ca.initialize(commonName: "bench CA", names: ["localhost"], ipAddresses: ["127.0.0.1"])
        for id in ids { try ca.issue(.agent(instanceID: id)) }
        var quiet = Logger(label: "bench")
        quiet.logLevel = .critical
        let engine = try Engine(
            configuration: EngineConfiguration(listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles,
                                               adminSocketPath: root + "/admin.sock", limits: .defaults),
            logger: quiet)
        let engineTask = Task { try await engine.run() }
        let address = try await engine.listeningAddress()
        let guardPath = PluginSearchPath.executableDirectory + "/quiesce-thaw-guard"
        var handlers: [BuiltinCommandHandler] = []
        var tasks: [Task<Void, any Error>] = []
        let hooks = root + "/no-hooks"
        try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        for id in ids {
            let handler = BuiltinCommandHandler(
                facts: FactsCollector(hooks: HookLocations(prescript: hooks + "/pre.sh", postscript: hooks + "/post.sh", hookDirectory: hooks)),
                guardExecutable: guardPath, logger: quiet)
            handlers.append(handler)
            let runner = AgentRunner(
                configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: id),
                                                  backoff: Backoff(base: .milliseconds(50), cap: .milliseconds(500))),
                handler: handler, logger: quiet)
            tasks.append(Task { try await runner.run() })
        }
        let missing = await engine.registry.waitFor(Set(ids), timeout: .seconds(120))
        let plugins = await PluginRegistry.load()
        var text = """
            providers:
              pool: { kind: local, pool: \(provider.pool), burst: \(self.burst), per_second: \(self.perSecond) }
            policies:
              fs: { plugin: linux-freeze, wanted: filesystem, minimum: crash }
            instances:

            """
        for id in ids {
            text += "  - { id: \(id), policy: fs, disks: [\(id)-a, \(id)-b], options: { only_mounts: [\(mounts[id]!.joined(separator: ", "))] } }\n"
        }
        text += "run: { concurrency: \(self.concurrency), agent_wait_s: 1 }\n"
        let fleet = try FleetFile.parse(text, path: "bench-fleet.yaml", plugins: plugins)
        let coordinator = Coordinator(
            engine: engine, plugins: plugins,
            providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: self.burst, perSecond: self.perSecond))],
            catalog: try SQLiteCatalog(path: root + "/catalog.db"), fleet: fleet)
        FileHandle.standardError.write(Data("bench: \(count - missing.count)/\(count) agents connected; backing up …\n".utf8))
        let report = await coordinator.run(runID: "bench-\(count)")

        for task in tasks { task.cancel() }
        for task in tasks { _ = try? await task.value }
        for handler in handlers { await handler.shutdown() }
        await plugins.shutdown()
        engine.shutdown()
        _ = try? await engineTask.value

        let reasonCounts = Dictionary(grouping: report.instances.flatMap { $0.reasons.map { String($0.prefix(160)) } }, by: { $0 }).mapValues(\.count)
        for (reason, n) in reasonCounts.sorted(by: { $0.value > $1.value }).prefix(5) {
            FileHandle.standardError.write(Data("bench: \(n) × \(reason)\n".utf8))
        }
        let frozen = report.instances.compactMap { $0.frozen.map { Double($0.nanoseconds) / 1e6 } }.sorted()
        func pct(_ p: Double) -> String {
            frozen.isEmpty ? "-" : String(format: "%.2f", frozen[min(frozen.count - 1, Int(Double(frozen.count) * p))])
        }
        let bound = max(0, Double(count - self.burst) / self.perSecond)
        let makespan = report.makespan.timeInterval
        let levels = Dictionary(grouping: report.instances, by: { $0.achieved?.name ?? "failed" }).map { "\($1.count) \($0)" }.sorted().joined(separator: ", ")
        let hwm = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("VmHWM:") }?.split(separator: " ").dropFirst().first.flatMap { Double($0) } ?? 0
        return [
            "\(count)", "\(count * 2)", String(format: "%.2f", makespan), String(format: "%.2f", bound),
            bound > 0 ? String(format: "%.2f", makespan / bound) : "-", pct(0.5), pct(0.99), frozen.last.map { String(format: "%.2f", $0) } ?? "-",
            levels, String(format: "%.0f", hwm / 1024),
        ]
    }
}
