import Foundation
import Logging
import QuiesceAgent
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceWire
import SwiftProtobuf

/// `quiesce demo`: a throw-away CA, an engine and a handful of agents on
/// loopback, all over real mutual TLS; prints the fleet with each agent's facts
/// and removes everything it made.
public struct Demo: Sendable {
    public var agentCount: Int
    public var timeout: Duration
    public var json: Bool
    /// Progress lines (stderr in the CLI).
    public var progress: @Sendable (String) -> Void

    public init(agentCount: Int = 4, timeout: Duration = .seconds(30), json: Bool = false, progress: @escaping @Sendable (String) -> Void) {
        self.agentCount = agentCount
        self.timeout = timeout
        self.json = json
        self.progress = progress
    }

    /// Runs the demo and returns what to print on stdout.
    public func run() async throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-demo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let clock = ContinuousClock()
        let began = clock.now

        self.progress("making a throw-away CA in \(directory)")
        let ca = CADirectory(path: directory + "/ca")
        try ca.initialize(commonName: "Quiesce demo CA", names: ["localhost"], ipAddresses: ["127.0.0.1"])
        let ids = (1...self.agentCount).map { "demo-\($0)" }
        for id in ids { try ca.issue(.agent(instanceID: id)) }

        var silent = Logger(label: "quiesce.demo")
        silent.logLevel = .error
        let engine = try Engine(
            configuration: EngineConfiguration(
                listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles,
                adminSocketPath: directory + "/admin.sock", limits: .defaults),
            logger: silent)
        let engineTask = Task { try await engine.run() }
        defer { engine.shutdown() }
        let address = try await engine.listeningAddress()
        self.progress("engine listening on \(address) (mutual TLS), admin socket \(directory)/admin.sock")

        let agents = ids.map { id in
            AgentRunner(
                configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: id)),
                handler: BuiltinCommandHandler(logger: silent), logger: silent)
        }
        let agentTasks = agents.map { agent in Task { try await agent.run() } }
        defer { for task in agentTasks { task.cancel() } }
        self.progress("started \(agents.count) agents; waiting for their sessions")

        let missing = await engine.registry.waitFor(Set(ids), timeout: self.timeout)
        guard missing.isEmpty else {
            let reasons = agents.compactMap { $0.lastError }.first ?? "no error reported"
            throw DemoError.agentsMissing(missing.sorted(), reason: reasons)
        }
        self.progress("all \(ids.count) agents connected; asking each for its facts")

        var rows: [(session: AgentSession, facts: Facts)] = []
        for session in await engine.registry.all() {
            rows.append((session, try await engine.facts(of: session.instanceID)))
        }
        let elapsed = clock.now - began

        for task in agentTasks { task.cancel() }
        engine.shutdown()
        _ = try? await engineTask.value
        self.progress("stopped the engine and agents; removing \(directory)")
        return self.json ? try Self.renderJSON(rows, elapsed: elapsed) : Self.renderTable(rows, elapsed: elapsed)
    }

    static func renderTable(_ rows: [(session: AgentSession, facts: Facts)], elapsed: Duration) -> String {
        var fleet = TextTable(headers: ["INSTANCE", "SESSION", "FROM", "AGENT", "OS", "KERNEL", "CPUS", "MEMORY", "FREEZABLE"])
        for (session, facts) in rows {
            let freezable = facts.mounts.filter(\.freezable).count
            fleet.append([
                session.instanceID, session.sessionID, session.remoteAddress, session.agentVersion,
                facts.osName, facts.kernelRelease, "\(facts.cpuCount)", formatBytes(facts.memoryBytes),
                "\(freezable)/\(facts.mounts.count) mounts",
            ])
        }
        var text = "Fleet (\(rows.count) agents, sessions over mutual TLS, \(String(format: "%.2f", elapsed.timeInterval)) s)\n\n"
        text += fleet.render() + "\n"
        if let (session, facts) = rows.first {
            text += "\nMounts reported by \(session.instanceID) (\(facts.hostname)):\n\n" + facts.mountTable() + "\n"
        }
        return text
    }

    static func renderJSON(_ rows: [(session: AgentSession, facts: Facts)], elapsed: Duration) throws -> String {
        var options = JSONEncodingOptions()
        options.preserveProtoFieldNames = true
        var agents: [String] = []
        for (session, facts) in rows {
            let factsJSON = try facts.jsonString(options: options)
            let head = try String(decoding: JSONSerialization.data(withJSONObject: [
                "instance_id": session.instanceID, "session_id": session.sessionID,
                "remote_address": session.remoteAddress, "agent_version": session.agentVersion,
            ], options: [.sortedKeys]), as: UTF8.self)
            agents.append(String(head.dropLast()) + ",\"facts\":" + factsJSON + "}")
        }
        return "{\"elapsed_ms\":\(elapsed.milliseconds),\"agents\":[" + agents.joined(separator: ",") + "]}"
    }
}

public enum DemoError: Error, CustomStringConvertible {
    case agentsMissing([String], reason: String)

    public var description: String {
        switch self {
        case .agentsMissing(let ids, let reason):
            "agents never connected: \(ids.joined(separator: ", ")); last agent error: \(reason)"
        }
    }
}
