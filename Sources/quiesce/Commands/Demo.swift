import ArgumentParser
import Foundation
import QuiesceDemo

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a throw-away fleet on loopback and print it.",
        discussion: "Makes a CA, starts an engine and N agents over real mutual TLS, prints each agent's facts, and removes everything it made.")

    @Option(help: "How many agents to start.")
    var agents = 4
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        guard (1...500).contains(self.agents) else { throw ValidationError("expected --agents between 1 and 500, found \(self.agents)") }
    }

    func run() async throws {
        let demo = QuiesceDemo.Demo(agentCount: self.agents, json: self.output == .json) { line in
            FileHandle.standardError.write(Data(("• " + line + "\n").utf8))
        }
        do {
            print(try await demo.run())
        } catch {
            printError("demo failed: \(error)")
            throw ExitStatus.failure
        }
    }
}
