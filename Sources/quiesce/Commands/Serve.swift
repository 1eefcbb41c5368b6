import ArgumentParser
import Foundation
import Logging
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiescePKI
import QuiescePlugins
import QuiesceInventory
import QuiesceProviders
import QuiesceWire
import Synchronization

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the engine: accept agent sessions, serve the admin API, run fleet backups.",
        discussion: """
            Fleet backups come in over the admin socket (`quiesce backup --engine --fleet FILE`) \
            and use this engine's agents, plugins, catalog and providers; runs that share \
            no instance run side by side, and runs on one pool share its rate limit.

            With --fleet FILE (repeatable), the engine also runs the file's `schedules:` by \
            itself: at their cron times in their time zones, never two runs of one schedule \
            at once, a schedule missed while the engine was down run once when it comes \
            back (the last firings are kept in --schedule-state). Each policy's \
            `retention:` is applied after every run. --metrics-listen serves Prometheus \
            metrics at /metrics.

            SIGINT or SIGTERM stops gracefully: no new runs or instances start, instances \
            being backed up finish (a freeze is never cut short), the rest are recorded as \
            not started, then every session closes. A second signal stops at once (the \
            agents' thaw guards thaw anything still frozen).
            """)

    @Option(help: ArgumentHelp("Where agents dial in (mutual TLS).", valueName: "host:port"))
    var listen = "127.0.0.1:7443"
    @Option(help: ArgumentHelp("The CA directory from `quiesce ca init` (default: $QUIESCE_HOME/ca).", valueName: "dir"))
    var caDir: String?
    @Option(help: ArgumentHelp("The catalog fleet runs record into (default: $QUIESCE_HOME/catalog.db).", valueName: "path"))
    var catalog: String?
    @Option(help: ArgumentHelp(
        "Where new agents enrol with a join token (`quiesce token create`; TLS that authenticates the engine, whose CA the agent pins). Off unless given.",
        valueName: "host:port"))
    var enrolListen: String?
    @Option(help: ArgumentHelp("The audit trail: every command sent to an agent, every admin call, enrolments, renewals, revocations (JSON lines; default: $QUIESCE_HOME/audit.jsonl).", valueName: "path"))
    var auditLog: String?
    @Option(help: ArgumentHelp(
        "The admin API over TCP with mutual TLS, for operator certificates (quiesce ca issue --operator NAME --role viewer|operator); agent certificates are refused. Off unless given.",
        valueName: "host:port"))
    var operatorListen: String?
    @Option(help: ArgumentHelp("Lifetime of the agent certificates this engine issues; agents renew at two thirds of it.", valueName: "days"))
    var agentValidityDays: Int = 30
    @Option(name: .customLong("fleet"), help: ArgumentHelp("A fleet file whose schedules this engine runs (repeatable).", valueName: "file"))
    var fleets: [String] = []
    @Option(help: ArgumentHelp("Where the schedules' last firings are kept (default: $QUIESCE_HOME/schedules.json).", valueName: "path"))
    var scheduleState: String?
    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics. Off unless given.", valueName: "host:port"))
    var metricsListen: String?
    @OptionGroup var admin: AdminOptions
    @OptionGroup var plugins: PluginOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        do { _ = try ListenAddress(parsing: self.listen) } catch { throw ValidationError("--listen: \(error)") }
        if let address = self.operatorListen {
            do { _ = try ListenAddress(parsing: address) } catch { throw ValidationError("--operator-listen: \(error)") }
        }
        if let enrol = self.enrolListen {
            do { _ = try ListenAddress(parsing: enrol) } catch { throw ValidationError("--enrol-listen: \(error)") }
        }
        if let metrics = self.metricsListen {
            do { _ = try ListenAddress(parsing: metrics) } catch { throw ValidationError("--metrics-listen: \(error)") }
        }
        guard (1...825).contains(self.agentValidityDays) else {
            throw ValidationError("--agent-validity-days: expected 1–825 days, found \(self.agentValidityDays)")
        }
    }

    /// The Prometheus endpoint, when --metrics-listen is given.
    func startMetrics(_ metrics: EngineMetrics, engine: Engine) async throws -> MetricsServer? {
        guard let address = self.metricsListen else { return nil }
        let listen = try ListenAddress(parsing: address)
        let host: String = switch listen.host {
        case .ipv4(let text), .ipv6(let text), .name(let text): text
        }
        do {
            return try await MetricsServer.start(host: host, port: listen.port) { metrics.exposition(sessions: await engine.registry.count) }
        } catch {
            printError("--metrics-listen \(address): cannot listen: \(error)")
            throw ExitStatus.failure
        }
    }

    func run() async throws {
        try self.log.bootstrap()
        let listen = try ListenAddress(parsing: self.listen)
        let engine = try makeEngine(
            listen: listen, caDir: self.caDir, admin: self.admin, enrolListen: try self.enrolListen.map { try ListenAddress(parsing: $0) },
            auditLog: self.auditLog ?? defaultStateDirectory() + "/audit.jsonl", agentValidity: .seconds(Int64(self.agentValidityDays) * 86_400),
            operatorListen: try self.operatorListen.map { try ListenAddress(parsing: $0) })
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        for failure in registry.failures {
            printError("\(failure) (runs whose policies use it are refused)")
        }
        let (catalog, catalogPath) = try openCatalog(self.catalog)
        let fleets = try self.fleets.map { try loadFleet($0, plugins: registry) }
        let metrics = EngineMetrics()
        let runs = FleetRunService(engine: engine, plugins: registry, catalog: catalog, providers: ProviderSet(wrap: metrics.metered),
                                   finished: metrics.record)
        let scheduler = Scheduler(fleets: fleets, runs: runs, statePath: self.scheduleState ?? defaultStateDirectory() + "/schedules.json",
                                  observe: metrics.record)
        let metricsServer = try await self.startMetrics(metrics, engine: engine)
        let schedules = Task { await scheduler.run() }
        defer {
            schedules.cancel()
            if let metricsServer { Task { await metricsServer.close() } }
        }
        let signals = onStopSignals { _, count in
            let running = runs.running
            if count > 1 || running.isEmpty {
                engine.shutdown()
                return
            }
            printError("stopping: waiting for the instances of \(running.joined(separator: ", ")) being backed up to finish "
                       + "(no new ones start; signal again to stop now)")
            Task {
                await runs.drain(reason: "the engine is shutting down")
                engine.shutdown()
            }
        }
        defer { signals.forEach { $0.cancel() } }
        let ready = Task {
            if let address = try? await engine.listeningAddress() {
                let enrol = (engine.configuration.enrolListen == nil ? "" : ((try? await engine.enrolAddress()).map { "; enrolment on \($0)" } ?? ""))
                    + (engine.configuration.operatorListen == nil ? "" : ((try? await engine.operatorAddress()).map { "; operators on \($0)" } ?? ""))
                let extras = (metricsServer.map { "; metrics on http://\($0.address)/metrics" } ?? "")
                    + (scheduler.entries.isEmpty ? "" : "; \(scheduler.entries.count) schedule\(scheduler.entries.count == 1 ? "" : "s") ("
                        + scheduler.upcoming(after: Date()).map { "\($0.entry.schedule.name) next at \(ISO8601DateFormatter().string(from: $0.at))" }.joined(separator: ", ") + ")")
                let line = "quiesce engine \(QuiesceVersion.software) listening on \(address)\(enrol); admin socket \(self.admin.socketPath); "
                    + "\(registry.plugins.count) plugins (\(registry.plugins.map(\.name).sorted().joined(separator: ", "))); catalog \(catalogPath)\(extras)\n"
                BrokenPipes.printOutput(line)
            }
        }
        defer { ready.cancel() }
        do {
            // The catalog commands for remote operators, on this engine's catalog and the providers it recorded.
            let inventory = InventoryService {
                Inventory(catalog: catalog, providers: ProviderDirectory(catalog: catalog, fleet: nil, localPool: nil, defaultPool: defaultStateDirectory() + "/pool"))
            }
            try await engine.run(adminServices: [runs, inventory])
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}
