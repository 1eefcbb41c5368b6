import ArgumentParser
import Foundation
import Logging
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePKI
import QuiescePlugins
import QuiesceWire

struct Backup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Back up a fleet in one command: start the engine, wait for the agents, snapshot every instance, report.",
        discussion: """
            One shot: the engine listens for the fleet's agents (they dial --listen with \
            certificates from the same CA), waits up to run.agent_wait_s for them (agents \
            that never connect are reported, not waited on forever), backs every instance up \
            at the best level it can prove, records the run in the catalog and exits.

            Per instance: facts → plan from its policy's plugin → a slot at its provider's \
            rate limit (before anything is frozen) → quiesce → snapshot group → thaw → the \
            level the thaw reply proves → tags and catalog.

            Exit codes: 0 every instance at its wanted level; 2 some downgraded, none below \
            its minimum; 3 some failed (below the minimum, no agent, no snapshot); 1 error; \
            64 bad usage; 65 the fleet file has problems (each printed with file:line:column).
            """)

    @Option(help: ArgumentHelp("The fleet file (YAML): providers, policies, instances.", valueName: "file"))
    var fleet: String
    @Option(help: ArgumentHelp("Where agents dial in (mutual TLS).", valueName: "host:port"))
    var listen = "127.0.0.1:7443"
    @Option(help: ArgumentHelp("The CA directory from `quiesce ca init` (default: $QUIESCE_HOME/ca).", valueName: "dir"))
    var caDir: String?
    @Option(help: ArgumentHelp("The catalog (default: $QUIESCE_HOME/catalog.db).", valueName: "path"))
    var catalog: String?
    @Option(name: .customLong("run-id"), help: ArgumentHelp("The run's id (default: a new one); rerunning an id makes no duplicate snapshots.", valueName: "id"))
    var runID: String?
    @Option(name: .customLong("agent-wait-s"), help: ArgumentHelp("Override run.agent_wait_s.", valueName: "seconds"))
    var agentWaitSeconds: Int?
    @OptionGroup var admin: AdminOptions
    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table (progress on stderr, a report at the end) or json (one JSON object per line).")
    var output: OutputFormat = .table
    @OptionGroup var log: LogOptions

    func validate() throws {
        do { _ = try ListenAddress(parsing: self.listen) } catch { throw ValidationError("--listen: \(error)") }
        if let id = self.runID, id.isEmpty || id.count > 64 || id.contains(where: { !($0.isLetter || $0.isNumber || "-_.".contains($0)) }) {
            throw ValidationError("--run-id: expected letters, digits, '-', '_' or '.', found \"\(id)\"")
        }
    }

    func run() async throws {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            // The report says what happened; the engine's own log (sessions opening and
            // closing) only on request (--log-level debug or trace).
            let given = Logger.Level(rawValue: self.log.logLevel) ?? .info
            handler.logLevel = given <= .debug ? given : .error
            return handler
        }
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        let fleet: FleetFile
        do {
            fleet = try FleetFile.load(self.fleet, plugins: registry)
        } catch let error as FleetFileError {
            for problem in error.problems { printError("\(problem)") }
            throw ExitCode(65)
        }
        var providers: [String: Coordinator.Provider] = [:]
        for spec in fleet.providers {
            do {
                let provider = try LocalProvider(pool: spec.pool, createBurst: spec.burst, createsPerSecond: spec.perSecond)
                providers[spec.name] = .init(provider: provider, bucket: TokenBucket(burst: spec.burst, perSecond: spec.perSecond))
            } catch {
                printError("\(self.fleet):\(spec.line): provider \(spec.name): \(error)")
                throw ExitStatus.failure
            }
        }
        let catalogPath = self.catalog ?? defaultStateDirectory() + "/catalog.db"
        let catalog: SQLiteCatalog
        do {
            catalog = try SQLiteCatalog(path: catalogPath)
        } catch {
            printError("catalog \(catalogPath): \(error)")
            throw ExitStatus.failure
        }
        let ca = CADirectory(path: self.caDir ?? defaultStateDirectory() + "/ca")
        let engine: Engine
        do {
            engine = try Engine(configuration: EngineConfiguration(
                listen: try ListenAddress(parsing: self.listen), identity: ca.engineFiles, adminSocketPath: self.admin.socketPath, limits: .defaults))
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
        let engineTask = Task { try await engine.run() }
        defer {
            engine.shutdown()
            engineTask.cancel()
        }
        do {
            let address = try await engine.listeningAddress()
            self.emit(["event": "engine", "listen": "\(address)", "instances": fleet.instances.count], text: "quiesce: engine listening on \(address); \(fleet.instances.count) instances in \(self.fleet)")
        } catch {
            printError("the engine did not start: \(error)")
            throw ExitStatus.failure
        }

        let runID = self.runID ?? Self.newRunID()
        let progress = Progress(total: fleet.instances.count, enabled: self.output == .table && isatty(STDERR_FILENO) == 1)
        let coordinator = Coordinator(engine: engine, plugins: registry, providers: providers, catalog: catalog, fleet: fleet)
        let json = self.output == .json
        let report = await coordinator.run(runID: runID, agentWait: self.agentWaitSeconds.map { .seconds($0) }) { event in
            switch event {
            case .waitingForAgents(let missing):
                if json { Self.printJSON(["event": "waiting", "missing": missing]) }
                else { FileHandle.standardError.write(Data("quiesce: waiting up to \(fleet.agentWaitSeconds) s for \(missing.count) agent(s): \(missing.prefix(5).joined(separator: ", "))\(missing.count > 5 ? ", …" : "")\n".utf8)) }
            case .instanceStarted(let id):
                if json { Self.printJSON(["event": "started", "instance": id]) }
                progress.instanceStarted()
            case .instanceFinished(let outcome):
                if json { Self.printJSON(["event": "finished"].merging(outcome.json) { $1 }) }
                progress.finished(outcome.state)
            }
        }
        progress.done()
        if json {
            Self.printJSON(["event": "report", "run": runID, "makespan_ms": report.makespan.milliseconds, "exit_code": Int(report.exitCode),
                            "instances": report.instances.map(\.json)])
        } else {
            self.printTable(report)
        }
        if report.exitCode != 0 { throw ExitCode(report.exitCode) }
    }

    static func newRunID() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        return "run-\(formatter.string(from: Date()))-\(String(UInt32.random(in: 0...0xffff), radix: 16))"
    }

    static func printJSON(_ value: [String: Any]) {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }

    func emit(_ value: [String: Any], text: String) {
        if self.output == .json { Self.printJSON(value) } else { FileHandle.standardError.write(Data((text + "\n").utf8)) }
    }

    func printTable(_ report: RunReport) { print(report.renderTable()) }
}

