import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePKI
import QuiescePlugins
import QuiesceProto
import QuiesceWire

struct Backup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Back up a fleet in one command: every instance at the best level it can prove, then a report.",
        discussion: """
            One shot (the default): the engine starts here, listens for the fleet's agents \
            (they dial --listen with certificates from the same CA), waits up to \
            run.agent_wait_s for them (agents that never connect are reported, not waited \
            on forever), backs every instance up, records the run in the catalog and exits.

            With --engine the run goes to a running `quiesce serve` over its admin socket \
            instead, and uses that engine's agents, CA, catalog and plugins. The run \
            belongs to the engine: Ctrl-C here only stops watching it.

            Per instance: facts → plan from its policy's plugin → a slot at its provider's \
            rate limit (before anything is frozen) → quiesce → snapshot group → thaw → the \
            level the thaw reply proves → tags and catalog.

            --resume RUN takes up a run that was interrupted (the engine killed, the machine \
            rebooted) or that failed: instances it backed up are reported from the catalog \
            and not run again; the rest run with the run's idempotency tokens, so a snapshot \
            group the provider made before the engine died is adopted, never made twice. \
            Without --fleet, the fleet file the run was started with.

            Exit codes: 0 every instance at its wanted level; 2 some downgraded, none below \
            its minimum; 3 some failed (below the minimum, no agent, no snapshot); 1 error; \
            64 bad usage; 65 the fleet file has problems (each printed with file:line:column); \
            69 --engine and no engine answers; 75 --engine and the engine refused the run \
            for now (an instance is in another run, or it is shutting down).
            """)

    @Option(help: ArgumentHelp("The fleet file (YAML): providers, policies, instances. With --resume: default the run's own.", valueName: "file"))
    var fleet: String?
    @Option(help: ArgumentHelp("Take up this interrupted or failed run where it stopped.", valueName: "run-id"))
    var resume: String?
    @Flag(help: "Run through the running `quiesce serve` at --admin-socket instead of starting an engine here.")
    var engine = false
    @Option(help: ArgumentHelp("Where agents dial in (mutual TLS). One shot only; default 127.0.0.1:7443.", valueName: "host:port"))
    var listen: String?
    @Option(help: ArgumentHelp("The CA directory from `quiesce ca init` (default: $QUIESCE_HOME/ca). One shot only.", valueName: "dir"))
    var caDir: String?
    @Option(help: catalogHelp)
    var catalog: String?
    @Option(help: catalogLeaseHelp)
    var catalogLease = 30
    @Option(name: .customLong("run-id"), help: ArgumentHelp("The run's id (default: a new one); rerunning an id makes no duplicate snapshots.", valueName: "id"))
    var runID: String?
    @Option(name: .customLong("agent-wait-s"), help: ArgumentHelp("Override run.agent_wait_s.", valueName: "seconds"))
    var agentWaitSeconds: Int?
    @OptionGroup var admin: AdminOptions
    @OptionGroup var remote: RemoteAdminOptions
    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table (progress on stderr, a report at the end) or json (one JSON object per line).")
    var output: OutputFormat = .table
    @OptionGroup var log: LogOptions

    func validate() throws {
        if let listen = self.listen {
            do { _ = try ListenAddress(parsing: listen) } catch { throw ValidationError("--listen: \(error)") }
        }
        if let id = self.runID, let problem = Coordinator.runIDProblem(id) {
            throw ValidationError("--run-id: \(problem)")
        }
        if let id = self.resume, let problem = Coordinator.runIDProblem(id) {
            throw ValidationError("--resume: \(problem)")
        }
        if self.resume != nil && self.runID != nil { throw ValidationError("--resume: the run's id is its own; leave out --run-id") }
        if self.fleet == nil && self.resume == nil { throw ValidationError("missing --fleet (the fleet file to back up)") }
        if let wait = self.agentWaitSeconds, !(0...86_400).contains(wait) {
            throw ValidationError("--agent-wait-s: expected 0 to 86400, found \(wait)")
        }
        if self.engine {
            let ignored = [("--listen", self.listen != nil), ("--ca-dir", self.caDir != nil), ("--catalog", self.catalog != nil),
                           ("--plugin-path", !self.plugins.pluginPaths.isEmpty)].filter(\.1).map(\.0)
            if !ignored.isEmpty {
                throw ValidationError("\(ignored.joined(separator: ", ")): not with --engine (the running engine uses its own)")
            }
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
        let printer = RunPrinter(json: self.output == .json)
        let report = self.engine ? try await self.runInEngine(printer) : try await self.runHere(printer)
        await printer.finish(report)
        if report.exitCode != 0 { throw ExitCode(report.exitCode) }
    }

    /// One shot: an engine of its own, for this run only.
    func runHere(_ printer: RunPrinter) async throws -> RunReport {
        raiseOpenFileLimit()  // one descriptor per agent session
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        let (catalog, _) = try await openCatalog(self.catalog, lease: self.catalogLease)
        var fleetPath = self.fleet ?? ""
        if let resume = self.resume {
            do {
                let run = try await Coordinator.resumable(resume, catalog: catalog)
                if self.fleet == nil { fleetPath = run.source }
            } catch let refusal as Coordinator.ResumeRefusal {
                printError(refusal.description)
                switch refusal {
                case .finished: throw ExitCode(0)
                case .running: throw ExitCode(75)
                default: throw ExitStatus.failure
                }
            }
        }
        let fleet: FleetFile
        let providers: [String: Coordinator.Provider]
        do {
            fleet = try FleetFile.load(fleetPath, plugins: registry)
            providers = try ProviderSet().providers(for: fleet)
        } catch let error as FleetFileError {
            for problem in error.problems { printError("\(problem)") }
            throw ExitCode(65)
        }
        let engine = try makeEngine(listen: try ListenAddress(parsing: self.listen ?? "127.0.0.1:7443"), caDir: self.caDir, admin: self.admin)
        let engineTask = Task { try await engine.run() }
        defer {
            engine.shutdown()
            engineTask.cancel()
        }
        do {
            let address = try await engine.listeningAddress()
            printer.emit(["event": "engine", "listen": "\(address)", "instances": fleet.instances.count],
                         text: "quiesce: engine listening on \(address); \(fleet.instances.count) instances in \(fleetPath)"
                             + (self.resume.map { "; resuming run \($0)" } ?? ""))
        } catch {
            printError("the engine did not start: \(error)")
            throw ExitStatus.failure
        }
        let runID = self.resume ?? self.runID ?? Coordinator.newRunID()
        printer.start(total: fleet.instances.count)
        let coordinator = Coordinator(engine: engine, plugins: registry, providers: providers, catalog: catalog, fleet: fleet)
        // Ctrl-C (or SIGTERM) once: no new instance starts, those being backed up finish
        // (a freeze is never cut short from here), the rest are reported and the run is
        // recorded. Twice: stop now; agents frozen at that moment thaw by themselves
        // within 1 s of the engine falling silent.
        let signals = onStopSignals { number, count in
            let name = number == SIGINT ? "SIGINT" : "SIGTERM"
            if count > 1 {
                printError("stopping now (\(name) again); agents still frozen thaw by themselves within 1 s; run \(runID) stays unfinished in the catalog")
                Glibc.exit(128 + number)
            }
            coordinator.stopStarting(reason: "interrupted by \(name)")
            printError("stopping: instances being backed up finish, no new ones start (\(name) again to stop now)")
        }
        defer { signals.forEach { $0.cancel() } }
        return await coordinator.run(runID: runID, agentWait: self.agentWaitSeconds.map { .seconds($0) }, resume: self.resume != nil) {
            printer.handle($0)
        }
    }

    /// Through a running `quiesce serve`: the engine checks the file, runs, and streams the events.
    func runInEngine(_ printer: RunPrinter) async throws -> RunReport {
        // Resuming without --fleet: the engine reads the file the run was started with.
        let path = self.fleet.map { URL(fileURLWithPath: $0).standardizedFileURL.path } ?? ""
        var data = Data()
        if let fleet = self.fleet {
            guard let read = FileManager.default.contents(atPath: path) else {
                printError("\(fleet): (file): cannot read the fleet file")
                throw ExitCode(65)
            }
            data = read
        }
        let remote = try self.remote.transport()
        guard remote != nil || FileManager.default.fileExists(atPath: self.admin.socketPath) else {
            printError("no engine admin socket at \(self.admin.socketPath); is `quiesce serve` running? (set --admin-socket or QUIESCE_ADMIN_SOCKET)")
            throw ExitStatus.unavailable
        }
        let request = Quiesce_Admin_V1_RunFleetRequest.with {
            $0.fleetYaml = String(decoding: data, as: UTF8.self)
            $0.fleetPath = path
            $0.runID = self.resume ?? self.runID ?? ""
            $0.agentWaitS = UInt32(self.agentWaitSeconds ?? 0)
            $0.resume = self.resume != nil
        }
        let socket = remote?.1 ?? self.admin.socketPath
        do {
            let proto = try await withGRPCClient(transport: remote?.0 ?? SecureTransports.adminDialer(socketPath: socket)) { client in
                try await Quiesce_Admin_V1_Runs.Client(wrapping: client).runFleet(request) { response in
                    var report: Quiesce_Admin_V1_RunReport?
                    for try await message in response.messages {
                        switch message.event {
                        case .accepted(let accepted):
                            printer.emit(["event": "accepted", "run": accepted.runID, "instances": Int(accepted.instances),
                                          "engine": socket, "listen": accepted.agentListenAddress],
                                         text: "quiesce: run \(accepted.runID) started in the engine at \(socket) "
                                             + "(\(accepted.instances) instances; Ctrl-C stops watching, not the run)")
                            printer.start(total: Int(accepted.instances))
                        case .waiting(let waiting):
                            printer.handle(.waitingForAgents(missing: waiting.instanceIds, wait: .seconds(Int64(waiting.waitS))))
                        case .started(let started):
                            printer.handle(.instanceStarted(started.instanceID))
                        case .finished(let outcome):
                            printer.handle(.instanceFinished(try InstanceOutcome(proto: outcome)))
                        case .report(let sent):
                            report = sent
                        case nil:
                            break
                        }
                    }
                    guard let report else {
                        throw RunEventError(detail: "the stream ended without the run's report")
                    }
                    return report
                }
            }
            return try RunReport(proto: proto)
        } catch let error as RPCError {
            switch error.code {
            case .invalidArgument:
                for line in error.message.split(separator: "\n") { printError(String(line)) }
                throw ExitCode(65)
            case .alreadyExists where self.resume != nil && error.message.hasSuffix("nothing to resume"):
                printError(error.message)
                throw ExitCode(0)
            case .failedPrecondition, .alreadyExists:
                printError(error.message)
                throw ExitCode(75)
            case .notFound:
                printError(error.message)
                throw ExitStatus.failure
            case .unimplemented:
                printError("the engine at \(socket) does not run fleets (it was started without them; use `quiesce serve`)")
                throw ExitStatus.failure
            case .unavailable:
                printError("cannot reach the engine at \(socket): \(error.message)")
                throw ExitStatus.unavailable
            default:
                printError("\(error.code): \(error.message)")
                throw ExitStatus.failure
            }
        } catch let error as RunEventError {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}

/// What a run prints, the same for one-shot runs and runs through an engine:
/// a progress bar on a terminal and the report, or JSON lines. Everything
/// goes through `OutputQueue`: events come from the run's tasks while other
/// instances are frozen, and a reader that is not reading (a pager, a paused
/// terminal) must not hold them up.
final class RunPrinter: @unchecked Sendable {
    let json: Bool
    private let lock = NSLock()
    private var progress: Progress?

    init(json: Bool) { self.json = json }

    func start(total: Int) {
        self.lock.withLock { self.progress = Progress(total: total, enabled: !self.json && isatty(STDERR_FILENO) == 1) }
    }

    func handle(_ event: RunEvent) {
        let progress = self.lock.withLock { self.progress }
        switch event {
        case .waitingForAgents(let missing, let wait):
            self.emit(["event": "waiting", "missing": missing, "wait_s": wait.components.seconds],
                      text: "quiesce: waiting up to \(wait.components.seconds) s for \(missing.count) agent(s): "
                          + Self.someOf(missing))
        case .agentsWaited(let waited, let arrived, let missing):
            let seconds = String(format: "%.2f", waited.timeInterval)
            self.emit(["event": "agents", "waited_ms": waited.milliseconds, "arrived": arrived, "missing": missing],
                      text: "quiesce: \(arrived) agent(s) connected after \(seconds) s"
                          + (missing.isEmpty ? "" : "; still missing: " + Self.someOf(missing)))
        case .providerChecked(let name, let kind, let items):
            let failed = items.filter { !$0.ok }
            self.emit(["event": "check", "provider": name, "kind": kind, "passed": items.count - failed.count,
                       "failed": failed.map { ["instance": $0.instanceID ?? "", "item": $0.item, "detail": $0.detail, "blocking": $0.blocking] }],
                      text: "quiesce: provider \(name) (\(kind)): \(items.count - failed.count) of \(items.count) checks passed"
                          + failed.map { "\n  \($0.blocking ? "failed" : "warning"): \($0.instanceID.map { "\($0): " } ?? "")\($0.item): \($0.detail)" }.joined())
        case .settling(let groups):
            self.emit(["event": "settling", "groups": groups],
                      text: "quiesce: every freeze is over; waiting for \(groups) snapshot group(s) still copying at their provider (their point in time is fixed)")
        case .instanceStarted(let id):
            if self.json { Self.printJSON(["event": "started", "instance": id]) }
            progress?.instanceStarted()
        case .instanceFinished(let outcome):
            if self.json { Self.printJSON(["event": "finished"].merging(outcome.json) { $1 }) }
            progress?.finished(outcome.state)
        case .joinedRun(let engines):
            self.emit(["event": "joined", "engines": engines],
                      text: "quiesce: \(engines.count) other engine(s) are running this run (\(Self.someOf(engines))); this one takes the units whose agents it holds")
        }
    }

    /// Prints the report and waits (on a thread of its own) until everything printed is written.
    func finish(_ report: RunReport) async {
        self.lock.withLock { self.progress }?.done()
        if self.json {
            Self.printJSON(["event": "report", "run": report.runID, "makespan_ms": report.makespan.milliseconds,
                            "agent_wait_ms": report.agentWait.milliseconds, "exit_code": Int(report.exitCode), "other_engines": report.otherEngines,
                            "instances": report.instances.map(\.json), "consistency_groups": report.consistencyGroups.map(\.json)])
        } else {
            OutputQueue.standardOutput.write(report.renderTable() + "\n")
            if report.otherEngines > 0 {
                OutputQueue.standardOutput.write("\(report.otherEngines) more instance(s) of the fleet were backed up by other engines in this run "
                    + "(quiesce snapshots --run \(report.runID))\n")
            }
        }
        _ = try? await DedicatedThread.run(name: "quiesce-output") {
            OutputQueue.standardError.flush()
            OutputQueue.standardOutput.flush()
        }
    }

    func emit(_ value: [String: Any], text: String) {
        if self.json { Self.printJSON(value) } else { OutputQueue.standardError.write(text + "\n") }
    }

    /// The first five instance ids, then "…" when there are more.
    static func someOf(_ ids: [String]) -> String {
        ids.prefix(5).joined(separator: ", ") + (ids.count > 5 ? ", …" : "")
    }

    static func printJSON(_ value: [String: Any]) {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
        OutputQueue.standardOutput.write(Array(data) + Array("\n".utf8))
    }
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
        OutputQueue.standardError.write(line)
    }

    func done() {
        guard self.enabled else { return }
        OutputQueue.standardError.write("\n")
    }
}
