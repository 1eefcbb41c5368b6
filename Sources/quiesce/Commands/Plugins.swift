import ArgumentParser
import Foundation
import QuiesceCore
import QuiesceEngine
import QuiescePluginProto
import QuiescePlugins
import QuiesceProto
import QuiesceWire
import SwiftProtobuf

/// Where plugins are found: shared by `plugins` and `plan`.
struct PluginOptions: ParsableArguments {
    @Option(name: .customLong("plugin-path"), help: ArgumentHelp(
        "A plugin (.so) or a directory of them, searched after the built-ins. Repeatable; QUIESCE_PLUGIN_PATH adds more (colon-separated).",
        valueName: "path"))
    var pluginPaths: [String] = []

    @Option(name: .customLong("plugin-timeout-ms"), help: ArgumentHelp("How long a plugin may take to describe itself or to plan one instance.", valueName: "ms"))
    var timeoutMs: Int = 5000

    func validate() throws {
        guard (100...600_000).contains(self.timeoutMs) else {
            throw ValidationError("--plugin-timeout-ms: expected 100 to 600000, found \(self.timeoutMs)")
        }
    }

    func load() async -> PluginRegistry {
        await PluginRegistry.load(searchPath: .standard(extra: self.pluginPaths), timeout: .milliseconds(Int64(self.timeoutMs)))
    }
}

extension ConsistencyLevel: ExpressibleByArgument {
    public init?(argument: String) { self.init(name: argument) }
    public static var allValueStrings: [String] { Self.allCases.map(\.name) }
}

struct Plugins: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the plugins the engine can load: name, version, platforms, levels, options, path.",
        discussion: """
            Plugins are shared objects behind the C ABI of quiesce_plugin.h, each loaded \
            in a plugin host process of its own. The built-ins (crash, linux-freeze) sit next \
            to the quiesce executable; --plugin-path and QUIESCE_PLUGIN_PATH add more, then \
            ../lib/quiesce/plugins beside the executable, /usr/local/lib/quiesce/plugins and \
            /usr/lib/quiesce/plugins. A plugin must not be writable by group or others and must \
            be owned by root or the engine's user: it runs with the engine's privileges. A plugin \
            that cannot be loaded is listed with the reason; the others still load.

            Exit codes: 0 every plugin loaded; 1 at least one could not be loaded (listed).
            """)

    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws {
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        switch self.output {
        case .json:
            let plugins: [[String: Any]] = try registry.plugins.map { plugin in
                [
                    "path": plugin.path, "abi": plugin.abi,
                    "info": try JSONSerialization.jsonObject(with: Data(plugin.info.jsonString(options: jsonOptions).utf8)),
                ]
            }
            let failures: [[String: Any]] = registry.failures.map {
                ["path": $0.path, "plugin": $0.plugin ?? NSNull(), "code": $0.code.rawValue, "detail": $0.detail]
            }
            print(try jsonText(["plugins": plugins, "failures": failures]))
        case .table:
            if registry.plugins.isEmpty { print("no plugins loaded") }
            var table = TextTable(headers: ["NAME", "VERSION", "ABI", "PLATFORMS", "LEVELS", "PATH"])
            for plugin in registry.plugins {
                table.append([
                    plugin.name, plugin.info.version, plugin.abi,
                    plugin.info.platforms.isEmpty ? "any" : plugin.info.platforms.joined(separator: ","),
                    plugin.info.levels.map(\.name).joined(separator: ","), plugin.path,
                ])
            }
            if !registry.plugins.isEmpty { print(table.render()) }
            for plugin in registry.plugins where !plugin.info.options.isEmpty {
                print("\n\(plugin.name) options:")
                var options = TextTable(headers: ["  OPTION", "TYPE", "DEFAULT", "DESCRIPTION"])
                for option in plugin.info.options {
                    options.append(["  " + option.name, option.typeName, option.defaultValue.text, option.description_p])
                }
                print(options.render())
            }
            if !registry.failures.isEmpty {
                print("\ncould not load:")
                for failure in registry.failures { print("  \(failure)") }
            }
        }
        if !registry.failures.isEmpty { throw ExitStatus.failure }
    }
}

