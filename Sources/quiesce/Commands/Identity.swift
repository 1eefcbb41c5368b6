import ArgumentParser
import Foundation
import QuiesceCore
import QuiesceEngine
import QuiesceInventory
import QuiescePKI

/// `quiesce token`: join tokens for `quiesce-agent enrol`.
struct Token: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join tokens: how a new instance gets its certificate (quiesce-agent enrol).",
        discussion: """
            A token is shown once; the CA directory keeps only its SHA-256. It is bound to one \
            instance id or to a pattern of ids, expires, and is spent after its uses. The agent \
            pins the CA by the fingerprint printed with it.
            """,
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a token; prints it and the CA's SHA-256 fingerprint.")
        @Option(help: ArgumentHelp("The one instance id this token enrols.", valueName: "id"))
        var instance: String?
        @Option(help: ArgumentHelp("A pattern of instance ids it enrols (e.g. 'web-*'); the agent names its id.", valueName: "pattern"))
        var match: String?
        @Option(help: ArgumentHelp("How long it is valid: 30m, 1h, 7d.", valueName: "duration"))
        var ttl = "1h"
        @Option(help: "How many enrolments it allows.")
        var uses = 1
        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?
        @Option(help: "Output format: table or json.")
        var output: OutputFormat = .table

        func validate() throws {
            guard (self.instance == nil) != (self.match == nil) else { throw ValidationError("expected exactly one of --instance ID or --match PATTERN") }
            guard parseDuration(self.ttl) != nil else { throw ValidationError("--ttl: expected a duration such as 30m, 1h or 7d, found \"\(self.ttl)\"") }
        }

        func run() throws {
            let ca = CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca")
            do {
                let root = try ca.load().root
                let (text, token) = try TokenStore(ca: ca).create(
                    instance: self.instance, pattern: self.match, ttl: parseDuration(self.ttl)!, uses: self.uses)
                if self.output == .json {
                    print(try jsonText(["token": text, "id": token.id, "ca_fingerprint": root.fingerprint, "binding": token.binding,
                                        "expires_at": ISO8601DateFormatter().string(from: token.expiresAt), "uses": token.uses]))
                    return
                }
                print("token           \(text)")
                print("ca fingerprint  \(root.fingerprint)")
                print("for             \(token.binding), \(token.uses) use\(token.uses == 1 ? "" : "s"), until \(ISO8601DateFormatter().string(from: token.expiresAt))")
                print("")
                print("on the instance (as root):")
                print("  quiesce-agent enrol --engine ENGINE:ENROL-PORT --token \(text) \\")
                print("    --ca-fingerprint \(root.fingerprint)\(self.match != nil ? " --instance-id ID" : "") --run")
            } catch {
                printError("\(error)")
                throw ExitStatus.failure
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Tokens: id, binding, state, uses, expiry, who used them (never the secret).")
        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?
        @Option(help: "Output format: table or json.")
        var output: OutputFormat = .table

        func run() throws {
            let ca = CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca")
            do {
                let tokens = try TokenStore(ca: ca).list()
                let now = Date(), iso = ISO8601DateFormatter()
                if self.output == .json {
                    print(try jsonText(tokens.map { token -> [String: Any] in
                        ["id": token.id, "binding": token.binding, "state": token.state(at: now), "uses": token.uses, "uses_left": token.usesLeft,
                         "expires_at": iso.string(from: token.expiresAt), "used_by": token.usedBy]
                    }))
                    return
                }
                var table = TextTable(headers: ["ID", "FOR", "STATE", "USES LEFT", "EXPIRES", "USED BY"])
                for token in tokens {
                    table.append([token.id, token.binding, token.state(at: now), "\(token.usesLeft)/\(token.uses)", iso.string(from: token.expiresAt),
                                  token.usedBy.joined(separator: ", ")])
                }
                print(tokens.isEmpty ? "no tokens (quiesce token create)" : table.render())
            } catch {
                printError("\(error)")
                throw ExitStatus.failure
            }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a token (by id or its full text): it enrols no one from now on.")
        @Argument(help: ArgumentHelp("The token's id (from `quiesce token list`).", valueName: "id"))
        var id: String
        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?

        func run() throws {
            do {
                let token = try TokenStore(ca: CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca")).revoke(self.id)
                print("revoked token \(token.id) (\(token.binding))")
            } catch {
                printError("\(error)")
                throw ExitStatus.failure
            }
        }
    }
}

extension CA {
    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Revoke an agent's or operator's certificates, or one certificate by serial.",
            discussion: """
                Persisted in the CA directory (revoked.json). A running engine re-reads it within a \
                quarter of a second: it refuses that certificate at the TLS handshake from then on and \
                ends its live session at once (PERMISSION_DENIED, with the reason). --agent and \
                --operator revoke every certificate issued to that identity so far; it can enrol again \
                with a new token.
                """)
        @Option(help: ArgumentHelp("Every certificate of this instance's agent.", valueName: "id"))
        var agent: String?
        @Option(help: ArgumentHelp("One certificate, by its hex serial (quiesce agents shows it).", valueName: "hex"))
        var serial: String?
        @Option(name: .customLong("operator"), help: ArgumentHelp("Every certificate of this operator.", valueName: "name"))
        var operatorName: String?
        @Option(help: "Why (kept with the revocation and shown to the refused peer).")
        var reason = "revoked by an operator"
        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?

        func validate() throws {
            guard [self.agent, self.serial, self.operatorName].compactMap({ $0 }).count == 1 else {
                throw ValidationError("expected exactly one of --agent ID, --serial HEX or --operator NAME")
            }
        }

        func run() throws {
            do {
                let list = RevocationList(ca: CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca"))
                let entry = try list.revoke(
                    serial: self.serial, identity: self.agent.map { "agent/\($0)" } ?? self.operatorName.map { "operator/\($0)" }, reason: self.reason)
                print("revoked \(entry.serial.map { "certificate \($0)" } ?? "every certificate of \(entry.identity!) issued so far"): \(entry.reason)")
            } catch {
                printError("\(error)")
                throw ExitStatus.failure
            }
        }
    }
}

/// `quiesce audit`: reads the engine's audit trail.
struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read the audit trail: commands sent to agents (who asked, what, the result), admin calls, enrolments, revocations.")
    @Option(help: ArgumentHelp("Only this instance.", valueName: "id"))
    var instance: String?
    @Option(help: ArgumentHelp("Only entries newer than this: 30m, 1h, 7d.", valueName: "duration"))
    var since: String?
    @Option(help: ArgumentHelp("The audit log (default: $QUIESCE_HOME/audit.jsonl).", valueName: "path"))
    var auditLog: String?
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        if let since = self.since, parseDuration(since) == nil {
            throw ValidationError("--since: expected a duration such as 30m, 1h or 7d, found \"\(since)\"")
        }
    }

    func run() throws {
        let path = self.auditLog ?? defaultStateDirectory() + "/audit.jsonl"
        do {
            let entries = try AuditLog.read(path: path, instance: self.instance, since: self.since.flatMap(parseDuration).map { Date().addingTimeInterval(-$0.timeInterval) })
            if self.output == .json {
                let encoder = JSONEncoder()
                encoder.dateEncodingStrategy = .iso8601
                encoder.keyEncodingStrategy = .convertToSnakeCase
                encoder.outputFormatting = [.sortedKeys]
                for entry in entries { print(String(decoding: try encoder.encode(entry), as: UTF8.self)) }
                return
            }
            var table = TextTable(headers: ["TIME", "KIND", "WHO", "ACTION", "INSTANCE", "RESULT", "MS", "DETAIL"])
            let iso = ISO8601DateFormatter()
            for entry in entries {
                table.append([iso.string(from: entry.time), entry.kind, entry.actor, entry.action, entry.instance, entry.result,
                              entry.durationMs.map { String(format: "%.1f", $0) } ?? "", String((entry.detail ?? "").prefix(80))])
            }
            print(entries.isEmpty ? "no audit entries\(self.instance.map { " for \($0)" } ?? "")\(self.since.map { " in the last \($0)" } ?? "")" : table.render())
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}
