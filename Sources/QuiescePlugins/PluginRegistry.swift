import Foundation
import QuiesceCore
import QuiescePluginProto
import SwiftProtobuf

/// A loaded plugin: its info, and the host process it runs in.
///
/// Calls to one plugin are made one at a time. When a call crashes the host or
/// overruns its timeout, that call fails and the next one starts a new host.
public actor Plugin {
    public nonisolated let path: String
    public nonisolated let info: PluginInfo
    public nonisolated let abiVersion: UInt32
    public nonisolated let structSize: UInt32
    let hostExecutable: String
    let timeout: Duration
    private var host: PluginHostProcess?

    init(path: String, info: PluginInfo, hello: PluginHostProcess.Hello, host: PluginHostProcess, hostExecutable: String, timeout: Duration) {
        self.path = path
        self.info = info
        self.abiVersion = hello.abiVersion
        self.structSize = hello.structSize
        self.host = host
        self.hostExecutable = hostExecutable
        self.timeout = timeout
    }

    public nonisolated var name: String { self.info.name }
    /// "1.0" — the ABI version the plugin was built against.
    public nonisolated var abi: String { "\(self.abiVersion >> 16).\(self.abiVersion & 0xffff)" }

    /// The policy's options checked against this plugin's schema, defaults filled in.
    public nonisolated func resolveOptions(_ given: [String: OptionInput]) throws -> [String: OptionValue] {
        try self.info.resolveOptions(given, path: self.path)
    }

    /// Asks the plugin for a plan and validates it.
    /// - Parameter policy: its options must come from ``resolveOptions(_:)``.
    /// - Throws: `PluginError` (refused, crashed, timed-out, undecodable-plan, invalid-plan …).
    public func plan(facts: InstanceFacts, policy: PlanPolicy, timeout: Duration? = nil) async throws -> Plan {
        let platforms = self.info.platforms
        if !platforms.isEmpty, !platforms.contains(facts.osFamily) {
            throw self.error(.refused, "plans for \(platforms.joined(separator: ", ")) instances; \(facts.instanceID) is \(facts.osFamily.isEmpty ? "of an unknown OS" : facts.osFamily)")
        }
        let request = PlanRequest.with {
            $0.facts = facts
            $0.policy = policy
        }
        let bytes: [UInt8] = try request.serializedBytes()
        let host = try await self.liveHost()
        let reply: PluginHostProcess.Reply
        do {
            reply = try await host.plan(bytes, timeout: timeout ?? self.timeout)
        } catch var error as PluginError {
            self.host = nil
            error.plugin = self.info.name
            throw error
        }
        switch reply {
        case .refused(let text):
            throw self.error(.refused, text.isEmpty ? "the plugin refused without a message" : text)
        case .plan(let data):
            let plan: Plan
            do {
                plan = try Plan(serializedBytes: data)
            } catch {
                throw self.error(.undecodablePlan, "its answer (\(data.count) bytes) is not a quiesce.plugin.v1.Plan: \(error)")
            }
            var problems = PlanValidator.problems(in: plan, policy: policy)
            if !plan.plugin.isEmpty && plan.plugin != self.info.name {
                problems.insert("names itself \(plan.plugin), but the plugin is \(self.info.name)", at: 0)
            }
            guard problems.isEmpty else {
                throw self.error(.invalidPlan, "plan for \(facts.instanceID): " + problems.joined(separator: "; "))
            }
            var valid = plan
            valid.plugin = self.info.name
            return valid
        }
    }

    func shutdown() async {
        await self.host?.stop()
        self.host = nil
    }

    private func liveHost() async throws -> PluginHostProcess {
        if let host = self.host, host.isAlive { return host }
        do {
            let (host, hello) = try await PluginHostProcess.start(executable: self.hostExecutable, pluginPath: self.path, timeout: self.timeout)
            let info = try? PluginInfo(serializedBytes: hello.info)
            guard info?.name == self.info.name else {
                await host.stop()
                throw self.error(.hostFailed, "restarted, the library now describes itself as \(info?.name ?? "something undecodable")")
            }
            self.host = host
            return host
        } catch var error as PluginError {
            error.plugin = self.info.name
            throw error
        }
    }

    private func error(_ code: PluginError.Code, _ detail: String) -> PluginError {
        PluginError(code, plugin: self.info.name, path: self.path, detail)
    }
}

