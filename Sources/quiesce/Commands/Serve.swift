import ArgumentParser
import Foundation
import Logging
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceWire

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the engine: accept agent sessions and serve the admin API.",
        discussion: "Stops on SIGINT or SIGTERM, closing every session.")

    @Option(help: ArgumentHelp("Where agents dial in (mutual TLS).", valueName: "host:port"))
    var listen = "127.0.0.1:7443"
    @Option(help: ArgumentHelp("The CA directory from `quiesce ca init` (default: $QUIESCE_HOME/ca).", valueName: "dir"))
    var caDir: String?
    @OptionGroup var admin: AdminOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        do { _ = try ListenAddress(parsing: self.listen) } catch { throw ValidationError("--listen: \(error)") }
    }

    func run() async throws {
        try self.log.bootstrap()
        let listen = try ListenAddress(parsing: self.listen)
        let ca = CADirectory(path: self.caDir ?? defaultStateDirectory() + "/ca")
        let engine: Engine
        do {
            engine = try Engine(configuration: EngineConfiguration(
                listen: listen, identity: ca.engineFiles, adminSocketPath: self.admin.socketPath, limits: .defaults))
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
        let signals = [SIGINT, SIGTERM].map { number -> DispatchSourceSignal in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler { engine.shutdown() }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }
        let ready = Task {
            if let address = try? await engine.listeningAddress() {
                let line = "quiesce engine \(QuiesceVersion.software) listening on \(address); admin socket \(self.admin.socketPath)\n"
                FileHandle.standardOutput.write(Data(line.utf8))
            }
        }
        defer { ready.cancel() }
        do {
            try await engine.run()
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}
