import ArgumentParser
import Foundation
import Logging
import QuiesceAgent
import QuiesceCore
import QuiescePKI
import QuiesceWire

/// Load generators for the scripts in scripts/bench-*.sh. They print JSON
/// lines; the scripts turn them into tables.
@main
struct QuiesceBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiesce-bench",
        abstract: "Load generators behind scripts/bench-*.sh.",
        subcommands: [Sessions.self])
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

    func run() async throws {
        let address = try ListenAddress(parsing: self.engine)
        let ca = CADirectory(path: self.caDir)
        let ids = (1...self.count).map { String(format: "bench-%04d", $0) }
        for id in ids where !FileManager.default.fileExists(atPath: ca.agentFiles(instanceID: id).certificatePath) {
            try ca.issue(.agent(instanceID: id))
        }
        if self.issueOnly { return }
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let runners = ids.map { id in
            AgentRunner(configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: id)), logger: logger)
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
    }

    func emit(_ object: [String: Any]) {
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }
}
