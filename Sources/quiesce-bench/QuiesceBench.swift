import ArgumentParser
import CQuiesceLinux
import Foundation
import Logging
import QuiesceAgent
import QuiesceCatalog
import QuiesceCore
import QuiesceLocalProvider
import QuiescePKI
import QuiesceWire

/// Load generators for the scripts in scripts/bench-*.sh. They print JSON
/// lines; the scripts turn them into tables.
@main
enum BenchMain {
    static func main() async {
        ConcurrencyExecutor.useEventLoops()
        BrokenPipes.ignoreSignal()
        await QuiesceBench.main()
    }
}

struct QuiesceBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiesce-bench",
        abstract: "Load generators behind scripts/bench-*.sh.",
        subcommands: [Sessions.self, Snapshot.self, CatalogWriter.self, FreezeWindow.self, StackEcho.self, PlanLatency.self, FleetRun.self, IdentityBench.self])
}

struct Sessions: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Open N real mutual-TLS agent sessions from this one process and hold them.",
        discussion: """
            Issues any missing agent certificates (bench-0001 …) from the CA directory, starts every \
            agent at once, and prints one JSON line when all are connected (connect-time percentiles), \
            then holds the sessions for --hold seconds and prints a second line.
            """)

    @Option(help: ArgumentHelp("The engine's agent port.", valueName: "host:port"))
    var engine: String
    @Option(help: ArgumentHelp("The engine's CA directory (its key signs the agents' certificates).", valueName: "dir"))
    var caDir: String
    @Option(help: "How many agent sessions.")
    var count = 200
    @Option(help: "Seconds to hold the sessions once all are up.")
    var hold = 10.0
    @Option(help: "Seconds to wait for every session before giving up.")
    var timeout = 120.0
    @Flag(help: "Only issue the missing certificates, then exit.")
    var issueOnly = false
    @Option(help: "After the hold, wait this long for the engine to be restarted and every session to come back (0: do not).")
    var restartTimeout = 0.0

    func run() async throws {
        let address = try ListenAddress(parsing: self.engine)
        let ca = CADirectory(path: self.caDir)
        let ids = (1...self.count).map { String(format: "bench-%04d", $0) }
        for id in ids where !FileManager.default.fileExists(atPath: ca.agentFiles(instanceID: id).certificatePath) {
            try ca.issue(.agent(instanceID: id))
        }
        if self.issueOnly { return }
        raiseOpenFileLimit()  // one descriptor per session
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let runners = ids.map { id in
            AgentRunner(
                configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: id)),
                // Session load only: no thaw guard process per simulated agent.
                handler: BuiltinCommandHandler(startsGuard: false), logger: logger)
        }
        let clock = ContinuousClock()
        let start = clock.now
        let tasks = runners.map { runner in Task { try await runner.run() } }
        defer { tasks.forEach { $0.cancel() } }

        let latencies = try await withThrowingTaskGroup(of: Duration.self) { group in
            for runner in runners {
                group.addTask {
                    await runner.waitForPhase { if case .connected = $0 { true } else { false } }
                    return clock.now - start
                }
            }
            group.addTask {
                try await Task.sleep(for: .seconds(self.timeout))
                throw ValidationError("not every session was up within \(self.timeout) s")
            }
            var collected: [Duration] = []
            while collected.count < runners.count, let next = try await group.next() { collected.append(next) }
            group.cancelAll()
            return collected.sorted()
        }
        func percentile(_ p: Double) -> Double {
            latencies[min(latencies.count - 1, Int((Double(latencies.count - 1) * p).rounded()))].timeInterval * 1000
        }
        let reconnects = runners.map(\.sessionsOpened).reduce(0, +) - runners.count
        emit([
            "event": "all_connected", "sessions": runners.count,
            "connect_p50_ms": percentile(0.5), "connect_p99_ms": percentile(0.99), "connect_max_ms": percentile(1),
            "all_connected_ms": (clock.now - start).timeInterval * 1000, "extra_sessions": reconnects,
        ])
        try await Task.sleep(for: .seconds(self.hold))
        let stillConnected = runners.filter { if case .connected = $0.phase { true } else { false } }.count
        emit(["event": "held", "sessions": stillConnected, "held_s": self.hold])
        guard self.restartTimeout > 0 else { return }
        // The script restarts the engine now: every session drops, then comes back on its own
        // (each agent's jittered backoff); how long, and how spread out (no thundering herd).
        let opened = runners.map(\.sessionsOpened)
        emit(["event": "ready_for_restart"])
        let deadline = clock.now + .seconds(self.restartTimeout)
        var dropped: ContinuousClock.Instant?
        // Each runner's own record of when its new session's dial began and when the engine's hello
        // came back: this loop only polls for completion, so its own (starved) timing is not measured.
        var back = [(dialled: ContinuousClock.Instant, connected: ContinuousClock.Instant)?](repeating: nil, count: runners.count)
        while clock.now < deadline {
            let now = clock.now
            for (index, runner) in runners.enumerated() where back[index] == nil {
                let connected: Bool = if case .connected = runner.phase { true } else { false }
                if dropped == nil && !connected { dropped = now }
                if connected && runner.sessionsOpened > opened[index] { back[index] = runner.lastConnected }
            }
            if back.allSatisfy({ $0 != nil }) { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        let start0 = dropped ?? start
        let times = back.compactMap { $0.map { ($0.connected - start0).timeInterval * 1000 } }.sorted()
        let dials = back.compactMap { $0.map { ($0.dialled - start0).timeInterval * 1000 } }.sorted()
        func at(_ p: Double) -> Double { times.isEmpty ? -1 : times[min(times.count - 1, Int(Double(times.count - 1) * p))] }
        emit([
            "event": "reconnected", "sessions": times.count, "of": runners.count, "all_back_ms": times.last ?? -1,
            "p50_ms": at(0.5), "p99_ms": at(0.99),
            // What the agents did (their dials) and what the engine did (the sessions it established).
            "dials": Self.arrivals(dials), "established": Self.arrivals(times),
        ])
        guard times.count == runners.count else { throw ValidationError("\(runners.count - times.count) sessions did not come back within \(self.restartTimeout) s") }
        // Hold again while the script asks every agent for its facts through the new engine.
        try await Task.sleep(for: .seconds(self.hold))
    }

    /// How bunched arrivals (ms after the drop, sorted) are: the busiest 250 ms window against an
    /// even spread over their whole span, the first one, and the count in each second.
    static func arrivals(_ times: [Double]) -> [String: Any] {
        var windows: [Int: Int] = [:]
        var perSecond = [Int](repeating: 0, count: Int(max(times.last ?? 0, 0) / 1000) + 1)
        for time in times {
            windows[Int(time / 250), default: 0] += 1
            perSecond[max(0, Int(time / 1000))] += 1
        }
        let busiest = windows.max { $0.value < $1.value }
        let span = max((times.last ?? 0) - (times.first ?? 0), 250)
        return [
            "busiest_250ms": busiest?.value ?? 0, "busiest_at_ms": (busiest?.key ?? 0) * 250,
            "even_250ms": Double(times.count) * 250 / span, "first_ms": times.first ?? -1, "per_second": perSecond,
        ]
    }

    func emit(_ object: [String: Any]) {
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }
}

