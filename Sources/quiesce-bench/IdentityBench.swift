import ArgumentParser
import Foundation
import GRPCCore
import Logging
import QuiesceAgent
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceWire

/// What fleet identity costs: enrolment (key made on the "instance", CSR, pinned TLS, token
/// redeemed under the store's lock, certificate issued, three files written) against the floor of
/// any enrolment — a fresh TLS connection and one call — and a command's round trip on an engine
/// that audits every command and checks revocations, against one that does neither, in the same run.
struct IdentityBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "identity", abstract: "Enrolment latency and the audit trail's cost on a command's round trip.")

    @Option(help: ArgumentHelp("Scratch directory (CA, tokens, enrolled files, audit log).", valueName: "dir"))
    var work: String
    @Option(help: "Agents to enrol.")
    var agents = 50
    @Option(help: "Enrolments at once.")
    var parallel = 8
    @Option(help: "Command round trips per engine.")
    var runs = 500

    func run() async throws {
        var quiet = Logger(label: "bench")
        quiet.logLevel = .critical
        let ca = CADirectory(path: self.work + "/ca")
        try ca.initialize(names: ["localhost"], ipAddresses: ["127.0.0.1"], force: true)
        let fingerprint = try ca.load().root.fingerprint
        func engine(audited: Bool, name: String) throws -> Engine {
            var configuration = EngineConfiguration(
                listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles,
                adminSocketPath: self.work + "/\(name).sock", limits: .defaults)
            if audited {
                configuration.caDirectory = ca.path
                configuration.enrolListen = ListenAddress(host: .ipv4("127.0.0.1"), port: 0)
                configuration.auditLogPath = self.work + "/audit.jsonl"
            }
            return try Engine(configuration: configuration, logger: quiet)
        }
        let audited = try engine(audited: true, name: "audited"), plain = try engine(audited: false, name: "plain")
        let tasks = [Task { try await audited.run() }, Task { try await plain.run() }]
        defer {
            audited.shutdown()
            plain.shutdown()
            tasks.forEach { $0.cancel() }
        }
        let enrolAddress = try await audited.enrolAddress()
        let auditedAddress = try await audited.listeningAddress(), plainAddress = try await plain.listeningAddress()

        // The floor: a fresh mutual-TLS connection and one call (Check) on the audited engine's agent port.
        let probe = try ca.issue(.agent(instanceID: "bench-probe"))
        var floor: [Double] = []
        for _ in 0..<max(self.agents, 20) {
            let began = ContinuousClock.now
            _ = try await withGRPCClient(transport: SecureTransports.agentDialer(engine: auditedAddress, identity: probe)) { client in
                try await Quiesce_Enrol_V1_Enrolment.Client(wrapping: client).check(.init())
            }
            floor.append((ContinuousClock.now - began).ms)
        }
        Self.emit(["bench": "floor", "label": "fresh mTLS connection + one call", "ms": Self.stats(floor)])

        // Enrolment: one pattern token for every agent; first one at a time (the latency, beside the
        // floor), then `parallel` at a time (the rate a fleet joins at).
        let (token, _) = try TokenStore(ca: ca).create(instance: nil, pattern: "bench-*", ttl: .seconds(3600), uses: 2 * self.agents)
        for (label, width, offset) in [("serial", 1, 0), ("parallel", self.parallel, self.agents)] {
            let began = ContinuousClock.now
            var enrolMs: [Double] = []
            try await withThrowingTaskGroup(of: Double.self) { group in
                var next = 0
                func add() {
                    let index = offset + next
                    next += 1
                    group.addTask {
                        let start = ContinuousClock.now
                        _ = try await Enroller.enrol(engine: enrolAddress, token: token, caFingerprint: fingerprint,
                                                     instanceID: String(format: "bench-%04d", index), directory: self.work + "/agents/\(index)")
                        return (ContinuousClock.now - start).ms
                    }
                }
                for _ in 0..<min(width, self.agents) { add() }
                while let ms = try await group.next() {
                    enrolMs.append(ms)
                    if next < self.agents { add() }
                }
            }
            let total = (ContinuousClock.now - began).timeInterval
            Self.emit(["bench": "enrol", "mode": label, "agents": self.agents, "parallel": width, "ms": Self.stats(enrolMs),
                       "per_second": Double(self.agents) / total])
        }

        // A command's round trip: an agent on each engine, the two measured turn by turn.
        let files = Enroller.files(in: self.work + "/agents/0")
        let plainFiles = try ca.issue(.agent(instanceID: "bench-0000"), overwrite: true)
        let runners = [
            AgentRunner(configuration: AgentConfiguration(engine: auditedAddress, identity: files),
                        handler: BuiltinCommandHandler(startsGuard: false, logger: quiet), logger: quiet),
            AgentRunner(configuration: AgentConfiguration(engine: plainAddress, identity: plainFiles),
                        handler: BuiltinCommandHandler(startsGuard: false, logger: quiet), logger: quiet),
        ]
        let agentTasks = runners.map { runner in Task { try await runner.run() } }
        defer { agentTasks.forEach { $0.cancel() } }
        guard await audited.registry.waitFor(["bench-0000"], timeout: .seconds(20)).isEmpty,
              await plain.registry.waitFor(["bench-0000"], timeout: .seconds(20)).isEmpty else {
            throw ValidationError("the round-trip agents did not connect")
        }
        var samples: [[Double]] = [[], []]
        for _ in 0..<self.runs {
            for (index, engine) in [audited, plain].enumerated() {
                let start = ContinuousClock.now
                _ = try await engine.freezeStatus(of: "bench-0000")
                samples[index].append((ContinuousClock.now - start).ms)
            }
        }
        audited.audit?.flush()
        let lines = (try? String(contentsOfFile: self.work + "/audit.jsonl", encoding: .utf8))?.split(separator: "\n").count ?? 0
        Self.emit(["bench": "command", "engine": "audited", "label": "audit trail + revocation checks", "ms": Self.stats(samples[0]), "audit_lines": lines])
        Self.emit(["bench": "command", "engine": "plain", "label": "neither", "ms": Self.stats(samples[1])])
    }

    static func stats(_ values: [Double]) -> [String: Double] {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return [:] }
        func at(_ q: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * q))] }
        return ["p50": at(0.5), "p99": at(0.99), "max": sorted.last!, "runs": Double(sorted.count)]
    }

    static func emit(_ object: [String: Any]) {
        if let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) {
            print(String(decoding: data, as: UTF8.self))
        }
    }
}