/// Where plugins are looked for, in order (the first plugin of a name wins).
public struct PluginSearchPath: Sendable {
    public struct Entry: Sendable {
        public var path: String
        /// Named by the operator: a missing entry is an error, not silently skipped.
        public var explicit: Bool
        /// Only files with this prefix are plugins (the built-ins next to the executables).
        public var prefix: String

        public init(path: String, explicit: Bool, prefix: String = "") {
            self.path = path
            self.explicit = explicit
            self.prefix = prefix
        }
    }

    public var entries: [Entry]

    public init(entries: [Entry]) { self.entries = entries }

    /// The built-ins next to the running executable (so no plugin can take a
    /// built-in's name), then `--plugin-path` entries, then `QUIESCE_PLUGIN_PATH`
    /// (colon-separated), then ../lib/quiesce/plugins beside the executable,
    /// /usr/local/lib/quiesce/plugins and /usr/lib/quiesce/plugins.
    public static func standard(extra: [String] = [], environment: [String: String] = ProcessInfo.processInfo.environment) -> Self {
        var entries = [Entry(path: Self.executableDirectory, explicit: false, prefix: "libquiesce-plugin-")]
        entries += extra.map { Entry(path: $0, explicit: true, prefix: "") }
        for path in (environment["QUIESCE_PLUGIN_PATH"] ?? "").split(separator: ":") where !path.isEmpty {
            entries.append(Entry(path: String(path), explicit: true, prefix: ""))
        }
        entries.append(Entry(path: Self.executableDirectory + "/../lib/quiesce/plugins", explicit: false, prefix: ""))
        entries.append(Entry(path: "/usr/local/lib/quiesce/plugins", explicit: false, prefix: ""))
        entries.append(Entry(path: "/usr/lib/quiesce/plugins", explicit: false, prefix: ""))
        return Self(entries: entries)
    }

    public static var executableDirectory: String {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return (executable as NSString).deletingLastPathComponent
    }

    /// The plugin files, in search order; problems with explicit entries as errors.
    func candidates() -> (files: [String], errors: [PluginError]) {
        var files: [String] = [], errors: [PluginError] = []
        var seen: Set<String> = []
        for entry in self.entries {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: entry.path, isDirectory: &isDirectory) else {
                if entry.explicit { errors.append(PluginError(.notFound, path: entry.path, "no such file or directory on the plugin path")) }
                continue
            }
            let found: [String]
            if isDirectory.boolValue {
                guard let names = try? FileManager.default.contentsOfDirectory(atPath: entry.path) else {
                    errors.append(PluginError(.loadFailed, path: entry.path, "cannot list the plugin directory"))
                    continue
                }
                found = names.filter { $0.hasSuffix(".so") && $0.hasPrefix(entry.prefix) }.sorted().map { entry.path + "/" + $0 }
            } else {
                found = [entry.path]
            }
            for file in found {
                let canonical = (file as NSString).standardizingPath
                if seen.insert(canonical).inserted { files.append(canonical) }
            }
        }
        return (files, errors)
    }
}

/// Every plugin found on the search path, loaded in its own host process, and
/// every one that could not be, with the reason.
public final class PluginRegistry: Sendable {
    public let plugins: [Plugin]
    public let failures: [PluginError]

    init(plugins: [Plugin], failures: [PluginError]) {
        self.plugins = plugins
        self.failures = failures
    }

    public func plugin(named name: String) -> Plugin? {
        self.plugins.first { $0.name == name }
    }

    /// `quiesce-plugin-host` next to the running executable, or `QUIESCE_PLUGIN_HOST`.
    public static func defaultHostExecutable(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        environment["QUIESCE_PLUGIN_HOST"] ?? PluginSearchPath.executableDirectory + "/quiesce-plugin-host"
    }