struct Snapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time local-provider snapshots of one sparse disk image.",
        discussion: """
            Makes POOL/disks/bench.img of --size-gib with --data-mib of random data in 64 extents (once), \
            then times --runs group creates (one disk each), deleting each group after. Prints one JSON line.
            """)

    @Option(help: ArgumentHelp("The pool directory.", valueName: "dir"))
    var pool: String
    @Option(help: "Logical size of the image in GiB.")
    var sizeGib = 1
    @Option(help: "MiB of data in the image, spread over 64 extents.")
    var dataMib = 64
    @Option(help: "How many snapshots to time.")
    var runs = 20

    func run() async throws {
        let provider = try LocalProvider(pool: self.pool)
        let path = try provider.diskPath("bench")
        let size = UInt64(self.sizeGib) << 30
        if !FileManager.default.fileExists(atPath: path) {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            let random = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/dev/urandom"))
            let extent = (self.dataMib << 20) / 64
            for index in 0..<64 {
                try handle.seek(toOffset: UInt64(index) * (size / 64))
                try handle.write(contentsOf: try random.read(upToCount: extent) ?? Data())
            }
            try handle.truncate(atOffset: size)
            try handle.synchronize()
            try handle.close()
        }
        var samples: [Double] = []
        var method = ""
        for run in 0..<self.runs {
            let group = try await provider.createGroup(CreateGroupRequest(disks: ["bench"], idempotencyToken: "bench-\(getpid())-\(run)"))
            samples.append(Double(group.spanUs) / 1000)
            method = group.disks[0].method.rawValue
            try await provider.delete(group.id)
        }
        samples.sort()
        func percentile(_ p: Double) -> Double { samples[min(samples.count - 1, Int((Double(samples.count - 1) * p).rounded()))] }
        let line: [String: Any] = [
            "method": method, "size_gib": self.sizeGib, "data_mib": self.dataMib, "runs": self.runs,
            "p50_ms": percentile(0.5), "p99_ms": percentile(0.99), "max_ms": samples.last ?? 0,
        ]
        let data = try JSONSerialization.data(withJSONObject: line, options: [.sortedKeys])
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }
}

struct CatalogWriter: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "catalog-writer",
        abstract: "Write groups into a catalog as fast as possible (the crash test kills this with SIGKILL).",
        discussion: "Begins a run, prints \"started\", then records two-disk groups until --groups are written or it is killed.")

    @Option(help: ArgumentHelp("The catalog file.", valueName: "path"))
    var catalog: String
    @Option(name: .customLong("run"), help: "The run id.")
    var runID: String
    @Option(help: "Stop after this many groups (0: never).")
    var groups = 0

    func run() async throws {
        // Killed with the test that started it, also when that test crashes (it never stops on its own).
        _ = quiesce_die_with_parent()
        let store = try SQLiteCatalog(path: self.catalog)
        try await store.beginRun(RunRecord(id: self.runID, source: "catalog-writer"))
        print("started")
        fflush(nil)
        var index = 0
        while self.groups == 0 || index < self.groups {
            index += 1
            let disks = ["root", "data"].map {
                DiskSnapshot(diskID: $0, snapshotID: "\(index)/\($0)", sizeBytes: 1 << 30, dataBytes: 1 << 20, method: .reflink, durationUs: 500)
            }
            try await store.record(GroupRecord(
                id: "\(self.runID)-g\(index)", runID: self.runID, instanceID: "i-\(index % 7)", provider: "local",
                providerGroupID: "lg-\(index)", idempotencyToken: "\(self.runID)/\(index)", wantedLevel: .application,
                achievedLevel: .filesystem, reasons: [Reason(code: "scripts-missing", message: "no prescript")], state: .ready,
                createdAt: Date(), frozenUs: 1200, disks: disks))
        }
        try await store.finishRun(self.runID, state: .succeeded)
    }
}
