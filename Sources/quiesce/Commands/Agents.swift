import ArgumentParser
import Foundation
import QuiesceFleet
import GRPCCore
import GRPCNIOTransportHTTP2
import QuiesceCore
import QuiesceProto
import QuiesceWire
import SwiftProtobuf

struct Agents: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the agents connected to a running engine.")

    @OptionGroup var admin: AdminOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws {
        let response = try await withAdminClient(self.admin, remote: self.remote) { client in
            try await client.listAgents(Quiesce_Admin_V1_ListAgentsRequest())
        }
        switch self.output {
        case .json:
            print(try response.jsonString(options: jsonOptions))
        case .table:
            if response.agents.isEmpty {
                print("no agents connected")
            } else {
                var table = TextTable(headers: ["INSTANCE", "SESSION", "FROM", "AGENT", "PROTOCOL", "CONNECTED", "LAST HEARD", "PENDING", "CERTIFICATE", "EXPIRES"])
                let now = Date().timeIntervalSince1970 * 1000
                for agent in response.agents {
                    table.append([
                        agent.instanceID, agent.sessionID, agent.remoteAddress, agent.agentVersion, agent.protocolVersion,
                        ago(now - Double(agent.connectedAtUnixMs)), ago(now - Double(agent.lastHeardUnixMs)),
                        "\(agent.pendingCommands)", agent.certificateSerial.isEmpty ? "-" : String(agent.certificateSerial.prefix(16)),
                        agent.certificateNotAfterUnix == 0 ? "-" : ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(agent.certificateNotAfterUnix))),
                    ])
                }
                print(table.render())
            }
            if !response.conflicts.isEmpty {
                print("\nIDENTITY CONFLICTS (two machines claim one instance id; fleet runs skip these instances):")
                var table = TextTable(headers: ["INSTANCE", "HELD FROM", "CLAIMED FROM", "REFUSED", "FIRST", "LAST"])
                let iso = ISO8601DateFormatter()
                for conflict in response.conflicts {
                    table.append([conflict.instanceID, conflict.holderAddress, conflict.claimantAddress, "\(conflict.attempts)",
                                  iso.string(from: Date(timeIntervalSince1970: Double(conflict.firstSeenUnixMs) / 1000)),
                                  iso.string(from: Date(timeIntervalSince1970: Double(conflict.lastSeenUnixMs) / 1000))])
                }
                print(table.render())
            }
            if !response.revoked.isEmpty {
                print("\nREVOKED (refused at the handshake):")
                var table = TextTable(headers: ["WHAT", "AT", "REASON"])
                let iso = ISO8601DateFormatter()
                for entry in response.revoked {
                    table.append([entry.serial.isEmpty ? "every certificate of \(entry.identity)" : "serial \(entry.serial)",
                                  iso.string(from: Date(timeIntervalSince1970: Double(entry.revokedAtUnixMs) / 1000)), entry.reason])
                }
                print(table.render())
            }
        }
    }
}

