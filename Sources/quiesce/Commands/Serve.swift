import ArgumentParser
import Foundation
import GRPCCore
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
import ServiceLifecycle
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
    @Option(help: catalogHelp)
    var catalog: String?
    @Option(help: catalogLeaseHelp)
    var catalogLease = 30
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
        do {
            return try await MetricsServer.start(host: listen.hostText, port: listen.port) { metrics.exposition(sessions: await engine.registry.count) }
        } catch {
            printError("--metrics-listen \(address): cannot listen: \(error)")
            throw ExitStatus.failure
        }
    }

    func run() async throws {
        try self.log.bootstrap()
        // One descriptor per agent session: the soft limit goes up to the hard one (LimitNOFILE in the unit).
        let descriptors = raiseOpenFileLimit()
        if descriptors < 4096 {
            printError("warning: this process may open only \(descriptors) descriptors, so at most about \(max(Int(descriptors) - 64, 0)) agents can connect (raise LimitNOFILE / ulimit -n)")
        }
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
        let (catalog, catalogPath) = try await openCatalog(self.catalog, lease: self.catalogLease)
        let fleets = try self.fleets.map { try loadFleet($0, plugins: registry) }
        let metrics = EngineMetrics()
        let runs = FleetRunService(engine: engine, plugins: registry, catalog: catalog, providers: ProviderSet(wrap: metrics.metered),
                                   finished: metrics.record)
        let scheduler = Scheduler(fleets: fleets, runs: runs, statePath: self.scheduleState ?? defaultStateDirectory() + "/schedules.json",
                                  observe: metrics.record)
        let metricsServer = try await self.startMetrics(metrics, engine: engine)
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
        // The catalog commands for remote operators, on this engine's catalog and the providers it recorded.
        let inventory = InventoryService {
            Inventory(catalog: catalog, providers: await ProviderDirectory(catalog: catalog, fleet: nil, localPool: nil, defaultPool: defaultStateDirectory() + "/pool"))
        }
        // swift-service-lifecycle runs the parts and stops them in reverse order: on SIGTERM or
        // SIGINT the schedules stop firing, then the engine drains its runs (instances being backed
        // up finish, a freeze is never cut short) and closes its sessions, then metrics stop. A
        // second signal cancels what is left: the engine stops at once (agents' thaw guards thaw
        // anything still frozen within a second of its silence).
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if let metricsServer { services.append(.init(service: MetricsService(server: metricsServer), serviceName: "metrics")) }
        services.append(.init(service: EngineService(engine: engine, runs: runs, adminServices: [runs, inventory]), serviceName: "engine"))
        services.append(.init(service: SchedulerService(scheduler: scheduler), successTerminationBehavior: .ignore, serviceName: "schedules"))
        var logger = Logger(label: "quiesce.lifecycle")
        logger.logLevel = .warning
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        // The second signal (the service group takes the first): stop the engine now.
        let again = onStopSignals { _, count in if count > 1 { engine.shutdown() } }
        defer { again.forEach { $0.cancel() } }
        do {
            try await group.run()
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}

/// The engine: agent sessions, the admin API, fleet runs. A graceful shutdown drains the runs first.
struct EngineService: Service, CustomStringConvertible {
    let engine: Engine
    let runs: FleetRunService
    let adminServices: [any RegistrableRPCService]
    var description: String { "engine" }

    func run() async throws {
        try await withGracefulShutdownHandler {
            try await self.engine.run(adminServices: self.adminServices)
        } onGracefulShutdown: {
            let running = self.runs.running
            if !running.isEmpty {
                printError("stopping: waiting for the instances of \(running.joined(separator: ", ")) being backed up to finish "
                           + "(no new ones start; signal again to stop now)")
            }
            Task {
                await self.runs.drain(reason: "the engine is shutting down")
                self.engine.shutdown()
            }
        }
    }
}

/// The fleet files' schedules; they stop firing on a graceful shutdown.
struct SchedulerService: Service, CustomStringConvertible {
    let scheduler: Scheduler
    var description: String { "schedules" }

    func run() async throws {
        await cancelWhenGracefulShutdown { await self.scheduler.run() }
        // With nothing to schedule, stay until the group stops (returning early would end nothing, but say little).
        try? await gracefulShutdown()
    }
}

/// The Prometheus endpoint, up until everything else has stopped.
struct MetricsService: Service, CustomStringConvertible {
    let server: MetricsServer
    var description: String { "metrics" }

    func run() async throws {
        try? await gracefulShutdown()
        await self.server.close()
    }
}