struct PlanCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "Show every step each instance would run, and the level it expects. Freezes nothing.",
        discussion: """
            The plugin plans each instance from its facts: the connected agents of a running \
            engine (all, or those named with --instance), or facts saved with \
            `quiesce facts ID --hook-hashes --output json > ID.json` and given with --facts (the file name \
            without .json is the instance id). Nothing is frozen and no hook runs.

            Example:
              quiesce plan --plugin linux-freeze --option skip_mounts=/boot/efi
              quiesce plan --plugin linux-freeze --facts web-1.json --wanted application --minimum filesystem

            Exit codes: 0 every instance can reach the wanted level; 2 some would be downgraded \
            (at or above the minimum); 3 some would fail (below the minimum) or could not be \
            planned; 1 error; 64 bad usage; 69 the engine could not be reached.
            """)

    @Option(help: "The plugin that plans (see `quiesce plugins`).")
    var plugin: String
    @Option(name: .customLong("option"), help: ArgumentHelp("A plugin option, name=value (repeatable); lists are comma-separated.", valueName: "name=value"))
    var options: [String] = []
    @Option(help: "The level the policy wants.")
    var wanted: ConsistencyLevel = .application
    @Option(help: "The lowest level the policy accepts; below it an instance fails.")
    var minimum: ConsistencyLevel = .crash
    @Option(name: .customLong("freeze-budget-ms"), help: ArgumentHelp("Longest time writes may be blocked.", valueName: "ms"))
    var freezeBudgetMs: UInt32 = 10_000
    @Option(name: .customLong("facts"), help: ArgumentHelp("Plan from saved facts instead of connected agents (repeatable).", valueName: "file.json"))
    var factsFiles: [String] = []
    @Option(name: .customLong("instance"), help: ArgumentHelp("Only this connected instance (repeatable).", valueName: "id"))
    var instances: [String] = []
    @OptionGroup var admin: AdminOptions
    @OptionGroup var remote: RemoteAdminOptions
    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        guard self.minimum <= self.wanted else {
            throw ValidationError("--minimum \(self.minimum.name) is above --wanted \(self.wanted.name)")
        }
        guard (100...3_600_000).contains(self.freezeBudgetMs) else {
            throw ValidationError("--freeze-budget-ms: expected 100 to 3600000, found \(self.freezeBudgetMs)")
        }
        for option in self.options where !option.contains("=") {
            throw ValidationError("--option: expected name=value, found \"\(option)\"")
        }
        if !self.factsFiles.isEmpty && !self.instances.isEmpty {
            throw ValidationError("--facts and --instance do not mix: plan from files or from connected agents")
        }
    }

    func run() async throws {
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        guard let plugin = registry.plugin(named: self.plugin) else {
            let known = registry.plugins.map(\.name).joined(separator: ", ")
            let failed = registry.failures.first { $0.plugin == self.plugin }.map { " (\($0))" } ?? ""
            printError("no plugin named \(self.plugin)\(failed); loaded: \(known.isEmpty ? "none" : known) (see `quiesce plugins`)")
            throw ExitStatus.failure
        }
        var given: [String: OptionInput] = [:]
        for option in self.options {
            let parts = option.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            given[String(parts[0])] = .text(String(parts[1]))
        }
        let policy: PlanPolicy
        do {
            policy = try PlanPolicy.with {
                $0.name = "command-line"
                $0.wanted = self.wanted.planLevel
                $0.minimum = self.minimum.planLevel
                $0.freezeBudgetMs = self.freezeBudgetMs
                $0.options = try plugin.resolveOptions(given)
            }
        } catch let error as PluginError {
            printError(error.detail)
            throw ExitCode.validationFailure
        }

        var results: [PlanResult] = []
        for (instance, facts) in try await self.gatherFacts() {
            switch facts {
            case .success(let facts):
                do {
                    results.append(PlanResult(instance: instance, plan: try await plugin.plan(facts: facts, policy: policy)))
                } catch {
                    results.append(PlanResult(instance: instance, error: "\(error)"))
                }
            case .failure(let error):
                results.append(PlanResult(instance: instance, error: error.text))
            }
        }
        switch self.output {
        case .json: try self.printJSON(results)
        case .table: self.printTable(results)
        }
        if results.contains(where: { $0.plan == nil || ($0.plan.flatMap { ConsistencyLevel($0.expected) } ?? .crash) < self.minimum }) {
            throw ExitCode(3)
        }
        if results.contains(where: { ($0.plan.flatMap { ConsistencyLevel($0.expected) } ?? .crash) < self.wanted }) {
            throw ExitCode(2)
        }
    }

    struct PlanResult {
        var instance: String
        var plan: Plan?
        var error: String?
        init(instance: String, plan: Plan) { self.instance = instance; self.plan = plan }
        init(instance: String, error: String) { self.instance = instance; self.error = error }
    }

    struct FactsProblem: Error { var text: String }

    /// (instance, facts or why not) for every instance to plan.
    func gatherFacts() async throws -> [(String, Result<InstanceFacts, FactsProblem>)] {
        if !self.factsFiles.isEmpty {
            return self.factsFiles.map { file in
                let instance = URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent
                guard let data = FileManager.default.contents(atPath: file) else {
                    return (instance, .failure(FactsProblem(text: "cannot read \(file)")))
                }
                do {
                    var options = JSONDecodingOptions()
                    options.ignoreUnknownFields = false
                    let facts = try Facts(jsonUTF8Data: data, options: options)
                    let capabilities = ["facts", "hooks", "fsfreeze", "holds"]
                    return (instance, .success(InstanceFacts(instanceID: instance, facts: facts, capabilities: capabilities)))
                } catch {
                    return (instance, .failure(FactsProblem(
                        text: "\(file) is not the JSON of quiesce.agent.v1.Facts (as `quiesce facts ID --hook-hashes --output json` prints): \(error)")))
                }
            }
        }
        let admin = self.admin, remote = self.remote, wantedInstances = self.instances
        return try await withAdminClient(admin, remote: remote) { client in
            let agents = try await client.listAgents(Quiesce_Admin_V1_ListAgentsRequest()).agents
            var chosen = agents
            if !wantedInstances.isEmpty {
                chosen = agents.filter { wantedInstances.contains($0.instanceID) }
            }
            var results: [(String, Result<InstanceFacts, FactsProblem>)] = []
            for missing in wantedInstances where !agents.contains(where: { $0.instanceID == missing }) {
                results.append((missing, .failure(FactsProblem(text: "not connected"))))
            }
            for agent in chosen.sorted(by: { $0.instanceID < $1.instanceID }) {
                do {
                    var request = Quiesce_Admin_V1_GetFactsRequest()
                    request.instanceID = agent.instanceID
                    request.includeHookHashes = true
                    let facts = try await client.getFacts(request).facts
                    results.append((agent.instanceID, .success(InstanceFacts(instanceID: agent.instanceID, facts: facts, capabilities: agent.capabilities))))
                } catch {
                    results.append((agent.instanceID, .failure(FactsProblem(text: "no facts: \(error)"))))
                }
            }
            return results
        }
    }

    func printTable(_ results: [PlanResult]) {
        if results.isEmpty { print("no instances to plan (no agents connected; or give --facts)") }
        for result in results {
            guard let plan = result.plan else {
                print("\(result.instance): cannot plan: \(result.error ?? "")\n")
                continue
            }
            let expected = ConsistencyLevel(plan.expected) ?? .crash
            let verdict = expected < self.minimum ? "  FAILS: below the minimum \(self.minimum.name)"
                : expected < self.wanted ? "  (downgraded from \(self.wanted.name))" : ""
            print("\(result.instance): \(plan.plugin) → \(expected.name)\(verdict)")
            for reason in plan.reasons { print("  why: \(reason)") }
            let phases = [("prepare", plan.prepare), ("quiesce", plan.quiesce), ("snapshot", []), ("thaw", plan.thaw), ("cleanup", plan.cleanup)]
            var table = TextTable(headers: ["  PHASE", "STEP", "ACTION", "TIMEOUT", "BLOCKS", "UNDO", "IF IT FAILS"])
            for (phase, steps) in phases {
                if phase == "snapshot" {
                    table.append(["  snapshot", "-", "snapshot the instance's disks (provider)", "", "", "", ""])
                }
                for step in steps {
                    table.append([
                        "  " + phase, step.id, step.actionSummary, "\(step.timeoutMs) ms", step.blocking ? "yes" : "",
                        step.undo, step.failureSummary,
                    ])
                }
            }
            print(table.render())
            // How the write-holding step's level is proven at run time (ActionKind.proof).
            if let step = plan.quiesce.first(where: { ActionKind.of($0.action)?.holdsWrites == true }), let kind = ActionKind.of(step.action) {
                print("  proof: \(kind.proof)")
            }
            if plan.quiesceRetries > 0 { print("  retries: the quiesce phase is tried up to \(plan.quiesceRetries + 1) times") }
            print("")
        }
        let levels = results.compactMap { $0.plan.flatMap { ConsistencyLevel($0.expected) } }
        let counts = ConsistencyLevel.allCases.reversed().map { level in "\(levels.filter { $0 == level }.count) \(level.name)" }
        let failing = results.filter { $0.plan == nil || (ConsistencyLevel($0.plan!.expected) ?? .crash) < self.minimum }.count
        print("\(results.count) instance\(results.count == 1 ? "" : "s"): \(counts.joined(separator: ", ")); \(failing) would fail. Nothing was frozen.")
    }

    func printJSON(_ results: [PlanResult]) throws {
        let items: [[String: Any]] = try results.map { result in
            var item: [String: Any] = ["instance": result.instance, "wanted": self.wanted.name, "minimum": self.minimum.name]
            if let plan = result.plan {
                let expected = ConsistencyLevel(plan.expected) ?? .crash
                item["expected"] = expected.name
                item["meets_minimum"] = expected >= self.minimum
                item["plan"] = try JSONSerialization.jsonObject(with: Data(plan.jsonString(options: jsonOptions).utf8))
            } else {
                item["error"] = result.error ?? ""
            }
            return item
        }
        print(try jsonText(items))
    }
}

func jsonText(_ value: Any) throws -> String {
    String(decoding: try JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]), as: UTF8.self)
}
