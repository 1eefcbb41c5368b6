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
import QuiescePluginProto
import QuiescePlugins
import QuiesceProviders
import QuiesceWire
import Synchronization

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
    @Option(name: .customLong("max-frozen"), help: "run.max_frozen (default: the fleet file's default).")
    var maxFrozen: Int?
    @Option(help: "run.planning (default: the fleet file's default).")
    var planning: Int?
    @Option(name: .customLong("frozen-first-ms"), help: ArgumentHelp(
        "How long another instance's work waits for the frozen ones to thaw (0: it never waits). Two or more, comma-separated: each size's rounds alternate between them, one row each, so they meet the same moments of the machine.",
        valueName: "ms[,ms…]"))
    var frozenFirstMs = "20"
    @Option(name: .customLong("pace-frozen"), help: ArgumentHelp(
        "run.pace_frozen: on (the default) or off. Both, comma-separated (on,off): rounds alternate between them, one row each (with --frozen-first-ms a,b: every pair).",
        valueName: "on|off[,…]"))
    var paceFrozen = "on"
    @Option(help: "At least this many frozen windows per size (rounds of the whole fleet).")
    var samples = 300
    @Option(name: .customLong("ec2-endpoint"), help: ArgumentHelp(
        "Snapshot through the ec2 provider at this endpoint (moto behind the fault proxy; scripts/bench-ec2.py) instead of the local pool.",
        valueName: "url"))
    var ec2Endpoint: String?
    @Option(name: .customLong("ec2-instances"), help: ArgumentHelp("With --ec2-endpoint: a JSON list of EC2 instance ids, one per bench instance.", valueName: "file"))
    var ec2Instances: String?
    @Option(name: .customLong("bound-burst"), help: "The rate bound's burst (default --burst): the API's own bucket when it is not ours.")
    var boundBurst: Int?
    @Option(name: .customLong("bound-per-second"), help: "The rate bound's refill per second (default --per-second).")
    var boundPerSecond: Double?
    @Option(name: .customLong("run-prefix"), help: "Run ids start with this (distinct runs against one moto).")
    var runPrefix = "bench"
    @Option(help: ArgumentHelp(
        "Where the agents run: in-process (this process, on the engine's event loops) or processes (one quiesce-agent process per instance, next to this program, as on machines of their own; on this one host they add a hundred processes' context switches to the same cores).",
        valueName: "in-process|processes"))
    var agents = Agents.inProcess

    enum Agents: String, ExpressibleByArgument, CaseIterable {
        case inProcess = "in-process", processes
    }

    func validate() throws {
        if self.agents == .processes && !FileManager.default.isExecutableFile(atPath: Self.agentExecutable) {
            throw ValidationError("--agents processes: expected quiesce-agent next to this program, found none at \(Self.agentExecutable) (swift build --product quiesce-agent)")
        }
    }

    static var agentExecutable: String { PluginSearchPath.executableDirectory + "/quiesce-agent" }

    /// One size's figures, for the tables and the targets.
    struct Measured {
        var count: Int
        /// The settings of these rounds ("ff 20", "pace on", or both), when the run compares several.
        var variant: String?
        /// The size, and the setting when the run compares several: how the rows and lines name it.
        static func label(_ count: Int, _ variant: String?) -> String { variant.map { "\(count) (\($0))" } ?? "\(count)" }
        var label: String { Self.label(self.count, self.variant) }
        var row: [String]
        var frozenP50: Double
        var frozenP99: Double
        /// Where the frozen window goes, p50 ms: freeze call (engine) / agent / kernel, snapshot, thaw call / agent.
        var breakdown: [String]
    }

    func run() async throws {
        var results: [Measured] = []
        for count in self.instances.split(separator: ",").compactMap({ Int($0) }) {
            results += try await self.measure(count)
        }
        var table = TextTable(headers: ["INSTANCES", "DISKS", "MAKESPAN S", "RATE BOUND S", "RATIO", "FROZEN P50 MS", "P99 MS", "MAX MS",
                                        "SNAPSHOT P50 MS", "P99 MS", "LEVELS", "PEAK RSS MIB"])
        for result in results { table.append([result.label] + result.row.dropFirst()) }
        print(table.render())
        print("")
        var parts = TextTable(headers: ["INSTANCES", "FREEZE CALL", "AGENT", "FIFREEZE", "SNAPSHOT", "THAW CALL", "AGENT", "FROZEN (GUEST)"])
        for result in results { parts.append([result.label] + result.breakdown) }
        print("Where the frozen window goes (p50 ms; calls on the engine's clock, AGENT its share on the guest, FIFREEZE the guard's syncfs + ioctl of the slowest mount):")
        print(parts.render())
        // Scaling targets (issue 19): the largest size against the smallest, measured in this run.
        // With several frozen-first settings, each against the smallest size's rows of the same setting.
        let smallest = results.map(\.count).min(), largest = results.map(\.count).max()
        if let smallest, let largest, smallest < largest {
            print("")
            var targets = TextTable(headers: ["TARGET", "FIGURE", "BOUND", "MET"])
            for result in results where result.count == largest {
                guard let base = results.first(where: { $0.count == smallest && $0.variant == result.variant }) else { continue }
                let setting = result.variant.map { ", \($0)" } ?? ""
                for (what, figure, bound) in [("frozen p50 at \(result.count) <= 2 x at \(base.count)\(setting)", result.frozenP50, 2 * base.frozenP50),
                                              ("frozen p99 at \(result.count) <= 3 x at \(base.count)\(setting)", result.frozenP99, 3 * base.frozenP99)] {
                    targets.append([what, String(format: "%.2f ms", figure), String(format: "<= %.2f ms", bound), figure <= bound ? "yes" : "NO"])
                }
            }
            print(targets.render())
        }
        print("""
            RUN: concurrency \(self.concurrency), max_frozen \(self.maxFrozen.map(String.init) ?? "default"), planning \(self.planning.map(String.init) ?? "default"), frozen first \(self.frozenFirstMs) ms, pace_frozen \(self.paceFrozen)\(self.frozenFirstMs.contains(",") || self.paceFrozen.contains(",") ? " (rounds alternate between the settings; a row each)" : "").
            Each size runs as many rounds as give at least \(self.samples) frozen windows (a fresh run each, full token bucket); MAKESPAN is their median.
            RATE BOUND: (instances - burst) / per_second (one group create per instance, burst \(self.boundBurst ?? self.burst), \(self.boundPerSecond ?? self.perSecond)/s\(self.boundBurst != nil || self.boundPerSecond != nil ? ": the API's own bucket; Quiesce's is \(self.burst), \(self.perSecond)/s" : "")).
            FROZEN: FIFREEZE -> last FITHAW on the guest (thaw reply frozen_us), per instance, over real loop-mounted ext4.
            SNAPSHOT: the provider's create call inside that window (engine clock): \(self.ec2Endpoint == nil ? "a reflink clone of both disk images, no wait for the disk" : "one CreateSnapshots call to the EC2 API (moto behind the fault proxy)").
            PEAK RSS: this process (engine and coordinator\(self.agents == .inProcess ? ", and every in-process agent" : "")); the thaw guards are separate processes.
            AGENTS: \(self.agents == .processes ? "one quiesce-agent process per instance" : "in this process, on the engine's event loops"), each with its own mount table (its lines of the host's: / and its two disks), as on a machine of its own.
            """)
    }

    func measure(_ count: Int) async throws -> [Measured] {
        let patiences = self.frozenFirstMs.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        guard !patiences.isEmpty, patiences.allSatisfy({ (Int($0) ?? -1) >= 0 }) else {
            throw ValidationError("--frozen-first-ms: expected milliseconds (0 or more), comma-separated, found \"\(self.frozenFirstMs)\"")
        }
        let paces = self.paceFrozen.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        guard !paces.isEmpty, paces.allSatisfy({ ["on", "off"].contains($0) }) else {
            throw ValidationError("--pace-frozen: expected on, off or both comma-separated, found \"\(self.paceFrozen)\"")
        }
        // Every pair of the settings compared; a row's name says the ones that vary.
        let variants: [(patience: Int, paced: Bool, name: String?)] = patiences.flatMap { patience in
            paces.map { pace in
                let name = [patiences.count > 1 ? "ff \(patience)" : nil, paces.count > 1 ? "pace \(pace)" : nil].compactMap { $0 }
                return (Int(patience)!, pace == "on", name.isEmpty ? nil : name.joined(separator: ", "))
            }
        }
        let system = System()
        let root = self.pool + "/bench-fleet-\(getpid())-\(count)"
        defer {
            let left = system.cleanUp()
            if left.isEmpty { try? FileManager.default.removeItem(atPath: root) } else { print("bench: could not undo \(left)") }
        }
        let provider = try LocalProvider(pool: root + "/pool", createBurst: self.burst, createsPerSecond: self.perSecond)
        let ec2IDs: [String] = try self.ec2Instances.map { path in
            try JSONDecoder().decode([String].self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        } ?? []
        if self.ec2Endpoint != nil && ec2IDs.count < count {
            throw ValidationError("--ec2-instances: expected at least \(count) instance ids, found \(ec2IDs.count)")
        }
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
                    _ = try system.mount(try system.attach(image, directIO: true), at: point)
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
        let mountTables = try Self.ownMountTables(mounts, under: root + "/mountinfo")
        let locations = HookLocations(prescript: hooks + "/pre.sh", postscript: hooks + "/post.sh", hookDirectory: hooks)
        // Separate agent processes: the real quiesce-agent, one per instance, each with its own mount table.
        // Stopped (SIGTERM, then waited for) before anything else is undone, also when the bench fails.
        var agentProcesses: [Process] = []
        defer {
            for process in agentProcesses where process.isRunning { process.terminate() }
            for process in agentProcesses { process.waitUntilExit() }
        }
        for id in ids {
            if self.agents == .processes {
                let files = ca.agentFiles(instanceID: id)
                agentProcesses.append(try FreezeWindow.start(Self.agentExecutable, [
                    "run", "--engine", "127.0.0.1:\(address.port)", "--cert", files.certificatePath, "--key", files.keyPath,
                    "--ca", files.trustRootsPath, "--prescript", locations.prescript, "--postscript", locations.postscript,
                    "--hook-dir", locations.hookDirectory, "--mount-table", mountTables[id]!, "--log-level", "error",
                    // A hundred agents on one host: locking each one's whole address space would pin gigabytes for nothing here.
                    "--no-memory-lock", "--reconnect-max", "0.5",
                ], log: root + "/agent-\(id).log"))
            } else {
                let handler = BuiltinCommandHandler(
                    facts: FactsCollector(mountInfoPath: mountTables[id]!, hooks: locations),
                    guardExecutable: guardPath, logger: quiet)
                handlers.append(handler)
                let runner = AgentRunner(
                    configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: id),
                                                      backoff: Backoff(base: .milliseconds(50), cap: .milliseconds(500))),
                    handler: handler, logger: quiet)
                tasks.append(Task { try await runner.run() })
            }
        }
        let missing = await engine.registry.waitFor(Set(ids), timeout: .seconds(120))
        let plugins = await PluginRegistry.load()
        let providerLine = self.ec2Endpoint.map {
            "aws: { kind: ec2, region: us-east-1, endpoint_url: \"\($0)\", poll_ms: 100, burst: \(self.burst), per_second: \(self.perSecond) }"
        } ?? "pool: { kind: local, pool: \(provider.pool), burst: \(self.burst), per_second: \(self.perSecond) }"
        var text = """
            providers:
              \(providerLine)
            policies:
              fs: { plugin: linux-freeze, wanted: filesystem, minimum: crash, retries: 4 }
            instances:

            """
        for (index, id) in ids.enumerated() {
            let disks = self.ec2Endpoint == nil ? "disks: [\(id)-a, \(id)-b]" : "ec2_instance: \(ec2IDs[index])"
            text += "  - { id: \(id), policy: fs, \(disks), options: { only_mounts: [\(mounts[id]!.joined(separator: ", "))] } }\n"
        }
        text += "run: { concurrency: \(self.concurrency), agent_wait_s: 1"
            + (self.maxFrozen.map { ", max_frozen: \($0)" } ?? "") + (self.planning.map { ", planning: \($0)" } ?? "") + " }\n"
        let fleet = try FleetFile.parse(text, path: "bench-fleet.yaml", plugins: plugins)
        let catalog = try SQLiteCatalog(path: root + "/catalog.db")
        FileHandle.standardError.write(Data("bench: \(count - missing.count)/\(count) agents connected; backing up …\n".utf8))
        // What planning one instance costs on an idle engine: facts (one agent round trip) and the plugin's plan.
        var factsTimes: [Double] = [], planTimes: [Double] = []
        for _ in 0..<20 {
            let t0 = ContinuousClock.now
            guard let facts = try? await engine.planFacts(of: ids[0]) else { break }
            let t1 = ContinuousClock.now
            if let plugin = plugins.plugin(named: "linux-freeze"), let options = try? plugin.resolveOptions([:]) {
                _ = try? await plugin.plan(facts: facts, policy: .with {
                    $0.name = "fs"; $0.wanted = .filesystem; $0.minimum = .crash; $0.freezeBudgetMs = 10_000; $0.options = options
                })
            }
            factsTimes.append(Double((t1 - t0).nanoseconds) / 1e6)
            planTimes.append(Double((ContinuousClock.now - t1).nanoseconds) / 1e6)
        }
        var collectTimes: [Double] = []
        for _ in 0..<20 {
            let t0 = ContinuousClock.now
            _ = try? FactsCollector(mountInfoPath: mountTables[ids[0]]!, hooks: locations).collectBlocking(includeHookHashes: true)
            collectTimes.append(Double((ContinuousClock.now - t0).nanoseconds) / 1e6)
        }
        FileHandle.standardError.write(Data(String(format: "bench: planning one instance on an idle engine: facts p50 %.2f ms (collecting them on the agent %.2f ms), plan p50 %.2f ms\n",
                                                    factsTimes.sorted()[factsTimes.count / 2], collectTimes.sorted()[collectTimes.count / 2],
                                                    planTimes.sorted()[planTimes.count / 2]).utf8))
        // Enough rounds for at least 300 frozen windows per size (a p99 of 100 samples is their maximum);
        // each round is a fresh run with a full token bucket, after a pause that lets the provider's own limit refill.
        let rounds = max(1, (self.samples + count - 1) / count)
        var reports: [[RunReport]] = Array(repeating: [], count: variants.count)
        var throttles = 0
        var yielded: [(count: Int, total: Duration)] = Array(repeating: (0, .zero), count: variants.count)
        var mostFrozen = Array(repeating: 0, count: variants.count)
        var lowestRate = self.perSecond
        for round in 1...(rounds * variants.count) {
            let variant = (round - 1) % variants.count
            let runID = "\(self.runPrefix)-\(count)-\(round)"
            let bucket = TokenBucket(burst: self.burst, perSecond: self.perSecond)
            var providers: [String: Coordinator.Provider] = ["pool": .init(provider: provider, bucket: bucket)]
            if self.ec2Endpoint != nil {
                providers = try ProviderSet().providers(for: fleet)
                providers["aws"]!.bucket = bucket
            }
            var settings = fleet
            settings.paceFrozen = variants[variant].paced
            let coordinator = Coordinator(engine: engine, plugins: plugins, providers: providers, catalog: catalog, fleet: settings,
                                          frozenFirstPatience: .milliseconds(variants[variant].patience))
            let runStarted = ContinuousClock.now
            let marks = Mutex<[String: ContinuousClock.Instant]>([:])
            reports[variant].append(await coordinator.run(runID: runID) { event in
                switch event {
                case .providerChecked: marks.withLock { $0["checked"] = .now }
                case .settling: marks.withLock { $0["settling"] = .now }
                case .instanceFinished: marks.withLock { $0["last finished"] = .now }
                default: break
                }
            })
            throttles += await bucket.throttles
            mostFrozen[variant] = max(mostFrozen[variant], await coordinator.frozenSlots.mostHeld)
            yielded[variant].count += await coordinator.frozenFirst.deferred
            yielded[variant].total += await coordinator.frozenFirst.deferredFor
            lowestRate = min(lowestRate, await bucket.lowestPerSecond)
            let runEnded = ContinuousClock.now
            if round == 1, let first = await bucket.firstGrant, let last = await bucket.lastGrant {
                func ms(_ d: Duration) -> String { String(format: "%.0f ms", Double(d.nanoseconds) / 1e6) }
                let seen = marks.withLock { $0 }.sorted { $0.value < $1.value }.map { "\($0.key) \(ms($0.value - runStarted))" }
                FileHandle.standardError.write(Data(
                    ("bench: timeline at \(count): first token \(ms(first - runStarted)), last token \(ms(last - runStarted)), end \(ms(runEnded - runStarted))"
                        + (seen.isEmpty ? "" : "; " + seen.joined(separator: ", ")) + "\n").utf8))
            }
            try await Task.sleep(for: .seconds(Double(self.burst) / self.perSecond + 0.1))
        }
        for task in tasks { task.cancel() }
        for task in tasks { _ = try? await task.value }
        for handler in handlers { await handler.shutdown() }
        // Each agent process's peak memory, read before it is stopped.
        let agentPeaks = agentProcesses.compactMap { Self.peakRSSMiB(of: $0.processIdentifier) }.sorted()
        if !agentPeaks.isEmpty {
            FileHandle.standardError.write(Data(String(format: "bench: %d agent processes, peak RSS p50 %.0f MiB, max %.0f MiB each\n",
                                                       agentPeaks.count, agentPeaks[agentPeaks.count / 2], agentPeaks.last!).utf8))
        }
        await plugins.shutdown()
        engine.shutdown()
        _ = try? await engineTask.value
        var measured: [Measured] = []
        for variant in variants.indices {
            measured.append(await self.summarize(count: count, variant: variants[variant].name, reports: reports[variant],
                                                 catalog: catalog, yielded: yielded[variant], mostFrozen: mostFrozen[variant],
                                                 throttles: throttles, lowestRate: lowestRate))
        }
        return measured
    }

    /// One size's (and frozen-first setting's) figures, from its rounds' reports and catalog records.
    func summarize(count: Int, variant: String?, reports: [RunReport], catalog: SQLiteCatalog,
                   yielded: (count: Int, total: Duration), mostFrozen: Int, throttles: Int, lowestRate: Double) async -> Measured {
        let instances = reports.flatMap(\.instances)
        let at = Measured.label(count, variant)
        let rounds = reports.count

        // Nearest rank: the smallest value with at least p of the samples at or below it (nan when there are none).
        func rank(_ sorted: [Double], _ p: Double) -> Double {
            sorted.isEmpty ? .nan : sorted[max(0, Int((Double(sorted.count) * p).rounded(.up)) - 1)]
        }
        func percentiles(_ values: [Double]) -> (Double) -> String {
            let sorted = values.sorted()
            return { p in sorted.isEmpty ? "-" : String(format: "%.2f", rank(sorted, p)) }
        }
        // Where the time goes: each step's p50/p99 over the run's groups (engine clock).
        var groups: [GroupRecord] = []
        for report in reports { groups += (try? await catalog.groups(GroupFilter(runID: report.runID))) ?? [] }
        var perStep: [String: [Double]] = [:]
        for group in groups { for (step, us) in group.stepTimingsUs { perStep[step, default: []].append(Double(us) / 1000) } }
        let steps = perStep.keys.sorted().map { step -> String in
            let p = percentiles(perStep[step]!)
            return "\(step) \(p(0.5))/\(p(0.99))"
        }
        let durations = percentiles(instances.map { Double($0.duration.nanoseconds) / 1e6 })
        FileHandle.standardError.write(Data(
            "bench: \(rounds) round(s), \(instances.count) instances: steps p50/p99 ms at \(at): \(steps.joined(separator: ", ")); whole instance \(durations(0.5))/\(durations(0.99))\n".utf8))
        let longest = instances.filter { $0.frozen != nil }.sorted { $0.frozen! > $1.frozen! }.prefix(5)
        let slowest = longest.map { "\($0.instanceID) \(String(format: "%.0f", Double($0.frozen!.nanoseconds) / 1e6))" }
        FileHandle.standardError.write(Data("bench: longest frozen windows (ms) at \(at): \(slowest.joined(separator: ", "))\n".utf8))
        // Where each of those went, step by step (engine clock; .agent and .kernel their shares on the guest).
        let byID = Dictionary(groups.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        for outcome in longest {
            guard let id = outcome.groupID, let timings = byID[id]?.stepTimingsUs else { continue }
            let parts = ["freeze", "freeze.agent", "freeze.kernel", "snapshot", "thaw", "thaw.agent"].compactMap { step in
                timings[step].map { "\(step) \(String(format: "%.2f", Double($0) / 1000))" }
            }
            FileHandle.standardError.write(Data("bench:   \(outcome.instanceID) \(String(format: "%.2f", Double(outcome.frozen!.nanoseconds) / 1e6)) ms: \(parts.joined(separator: ", "))\n".utf8))
        }
        FileHandle.standardError.write(Data(("bench: frozen first at \(at): \(yielded.count) steps waited for a thaw before starting, "
            + String(format: "%.1f ms in all; at most %d frozen at once\n", Double(yielded.total.nanoseconds) / 1e6, mostFrozen)).utf8))
        let reasonCounts = Dictionary(grouping: instances.flatMap { $0.reasons.map { String($0.prefix(160)) } }, by: { $0 }).mapValues(\.count)
        for (reason, n) in reasonCounts.sorted(by: { $0.value > $1.value }).prefix(5) {
            FileHandle.standardError.write(Data("bench: \(n) × \(reason)\n".utf8))
        }
        let frozen = instances.compactMap { $0.frozen.map { Double($0.nanoseconds) / 1e6 } }.sorted()
        let pct = percentiles(frozen)
        let snap = percentiles(instances.compactMap { $0.snapshot.map { Double($0.nanoseconds) / 1e6 } })
        let bound = max(0, Double(count - (self.boundBurst ?? self.burst)) / (self.boundPerSecond ?? self.perSecond))
        let retried = instances.filter { $0.attempts > 1 }.count
        FileHandle.standardError.write(Data(String(format: "bench: provider at %d: %d throttles seen by the coordinator, %d instances retried, its rate went as low as %.2f/s (configured %.2f/s)\n",
                                                   count, throttles, retried, lowestRate, self.perSecond).utf8))
        if self.ec2Endpoint != nil {  // for scripts/bench-ec2.py, which reads it
            print("PROVIDER \(count) throttles=\(throttles) retried=\(retried) lowest_rate=\(String(format: "%.2f", lowestRate)) failed=\(instances.filter { $0.state == .failed }.count)")
        }
        let makespans = reports.map(\.makespan.timeInterval).sorted()
        let makespan = makespans[(makespans.count - 1) / 2]
        FileHandle.standardError.write(Data("bench: makespans at \(at) (s): \(makespans.map { String(format: "%.2f", $0) }.joined(separator: " "))\n".utf8))
        let levels = Dictionary(grouping: instances, by: { $0.achieved?.name ?? "failed" }).map { "\($1.count) \($0)" }.sorted().joined(separator: ", ")
        let hwm = Self.peakRSSMiB(of: getpid()) ?? 0
        let row = [
            "\(count)", "\(count * 2)", String(format: "%.2f", makespan), String(format: "%.2f", bound),
            bound > 0 ? String(format: "%.2f", makespan / bound) : "-", pct(0.5), pct(0.99), frozen.last.map { String(format: "%.2f", $0) } ?? "-",
            snap(0.5), snap(0.99), levels, String(format: "%.0f", hwm),
        ]
        let breakdown = ["freeze", "freeze.agent", "freeze.kernel", "snapshot", "thaw", "thaw.agent"].map { step in
            perStep[step].map { percentiles($0)(0.5) } ?? "-"
        } + [pct(0.5)]
        return Measured(count: count, variant: variant, row: row, frozenP50: rank(frozen, 0.5), frozenP99: rank(frozen, 0.99), breakdown: breakdown)
    }
}

