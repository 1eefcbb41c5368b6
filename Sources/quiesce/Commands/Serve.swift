import ArgumentParser
import Foundation
import Logging
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
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
        guard (1...825).contains(self.agentValidityDays) else {
            throw ValidationError("--agent-validity-days: expected 1–825 days, found \(self.agentValidityDays)")
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
        let runs = FleetRunService(engine: engine, plugins: registry, catalog: catalog)
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
                let line = "quiesce engine \(QuiesceVersion.software) listening on \(address)\(enrol); admin socket \(self.admin.socketPath); "
                    + "\(registry.plugins.count) plugins (\(registry.plugins.map(\.name).sorted().joined(separator: ", "))); catalog \(catalogPath)\n"
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
