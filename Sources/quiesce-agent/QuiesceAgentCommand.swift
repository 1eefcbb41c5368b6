import ArgumentParser
import Foundation
import Logging
import QuiesceAgent
import QuiesceCore
import QuiescePKI
import QuiesceWire
import SwiftProtobuf

@main
enum AgentMain {
    static func main() async {
        // One session, small work per message: one event loop thread runs the network and every task.
        ConcurrencyExecutor.useEventLoops(threads: 1)
        // A log reader that goes away (a restarted journal) must not end the agent, least of all while frozen.
        BrokenPipes.ignoreSignal()
        await QuiesceAgentCommand.main()
    }
}

struct QuiesceAgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiesce-agent",
        abstract: "The Quiesce guest agent: one per instance, dials out to the engine.",
        discussion: """
            The agent opens one mutual-TLS session to the engine and answers its \
            commands; it needs no inbound port.

            Exit codes: 0 success; 1 failure; 64 bad usage (EX_USAGE).
            """,
        version: QuiesceVersion.software,
        subcommands: [Run.self, Enrol.self, Facts.self]
    )
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Connect to the engine and serve its commands until stopped.",
        discussion: """
            Reconnects with exponential backoff and full jitter whenever the session ends: up to \
            --reconnect-max seconds (30) while no engine has answered yet, and up to \
            --reconnect-max-known seconds (2) once one has, so a one-shot `quiesce backup` (an engine \
            that runs only while it backs up, e.g. from cron) finds this agent within about that long.             An engine holding many sessions asks for a wider spread (up to 2 min) so its restart is             not a thundering herd. With several --engine, each new attempt dials the next one.
            """)

    @Option(help: ArgumentHelp(
        "The engine's agent port. Give it again for each engine that shares the fleet (a PostgreSQL catalog): when a session ends the agent dials the next.",
        valueName: "host:port"))
    var engine: [String] = []
    @Option(help: ArgumentHelp("This agent's certificate (PEM), from `quiesce ca issue --agent ID`.", valueName: "path"))
    var cert: String
    @Option(help: ArgumentHelp("This agent's private key (PEM).", valueName: "path"))
    var key: String
    @Option(help: ArgumentHelp("The CA certificate that signed the engine (PEM).", valueName: "path"))
    var ca: String
    @Option(help: ArgumentHelp("Instance id to announce (default: the certificate's common name).", valueName: "id"))
    var instanceID: String?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"
    @Option(help: ArgumentHelp("The seed's freeze script (run before the freeze).", valueName: "path"))
    var prescript: String = HookLocations.defaults.prescript
    @Option(help: ArgumentHelp("The seed's thaw script (run after the thaw).", valueName: "path"))
    var postscript: String = HookLocations.defaults.postscript
    @Option(help: ArgumentHelp("Directory of named hooks (root-owned, mode 0700 files).", valueName: "path"))
    var hookDir: String = HookLocations.defaults.hookDirectory
    @Option(help: ArgumentHelp("The thaw guard executable (default: quiesce-thaw-guard next to this program).", valueName: "path"))
    var thawGuard: String?
    @Flag(help: "Do not lock the agent's memory (mlockall). Locking keeps it able to thaw when / is frozen.")
    var noMemoryLock = false
    @Option(help: ArgumentHelp(
        "Flush each filesystem (syncfs) just before freezing it: auto (when --syncfs-min-dirty-mib or more is dirty), always, never. The engine may choose per freeze.",
        valueName: "auto|always|never"))
    var syncfs = SyncfsRule.Mode.auto.rawValue
    @Option(help: ArgumentHelp("With --syncfs auto: flush first when this much of the page cache is dirty (Dirty + Writeback, as meminfo counts them).", valueName: "MiB"))
    var syncfsMinDirtyMib = SyncfsRule.defaultMinDirtyMiB
    @Option(help: ArgumentHelp(
        "Expedite the kernel's RCU grace periods while the thaw guard runs FIFREEZE (/sys/kernel/rcu_expedited, set for those milliseconds and put back): an idle filesystem's freeze waits for grace periods, tens of ms on a quiet VM, ~0.5 ms expedited. auto: unless rcu_normal is set; never: leave the kernel alone.",
        valueName: "auto|never"))
    var rcuExpedite = "auto"
    @Option(help: ArgumentHelp("Longest wait between attempts to reach an engine that has never answered.", valueName: "seconds"))
    var reconnectMax: Double = 30
    @Option(help: ArgumentHelp("Longest wait between attempts once an engine has answered (a one-shot backup waits about this long for this agent).", valueName: "seconds"))
    var reconnectMaxKnown: Double = AgentConfiguration.defaultKnownEngineCap.timeInterval
    @Option(help: ArgumentHelp(
        "Play a Windows instance: answer VSS snapshot sets from this scenario file (JSON: OS, volumes played by mounted filesystems, VSS writers and how each behaves per phase; see README, Windows). The hold of writes is a real FIFREEZE of those filesystems through the thaw guard. For tests and demos on Linux.",
        valueName: "path"))
    var vssSimulator: String?
    @Option(help: ArgumentHelp(
        "Read the mount table from this file (mountinfo format) instead of /proc/self/mountinfo: for benches that play many instances on one host, each agent seeing only its own disks.",
        valueName: "path", visibility: .hidden))
    var mountTable: String?

    func validate() throws {
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("expected a log level (trace, debug, info, notice, warning, error, critical), found \"\(self.logLevel)\"")
        }
        if let path = self.mountTable {
            guard let text = FactsCollector.readWhole(path) else {
                throw ValidationError("--mount-table: expected a readable mount table file, found none at \(path)")
            }
            do { _ = try MountInfoEntry.parse(text) } catch { throw ValidationError("--mount-table \(path): \(error)") }
        }
        guard !self.engine.isEmpty else { throw ValidationError("--engine: expected the engine's host:port, found none") }
        for engine in self.engine {
            do { _ = try ListenAddress(parsing: engine) } catch { throw ValidationError("--engine \(engine): \(error)") }
        }
        guard SyncfsRule.Mode(rawValue: self.syncfs) != nil else {
            throw ValidationError("--syncfs: expected auto, always or never, found \"\(self.syncfs)\"")
        }
        guard ["auto", "never"].contains(self.rcuExpedite) else {
            throw ValidationError("--rcu-expedite: expected auto or never, found \"\(self.rcuExpedite)\"")
        }
        for (flag, value) in [("--reconnect-max", self.reconnectMax), ("--reconnect-max-known", self.reconnectMaxKnown)] {
            guard value.isFinite, value >= 0.2, value <= 3600 else {
                throw ValidationError("\(flag): expected seconds between 0.2 and 3600, found \(value)")
            }
        }
        guard self.syncfsMinDirtyMib <= 1 << 30 else {
            throw ValidationError("--syncfs-min-dirty-mib: expected at most \(1 << 30) MiB, found \(self.syncfsMinDirtyMib)")
        }
        if let path = self.vssSimulator {
            do { _ = try VssScenario.load(path: path) } catch { throw ValidationError("--vss-simulator: \(error)") }
        }
    }

    func run() async throws {
        let level = Logger.Level(rawValue: self.logLevel) ?? .info
        // Logs go through the gate: held in memory while anything is frozen.
        LoggingSystem.bootstrap { label in
            var handler = GatedLogHandler(label: label)
            handler.logLevel = level
            return handler
        }
        if !self.noMemoryLock && quiesceLockMemory() != 0 {
            Logger(label: "quiesce.agent").warning("could not lock memory (mlockall); the agent may page while / is frozen")
        }
        let engines = try self.engine.map { try ListenAddress(parsing: $0) }
        let locations = HookLocations(prescript: self.prescript, postscript: self.postscript, hookDirectory: self.hookDir)
        let syncfs = SyncfsRule(mode: SyncfsRule.Mode(rawValue: self.syncfs) ?? .auto, minDirtyBytes: self.syncfsMinDirtyMib << 20)
        let scenario = try self.vssSimulator.map { try VssScenario.load(path: $0) }
        #if os(Windows)
        let backend: (any VssBackend)? = WindowsVssBackend()
        #else
        let backend: (any VssBackend)? = nil
        #endif
        let handler = BuiltinCommandHandler(facts: FactsCollector(mountInfoPath: self.mountTable ?? "/proc/self/mountinfo", hooks: locations), guardExecutable: self.thawGuard, syncfs: syncfs,
                                           expediteRCU: self.rcuExpedite == "auto", vssScenario: scenario, vss: backend)
        var configuration = AgentConfiguration(
            engine: engines[0],
            identity: TLSFiles(certificatePath: self.cert, keyPath: self.key, trustRootsPath: self.ca),
            instanceID: self.instanceID,
            backoff: Backoff(cap: .milliseconds(Int64(self.reconnectMax * 1000))),
            knownEngineCap: .milliseconds(Int64(self.reconnectMaxKnown * 1000)))
        configuration.otherEngines = Array(engines.dropFirst())
        let runner = AgentRunner(configuration: configuration, handler: handler)
        let task = Task { try await runner.run() }
        quiesceUnblockStopSignals()
        let signals = onStopSignals { _, _ in task.cancel() }
        defer { signals.forEach { $0.cancel() } }
        do {
            try await task.value
        } catch {
            BrokenPipes.printError("quiesce-agent: \(error)\n")
            throw ExitCode(1)
        }
    }
}

