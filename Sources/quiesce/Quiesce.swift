import ArgumentParser
import GRPCNIOTransportHTTP2
import Foundation
import QuiescePlugins
import QuiesceFleet
import Logging
import QuiesceCatalog
import QuiesceCatalogPostgres
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceWire

@main
enum QuiesceMain {
    static func main() async {
        // Tasks run on the event loops that do the engine's network I/O (see ConcurrencyExecutor).
        ConcurrencyExecutor.useEventLoops()
        // A reader of our output that goes away (`quiesce backup | head`) must not end a run with agents frozen.
        BrokenPipes.ignoreSignal()
        await Quiesce.main()
    }
}

struct Quiesce: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiesce",
        abstract: "Application-consistent snapshots of many instances at once.",
        discussion: """
            The engine holds one mutual-TLS session with the agent on each instance; \
            this command runs the engine and talks to a running one.

            Start here:  quiesce demo        (a local fleet on loopback, no set-up)

            Exit codes: 0 success; 1 the operation failed; 64 bad usage (EX_USAGE); \
            69 the engine could not be reached.
            """,
        version: QuiesceVersion.software,
        subcommands: [Demo.self, Backup.self, Serve.self, Agents.self, FactsCommand.self, Plugins.self, PlanCommand.self, Check.self, Snapshots.self, Show.self, Restore.self, Prune.self, Verify.self, Reconcile.self, Schedules.self, CA.self, Token.self, Audit.self]
    )
}

/// Options shared by the commands that talk to a running engine.
struct AdminOptions: ParsableArguments {
    @Option(name: .customLong("admin-socket"), help: ArgumentHelp("The engine's admin socket.", valueName: "path"))
    var socketPath: String = ProcessInfo.processInfo.environment["QUIESCE_ADMIN_SOCKET"] ?? "/run/quiesce/admin.sock"
}

/// The admin API from another machine: TCP with mutual TLS, an operator certificate
/// (`quiesce ca issue --operator NAME --role viewer|operator`). Without --engine-address
/// the local admin socket is used.
struct RemoteAdminOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The engine's remote admin port (quiesce serve --operator-listen); default: the local admin socket.", valueName: "host:port"))
    var engineAddress: String? = ProcessInfo.processInfo.environment["QUIESCE_ENGINE_ADDRESS"]
    @Option(help: ArgumentHelp("With --engine-address: your operator certificate (PEM).", valueName: "path"))
    var cert: String? = ProcessInfo.processInfo.environment["QUIESCE_OPERATOR_CERT"]
    @Option(help: ArgumentHelp("With --engine-address: its private key (PEM).", valueName: "path"))
    var key: String? = ProcessInfo.processInfo.environment["QUIESCE_OPERATOR_KEY"]
    @Option(help: ArgumentHelp("With --engine-address: the CA certificate that signed the engine (PEM).", valueName: "path"))
    var ca: String? = ProcessInfo.processInfo.environment["QUIESCE_OPERATOR_CA"]

    func validate() throws {
        guard let address = self.engineAddress else { return }
        do { _ = try ListenAddress(parsing: address) } catch { throw ValidationError("--engine-address: \(error)") }
        guard self.cert != nil, self.key != nil, self.ca != nil else {
            throw ValidationError("--engine-address needs --cert, --key and --ca (an operator certificate from `quiesce ca issue --operator NAME`)")
        }
    }

    /// The transport to the admin API, and how to name it in errors.
    func transport() throws -> (HTTP2ClientTransport.Posix, String)? {
        guard let address = self.engineAddress else { return nil }
        let files = TLSFiles(certificatePath: self.cert!, keyPath: self.key!, trustRootsPath: self.ca!)
        do { _ = try files.validate() } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
        return (SecureTransports.operatorDialer(engine: try ListenAddress(parsing: address), identity: files), address)
    }
}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case table, json
}