/// A one-line progress bar on a terminal: counts by state, rate, ETA.
final class Progress: @unchecked Sendable {
    let total: Int
    let enabled: Bool
    let begin = ContinuousClock.now
    private let lock = NSLock()
    private var running = 0, succeeded = 0, downgraded = 0, failed = 0

    init(total: Int, enabled: Bool) {
        self.total = total
        self.enabled = enabled
    }

    func instanceStarted() { self.lock.withLock { self.running += 1 }; self.draw() }

    func finished(_ state: InstanceRecord.State) {
        self.lock.withLock {
            self.running -= 1
            switch state {
            case .succeeded: self.succeeded += 1
            case .downgraded: self.downgraded += 1
            default: self.failed += 1
            }
        }
        self.draw()
    }

    func draw() {
        guard self.enabled else { return }
        let line: String = self.lock.withLock {
            let done = self.succeeded + self.downgraded + self.failed
            let elapsed = (ContinuousClock.now - self.begin).timeInterval
            let rate = elapsed > 0 ? Double(done) / elapsed : 0
            let eta = rate > 0 ? String(format: "%.0fs", Double(self.total - done) / rate) : "?"
            let width = 24, filled = self.total > 0 ? width * done / self.total : width
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            return "\r[\(bar)] \(done)/\(self.total)  running \(self.running)  ok \(self.succeeded)  downgraded \(self.downgraded)  failed \(self.failed)  \(String(format: "%.1f", rate))/s  ETA \(eta)  "
        }
        FileHandle.standardError.write(Data(line.utf8))
    }

    func done() {
        guard self.enabled else { return }
        FileHandle.standardError.write(Data("\n".utf8))
    }
}