extension FleetRun {
    /// A process's peak resident memory (VmHWM), MiB; nil when it cannot be read.
    static func peakRSSMiB(of pid: pid_t) -> Double? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kib = line.split(separator: " ").dropFirst().first.flatMap({ Double($0) }) else { return nil }
        return kib / 1024
    }

    /// Each simulated instance's own mount table: its lines of this host's (the root filesystem
    /// and its two disks), as a machine of its own would have. Every agent here runs in one
    /// process on one host, whose table holds every instance's mounts: with 1,000 instances,
    /// each facts query parsed 2,000 lines and statfs'd 2,000 filesystems (18 ms on the agent,
    /// about 40 % of the run's CPU, none of which a real instance spends on other machines'
    /// disks). The facts stay real: real mount table lines, statvfs on the real mounts.
    static func ownMountTables(_ mounts: [String: [String]], under directory: String) throws -> [String: String] {
        guard let text = FactsCollector.readWhole("/proc/self/mountinfo") else {
            throw ValidationError("cannot read /proc/self/mountinfo")
        }
        let entries = try MountInfoEntry.parse(text)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
        guard lines.count == entries.count else {
            throw ValidationError("/proc/self/mountinfo: \(lines.count) lines but \(entries.count) entries parsed")
        }
        var byPoint: [String: [String]] = [:]
        for (entry, line) in zip(entries, lines) { byPoint[entry.mountPoint, default: []].append(String(line)) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var paths: [String: String] = [:]
        for (id, points) in mounts {
            let own = (["/"] + points).flatMap { byPoint[$0] ?? [] }
            let path = directory + "/" + id
            try (own.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
            paths[id] = path
        }
        return paths
    }
}