struct Enrol: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join an engine with a token: make this instance's key, get its certificate.",
        discussion: """
            The key pair is made here and never leaves this machine (DIR/agent.key, mode 0600). \
            The engine is trusted only if its certificate chain ends in the CA whose SHA-256 you \
            give (`quiesce token create` prints both): otherwise nothing is sent. The token and a \
            certificate request go to the engine's enrolment port; the certificate (DIR/agent.pem) \
            and the CA (DIR/ca.pem) come back. With --run the agent then starts, dialling the same \
            engine's agent port. Certificates renew by themselves at two thirds of their life.

            Exit codes: 0 enrolled; 1 refused or unreachable (the reason is printed); 64 bad usage.
            """)

    @Option(help: ArgumentHelp("The engine's enrolment port (quiesce serve --enrol-listen).", valueName: "host:port"))
    var engine: String
    @Option(help: ArgumentHelp("The join token (quiesce token create).", valueName: "token"))
    var token: String
    @Option(help: ArgumentHelp("SHA-256 of the engine's CA certificate, hex (quiesce token create prints it).", valueName: "hex"))
    var caFingerprint: String
    @Option(help: ArgumentHelp("The instance id to enrol as (needed when the token matches a pattern).", valueName: "id"))
    var instanceID: String?
    @Option(help: ArgumentHelp("Where to keep the key, certificate and CA.", valueName: "dir"))
    var dir: String = "/etc/quiesce"
    @Flag(help: "Enrol again with a new key even if this instance has a certificate.")
    var force = false
    @Flag(help: "Then run the agent (as `quiesce-agent run` with these files and the engine's agent port).")
    var run = false
    @Option(help: ArgumentHelp("With --run: the engine's agent port, if not the one the engine reports.", valueName: "port"))
    var agentPort: Int?
    @Option(help: ArgumentHelp("With --run: play a Windows instance (see quiesce-agent run --vss-simulator).", valueName: "path"))
    var vssSimulator: String?
    @Option(help: "Log level (with --run).")
    var logLevel: String = "info"

    func validate() throws {
        do { _ = try ListenAddress(parsing: self.engine) } catch { throw ValidationError("--engine: \(error)") }
        let hex = self.caFingerprint.lowercased().replacingOccurrences(of: ":", with: "")
        guard hex.count == 64, hex.allSatisfy(\.isHexDigit) else {
            throw ValidationError("--ca-fingerprint: expected the CA certificate's SHA-256 as 64 hex digits, found \"\(self.caFingerprint)\"")
        }
    }

    func run() async throws {
        let engine = try ListenAddress(parsing: self.engine)
        let result: Enroller.Result
        do {
            result = try await Enroller.enrol(engine: engine, token: self.token, caFingerprint: self.caFingerprint, instanceID: self.instanceID,
                                              directory: self.dir, force: self.force)
        } catch {
            BrokenPipes.printError("quiesce-agent: enrolment failed: \(error)\n")
            throw ExitCode(1)
        }
        let port = self.agentPort ?? result.agentPort
        print("enrolled as \(result.instanceID): certificate \(result.files.certificatePath) (serial \(result.serial), until \(ISO8601DateFormatter().string(from: result.notAfter)))")
        print("key \(result.files.keyPath) (mode 0600, made here), CA \(result.files.trustRootsPath)")
        let agentAddress = ListenAddress(host: engine.host, port: port)
        print("run: quiesce-agent run --engine \(agentAddress) --cert \(result.files.certificatePath) --key \(result.files.keyPath) --ca \(result.files.trustRootsPath)")
        guard self.run else { return }
        let run = try Run.parse([
            "--engine", "\(agentAddress)", "--cert", result.files.certificatePath, "--key", result.files.keyPath, "--ca", result.files.trustRootsPath,
            "--log-level", self.logLevel,
        ] + (self.vssSimulator.map { ["--vss-simulator", $0] } ?? []))
        try run.validate()
        try await run.run()
    }
}

struct Facts: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the facts this agent would report (no engine needed).")

    @Option(help: "Output format: table or json.")
    var output: String = "table"

    func validate() throws {
        guard ["table", "json"].contains(self.output) else {
            throw ValidationError("expected --output table or json, found \"\(self.output)\"")
        }
    }

    func run() async throws {
        let facts = try await FactsCollector().collect()
        if self.output == "json" {
            var options = JSONEncodingOptions()
            options.preserveProtoFieldNames = true
            options.alwaysPrintInt64sAsNumbers = true
            print(try facts.jsonString(options: options))
            return
        }
        print(facts.summary + "\n")
        print(facts.mountTable())
        print("")
        print(facts.hookTable())
    }
}