    /// Loads every plugin on `searchPath`. Never throws: a plugin that cannot be
    /// loaded is listed in ``failures`` and the others load.
    public static func load(
        searchPath: PluginSearchPath = .standard(), hostExecutable: String = PluginRegistry.defaultHostExecutable(),
        timeout: Duration = .seconds(5)
    ) async -> PluginRegistry {
        let (files, searchErrors) = searchPath.candidates()
        if !FileManager.default.isExecutableFile(atPath: hostExecutable) {
            let hostError = files.map { PluginError(.hostFailed, path: $0, "the plugin host \(hostExecutable) is missing (it is built and installed next to quiesce)") }
            return PluginRegistry(plugins: [], failures: searchErrors + hostError)
        }
        let results = await withTaskGroup(of: (Int, Result<Plugin, PluginError>).self) { group in
            for (index, file) in files.enumerated() {
                group.addTask { (index, await Self.loadOne(file, hostExecutable: hostExecutable, timeout: timeout)) }
            }
            var results: [(Int, Result<Plugin, PluginError>)] = []
            for await result in group { results.append(result) }
            return results.sorted { $0.0 < $1.0 }.map(\.1)
        }
        var plugins: [Plugin] = [], failures = searchErrors, ignored: [Plugin] = []
        for result in results {
            switch result {
            case .success(let plugin):
                if let first = plugins.first(where: { $0.name == plugin.name }) {
                    failures.append(PluginError(.duplicateName, plugin: plugin.name, path: plugin.path,
                                                "a plugin named \(plugin.name) is already loaded from \(first.path); this one is ignored"))
                    ignored.append(plugin)
                } else {
                    plugins.append(plugin)
                }
            case .failure(let error):
                failures.append(error)
            }
        }
        for plugin in ignored { await plugin.shutdown() }
        return PluginRegistry(plugins: plugins.sorted { $0.name < $1.name }, failures: failures)
    }

    /// A plugin runs with the engine's privileges: refuse one that someone else could have replaced.
    static func checkOwnership(_ path: String) -> PluginError? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }  // dlopen reports it
        let mode = String(info.st_mode & 0o7777, radix: 8)
        if info.st_mode & 0o022 != 0 {
            return PluginError(.unsafePermissions, path: path,
                               "the file is writable by group or others (mode 0\(mode)); a plugin runs with the engine's privileges (chmod go-w)")
        }
        if info.st_uid != 0 && info.st_uid != geteuid() {
            return PluginError(.unsafePermissions, path: path, "the file is owned by uid \(info.st_uid), neither root nor the engine's user (uid \(geteuid()))")
        }
        return nil
    }

    static func loadOne(_ path: String, hostExecutable: String, timeout: Duration) async -> Result<Plugin, PluginError> {
        if let problem = Self.checkOwnership(path) { return .failure(problem) }
        do {
            let (host, hello) = try await PluginHostProcess.start(executable: hostExecutable, pluginPath: path, timeout: timeout)
            let info: PluginInfo
            do {
                info = try PluginInfo(serializedBytes: hello.info)
            } catch {
                await host.stop()
                return .failure(PluginError(.undecodableInfo, path: path,
                                            "describe answered \(hello.info.count) bytes that are not a quiesce.plugin.v1.PluginInfo: \(error)"))
            }
            let problems = PlanValidator.problems(in: info)
            guard problems.isEmpty else {
                await host.stop()
                return .failure(PluginError(.invalidInfo, plugin: info.name.isEmpty ? nil : info.name, path: path, problems.joined(separator: "; ")))
            }
            return .success(Plugin(path: path, info: info, hello: hello, host: host, hostExecutable: hostExecutable, timeout: timeout))
        } catch let error as PluginError {
            return .failure(error)
        } catch {
            return .failure(PluginError(.hostFailed, path: path, "\(error)"))
        }
    }

    /// Stops every host process.
    public func shutdown() async {
        for plugin in self.plugins { await plugin.shutdown() }
    }
}