/// Log options shared by the long-running commands.
struct LogOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"
    @Option(help: "Log format on standard error: text, or json (one object per line, for a log shipper).")
    var logFormat: String = "text"

    func validate() throws {
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("expected a log level (trace, debug, info, notice, warning, error, critical), found \"\(self.logLevel)\"")
        }
        guard ["text", "json"].contains(self.logFormat) else {
            throw ValidationError("expected --log-format text or json, found \"\(self.logFormat)\"")
        }
    }

    func bootstrap() throws {
        let level = Logger.Level(rawValue: self.logLevel) ?? .info
        let json = self.logFormat == "json"
        LoggingSystem.bootstrap { label in
            if json {
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}

/// Reads and checks a fleet file; its problems, each with file:line:column, then exit 65.
func loadFleet(_ path: String, plugins: PluginRegistry) throws -> FleetFile {
    do {
        return try FleetFile.load(path, plugins: plugins)
    } catch let error as FleetFileError {
        for problem in error.problems { printError("\(problem)") }
        throw ExitCode(65)
    }
}

enum ExitStatus {
    static let failure = ExitCode(1)
    static let unavailable = ExitCode(69)
}

/// Through `OutputQueue`, after anything a run queued before it; written, with
/// whatever the run queued on stdout, before it returns (an error may end the command).
func printError(_ message: String) {
    OutputQueue.standardError.write("quiesce: " + message + "\n")
    OutputQueue.standardOutput.flush()
    OutputQueue.standardError.flush()
}

/// The catalog at `spec`: a SQLite file (default `$QUIESCE_HOME/catalog.db`) or a PostgreSQL URL
/// that several engines share; an error is a message and exit 1.
func openCatalog(_ spec: String?, lease: Int = 30) async throws -> (catalog: any CatalogStore, path: String) {
    let spec = spec ?? defaultStateDirectory() + "/catalog.db"
    do {
        let catalog = try await CatalogOpener.open(spec, lease: .seconds(max(lease, 3)))
        return (catalog, (catalog as? PostgresCatalog)?.location.description ?? spec)
    } catch let error as CatalogError {
        printError("\(error)")
        throw ExitStatus.failure
    } catch {
        printError("catalog \(spec): \(error)")
        throw ExitStatus.failure
    }
}

/// `--catalog` and `--catalog-lease`, where a command runs fleet backups.
let catalogHelp = ArgumentHelp(
    "The catalog: a SQLite file (default: $QUIESCE_HOME/catalog.db), or postgres://USER@HOST[:PORT]/DB[?schema=S] that several engines share.",
    valueName: "path|url")
let catalogLeaseHelp = ArgumentHelp(
    "With a PostgreSQL catalog: how long this engine's hold on a run and its instances outlives it if it dies (renewed every third of it).",
    valueName: "seconds")

/// An engine listening on `listen` with the identity in `caDir` (default `$QUIESCE_HOME/ca`);
/// an unusable certificate or key is a message and exit 1.
func makeEngine(
    listen: ListenAddress, caDir: String?, admin: AdminOptions, enrolListen: ListenAddress? = nil, auditLog: String? = nil,
    agentValidity: Duration = .seconds(30 * 86_400), operatorListen: ListenAddress? = nil
) throws -> Engine {
    let ca = CADirectory(path: caDir ?? defaultStateDirectory() + "/ca")
    do {
        var configuration = EngineConfiguration(listen: listen, identity: ca.engineFiles, adminSocketPath: admin.socketPath, limits: .defaults)
        // With the CA's key at hand the engine issues (enrolment, renewal) and enforces revocations.
        if FileManager.default.isReadableFile(atPath: ca.caKeyPath) { configuration.caDirectory = ca.path }
        configuration.enrolListen = enrolListen
        configuration.auditLogPath = auditLog
        configuration.agentValidity = agentValidity
        configuration.operatorListen = operatorListen
        return try Engine(configuration: configuration)
    } catch {
        printError("\(error)")
        throw ExitStatus.failure
    }
}

func defaultStateDirectory() -> String {
    ProcessInfo.processInfo.environment["QUIESCE_HOME"] ?? "/var/lib/quiesce"
}
