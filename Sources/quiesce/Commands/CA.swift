import ArgumentParser
import Foundation
import QuiescePKI

struct CA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "Manage the engine's certificate authority.",
        subcommands: [Init.self, Issue.self, Revoke.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a CA and the engine's server certificate.",
            discussion: "Agents dial the engine by these names or addresses; connecting by IP checks an IP SAN, so list every address agents use.")

        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?
        @Option(name: .customLong("name"), help: ArgumentHelp("DNS name of the engine (repeatable).", valueName: "dns"))
        var names: [String] = ["localhost"]
        @Option(name: .customLong("ip"), help: ArgumentHelp("IP address of the engine (repeatable).", valueName: "ip"))
        var ips: [String] = ["127.0.0.1", "::1"]
        @Option(help: "The CA's common name.")
        var commonName = "Quiesce CA"
        @Flag(help: "Replace an existing CA (every certificate it issued stops working).")
        var force = false

        func run() throws {
            let ca = CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca")
            do {
                let authority = try ca.initialize(commonName: self.commonName, names: self.names, ipAddresses: self.ips, force: self.force)
                print("created CA \(ca.caCertificatePath) (SHA-256 \(authority.root.fingerprint))")
                print("engine certificate \(ca.engineFiles.certificatePath) for \((self.names + self.ips).joined(separator: ", "))")
            } catch let error as PKIError {
                printError(error.description)
                throw ExitStatus.failure
            }
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue a client certificate for an agent or an operator.",
            discussion: "Give the files to the agent of that instance: quiesce-agent run --cert ID.pem --key ID.key --ca ca.pem")

        @Option(help: ArgumentHelp("Issue for the agent of this instance id.", valueName: "instance-id"))
        var agent: String?
        @Option(name: .customLong("operator"), help: ArgumentHelp("Issue for this operator.", valueName: "name"))
        var operatorName: String?
        @Option(help: ArgumentHelp("With --operator: viewer (read: agents, facts, plans) or operator (also fleet runs).", valueName: "role"))
        var role: String = "viewer"
        @Option(help: ArgumentHelp("Where the CA lives (default: $QUIESCE_HOME/ca).", valueName: "dir"))
        var dir: String?
        @Flag(help: "Replace an existing certificate of the same name.")
        var force = false

        func validate() throws {
            guard (self.agent == nil) != (self.operatorName == nil) else {
                throw ValidationError("expected exactly one of --agent ID or --operator NAME")
            }
        }

        func run() throws {
            let ca = CADirectory(path: self.dir ?? defaultStateDirectory() + "/ca")
            guard let permission = OperatorPermission(rawValue: self.role) else {
                printError("--role: expected viewer or operator, found \"\(self.role)\"")
                throw ExitCode(64)
            }
            let request: CertificateAuthority.Request = self.agent.map { .agent(instanceID: $0) } ?? .operator(name: self.operatorName!, permission: permission)
            do {
                let files = try ca.issue(request, overwrite: self.force)
                print("certificate \(files.certificatePath)")
                print("key         \(files.keyPath) (mode 0600)")
                print("trust root  \(files.trustRootsPath)")
            } catch let error as PKIError {
                printError(error.description)
                throw ExitStatus.failure
            }
        }
    }
}
