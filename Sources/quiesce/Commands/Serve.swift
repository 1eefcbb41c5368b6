import ArgumentParser
import Foundation
import Logging
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiescePlugins
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
    @OptionGroup var admin: AdminOptions
    @OptionGroup var plugins: PluginOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        do { _ = try ListenAddress(parsing: self.listen) } catch { throw ValidationError("--listen: \(error)") }
    }

    func run() async throws {
        try self.log.bootstrap()
        let listen = try ListenAddress(parsing: self.listen)
        let engine = try makeEngine(listen: listen, caDir: self.caDir, admin: self.admin)
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
                let line = "quiesce engine \(QuiesceVersion.software) listening on \(address); admin socket \(self.admin.socketPath); "
                    + "\(registry.plugins.count) plugins (\(registry.plugins.map(\.name).sorted().joined(separator: ", "))); catalog \(catalogPath)\n"
                BrokenPipes.printOutput(line)
            }
        }
        defer { ready.cancel() }
        do {
            try await engine.run(adminServices: [runs])
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}
