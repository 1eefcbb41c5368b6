import ArgumentParser
import Foundation
import QuiesceCore
import QuiesceDemo

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The whole product on one machine: a fleet backed up at three levels, with the reasons (root).",
        discussion: """
            As root: makes an XFS reflink pool on a loop device and five instances whose \
            disks are loop-mounted images in it (valid freeze scripts on two, a mode-0755 \
            script on one, an ext2 disk on one, a crash policy on one), starts an agent per \
            instance over mutual TLS, backs the fleet up, prints the report with every level \
            and why, verifies one snapshot and removes everything. Takes well under a minute.

            Without root it says what it needs and shows the sessions part only (a CA, an \
            engine and --agents agents over mutual TLS, with their facts); --sessions-only \
            asks for that part directly.

            Exit codes: 0 every instance reached the level the demo expects (the report shows \
            three levels on purpose); 1 something did not (it says what) or the demo failed.
            """)

    @Option(help: "How many agents to start (sessions part).")
    var agents = 4
    @Flag(name: .customLong("sessions-only"), help: "Only the sessions part: agents and their facts, no loop devices, no root.")
    var sessionsOnly = false
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        guard (1...500).contains(self.agents) else { throw ValidationError("expected --agents between 1 and 500, found \(self.agents)") }
    }

    func run() async throws {
        let progress: @Sendable (String) -> Void = { line in BrokenPipes.printError("• " + line + "\n") }
        if !self.sessionsOnly {
            if let missing = FleetDemo.missingRequirement {
                printError(missing + "; showing the sessions part only")
            } else {
                do {
                    let (output, code) = try await FleetDemo(json: self.output == .json, progress: progress).run()
                    print(output)
                    if code != 0 { throw ExitCode(code) }
                    return
                } catch let exit as ExitCode {
                    throw exit
                } catch {
                    printError("demo failed: \(error)")
                    throw ExitStatus.failure
                }
            }
        }
        let demo = QuiesceDemo.Demo(agentCount: self.agents, json: self.output == .json) { line in
            BrokenPipes.printError("• " + line + "\n")
        }
        do {
            print(try await demo.run())
        } catch {
            printError("demo failed: \(error)")
            throw ExitStatus.failure
        }
    }
}