struct FactsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "facts",
        abstract: "Ask a connected agent for its facts (OS, kernel, mounts).")

    @Argument(help: "The instance id.")
    var instance: String?
    @Flag(help: "Every connected agent's facts (one line each), asked concurrently.")
    var all = false
    @Option(help: ArgumentHelp("With --all: only instances matching this pattern ('*' for any run of characters).", valueName: "pattern"))
    var match: String?
    @Option(help: ArgumentHelp("With --all: questions in flight at once.", valueName: "n"))
    var concurrency = 64
    @Flag(name: .customLong("hook-hashes"), help: "Also hash every hook (what `quiesce plan --facts` pins).")
    var hookHashes = false
    @OptionGroup var admin: AdminOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        if self.all == (self.instance != nil) { throw ValidationError("expected an instance id or --all, not both") }
        if self.match != nil && !self.all { throw ValidationError("--match: only with --all") }
        guard (1...1024).contains(self.concurrency) else { throw ValidationError("--concurrency: expected 1 to 1024, found \(self.concurrency)") }
    }

    func run() async throws {
        if self.all { return try await self.runAll() }
        let instance = self.instance!
        let response = try await withAdminClient(self.admin, remote: self.remote) { client in
            var request = Quiesce_Admin_V1_GetFactsRequest()
            request.instanceID = instance
            request.includeHookHashes = self.hookHashes
            return try await client.getFacts(request)
        }
        let facts = response.facts
        switch self.output {
        case .json:
            print(try facts.jsonString(options: jsonOptions))
        case .table:
            print("\(instance): \(facts.summary)")
            if let freeze = facts.freezeSummary { print(freeze) }
            print("")
            print(facts.detailTables())
        }
    }

    /// Every connected agent (or those matching --match), `concurrency` at a time over one connection.
    /// Exit 0 when every agent answered, 1 when some did not (each named).
    func runAll() async throws {
        struct Answer: Sendable {
            var instance: String
            var facts: Quiesce_Agent_V1_Facts?
            var error: String?
            var took: Duration
        }
        let began = ContinuousClock.now
        let (answers, asked) = try await withAdminClient(self.admin, remote: self.remote) { client -> ([Answer], Int) in
            let listed = try await client.listAgents(Quiesce_Admin_V1_ListAgentsRequest())
            let ids = listed.agents.map(\.instanceID).filter { id in self.match.map { FleetFile.matches(id, pattern: $0) } ?? true }.sorted()
            let answers = await withTaskGroup(of: Answer.self) { group -> [Answer] in
                var next = 0, collected: [Answer] = []
                func ask() {
                    guard next < ids.count else { return }
                    let id = ids[next]
                    next += 1
                    group.addTask {
                        let start = ContinuousClock.now
                        do {
                            var request = Quiesce_Admin_V1_GetFactsRequest()
                            request.instanceID = id
                            request.includeHookHashes = self.hookHashes
                            return Answer(instance: id, facts: try await client.getFacts(request).facts, error: nil, took: .now - start)
                        } catch {
                            let text = (error as? RPCError).map { $0.message.isEmpty ? "\($0.code)" : "\($0.code): \($0.message)" } ?? "\(error)"
                            return Answer(instance: id, facts: nil, error: text, took: .now - start)
                        }
                    }
                }
                for _ in 0..<self.concurrency { ask() }
                for await answer in group {
                    collected.append(answer)
                    ask()
                }
                return collected.sorted { $0.instance < $1.instance }
            }
            return (answers, ids.count)
        }
        let elapsed = ContinuousClock.now - began
        let times = answers.map(\.took).sorted()
        func percentile(_ p: Double) -> Double { times.isEmpty ? 0 : times[min(times.count - 1, Int(Double(times.count - 1) * p))].timeInterval * 1000 }
        let failed = answers.filter { $0.facts == nil }
        if self.output == .json {
            for answer in answers {
                var line = "{\"instance\":\"\(answer.instance)\",\"took_ms\":\(String(format: "%.1f", answer.took.timeInterval * 1000))"
                if let facts = answer.facts { line += ",\"facts\":" + (try facts.jsonString(options: jsonOptions)) }
                if let error = answer.error { line += ",\"error\":" + String(decoding: try JSONSerialization.data(withJSONObject: [error]), as: UTF8.self).dropFirst().dropLast() }
                print(line + "}")
            }
            print("{\"event\":\"summary\",\"asked\":\(asked),\"answered\":\(answers.count - failed.count),\"elapsed_ms\":\(String(format: "%.1f", elapsed.timeInterval * 1000)),"
                + "\"p50_ms\":\(String(format: "%.1f", percentile(0.5))),\"p99_ms\":\(String(format: "%.1f", percentile(0.99)))}")
        } else {
            var table = TextTable(headers: ["INSTANCE", "FACTS", "TOOK"])
            for answer in answers {
                table.append([answer.instance, answer.facts?.summary ?? "no answer: \(answer.error ?? "")", String(format: "%.1f ms", answer.took.timeInterval * 1000)])
            }
            print(table.render())
            print(String(format: "\n%d of %d agents answered in %.2f s (p50 %.1f ms, p99 %.1f ms per agent, %d at a time)",
                         answers.count - failed.count, asked, elapsed.timeInterval, percentile(0.5), percentile(0.99), self.concurrency))
        }
        if !failed.isEmpty { throw ExitStatus.failure }
    }
}

let jsonOptions: JSONEncodingOptions = {
    var options = JSONEncodingOptions()
    options.preserveProtoFieldNames = true
    options.alwaysPrintInt64sAsNumbers = true
    return options
}()

func ago(_ milliseconds: Double) -> String {
    let seconds = Int(max(milliseconds, 0) / 1000)
    if seconds < 60 { return "\(seconds)s ago" }
    if seconds < 3600 { return "\(seconds / 60)m ago" }
    return "\(seconds / 3600)h\((seconds % 3600) / 60)m ago"
}

/// Calls the admin API; maps "cannot reach the engine" to exit 69 with a hint.
func withAdminClient<T: Sendable>(
    _ admin: AdminOptions, remote: RemoteAdminOptions? = nil,
    _ body: @Sendable @escaping (Quiesce_Admin_V1_Admin.Client<HTTP2ClientTransport.Posix>) async throws -> T
) async throws -> T {
    try await withAdminConnection(socket: admin.socketPath, remote: remote) { client in try await body(Quiesce_Admin_V1_Admin.Client(wrapping: client)) }
}

/// A connection to the engine's admin API: the remote operator port when `remote` names it,
/// else the local socket. "Cannot reach the engine" exits 69 with a hint; any other refusal exits 1.
func withAdminConnection<T: Sendable>(
    socket: String?, remote: RemoteAdminOptions?, _ body: @Sendable @escaping (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> T
) async throws -> T {
    let transport: HTTP2ClientTransport.Posix, address: String
    if let (remoteTransport, remoteAddress) = try remote?.transport() {
        (transport, address) = (remoteTransport, remoteAddress)
    } else if let socket {
        guard FileManager.default.fileExists(atPath: socket) else {
            printError("no engine admin socket at \(socket); is `quiesce serve` running? (set --admin-socket or QUIESCE_ADMIN_SOCKET)")
            throw ExitStatus.unavailable
        }
        (transport, address) = (SecureTransports.adminDialer(socketPath: socket), socket)
    } else {
        throw ExitStatus.failure
    }
    do {
        return try await withGRPCClient(transport: transport) { client in try await body(client) }
    } catch let error as RPCError where error.code == .unavailable {
        printError("cannot reach the engine at \(address): \(error.message)")
        throw ExitStatus.unavailable
    } catch let error as RPCError {
        printError("\(error.code): \(error.message)")
        throw ExitStatus.failure
    }
}
