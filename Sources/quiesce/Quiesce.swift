import ArgumentParser
import Foundation
import Logging
import QuiesceCatalog
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
        subcommands: [Demo.self, Backup.self, Serve.self, Agents.self, FactsCommand.self, Plugins.self, PlanCommand.self, Check.self, Snapshots.self, Show.self, Restore.self, Prune.self, Verify.self, CA.self, Token.self, Audit.self]
    )
}

/// Options shared by the commands that talk to a running engine.
struct AdminOptions: ParsableArguments {
    @Option(name: .customLong("admin-socket"), help: ArgumentHelp("The engine's admin socket.", valueName: "path"))
    var socketPath: String = ProcessInfo.processInfo.environment["QUIESCE_ADMIN_SOCKET"] ?? "/run/quiesce/admin.sock"
}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case table, json
}

/// Log options shared by the long-running commands.
struct LogOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("expected a log level (trace, debug, info, notice, warning, error, critical), found \"\(self.logLevel)\"")
        }
    }

    func bootstrap() throws {
        let level = Logger.Level(rawValue: self.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
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

/// The catalog at `path` (default `$QUIESCE_HOME/catalog.db`); an error is a message and exit 1.
func openCatalog(_ path: String?) throws -> (catalog: SQLiteCatalog, path: String) {
    let path = path ?? defaultStateDirectory() + "/catalog.db"
    do {
        return (try SQLiteCatalog(path: path), path)
    } catch {
        printError("catalog \(path): \(error)")
        throw ExitStatus.failure
    }
}

/// An engine listening on `listen` with the identity in `caDir` (default `$QUIESCE_HOME/ca`);
/// an unusable certificate or key is a message and exit 1.
func makeEngine(
    listen: ListenAddress, caDir: String?, admin: AdminOptions, enrolListen: ListenAddress? = nil, auditLog: String? = nil,
    agentValidity: Duration = .seconds(30 * 86_400)
) throws -> Engine {
    let ca = CADirectory(path: caDir ?? defaultStateDirectory() + "/ca")
    do {
        var configuration = EngineConfiguration(listen: listen, identity: ca.engineFiles, adminSocketPath: admin.socketPath, limits: .defaults)
        // With the CA's key at hand the engine issues (enrolment, renewal) and enforces revocations.
        if FileManager.default.isReadableFile(atPath: ca.caKeyPath) { configuration.caDirectory = ca.path }
        configuration.enrolListen = enrolListen
        configuration.auditLogPath = auditLog
        configuration.agentValidity = agentValidity
        return try Engine(configuration: configuration)
    } catch {
        printError("\(error)")
        throw ExitStatus.failure
    }
}

func defaultStateDirectory() -> String {
    ProcessInfo.processInfo.environment["QUIESCE_HOME"] ?? "/var/lib/quiesce"
}
