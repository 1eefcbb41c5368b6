import ArgumentParser
import Foundation
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
    var instance: String
    @Flag(name: .customLong("hook-hashes"), help: "Also hash every hook (what `quiesce plan --facts` pins).")
    var hookHashes = false
    @OptionGroup var admin: AdminOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws {
        let response = try await withAdminClient(self.admin, remote: self.remote) { client in
            var request = Quiesce_Admin_V1_GetFactsRequest()
            request.instanceID = self.instance
            request.includeHookHashes = self.hookHashes
            return try await client.getFacts(request)
        }
        let facts = response.facts
        switch self.output {
        case .json:
            print(try facts.jsonString(options: jsonOptions))
        case .table:
            print("\(self.instance): \(facts.summary)")
            if let freeze = facts.freezeSummary { print(freeze) }
            print("")
            print(facts.detailTables())
        }
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
