import Foundation
import QuiesceAgent
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire

/// Drives a real BuiltinCommandHandler (with its real thaw guard process) the
/// way a session would, without the network: commands in, results out, and
/// engine heartbeats on demand.
final class AgentHarness: @unchecked Sendable {
    let handler: BuiltinCommandHandler
    let directory: String
    private var nextID: UInt64 = 1
    private var heartbeat: Task<Void, Never>?
    let events = EventLog()

    init(directory: String, silenceLimit: Duration = .seconds(1), guardExecutable: String? = nil, syncfs: SyncfsRule = .default) async {
        self.directory = directory
        let locations = HookLocations(prescript: directory + "/prescript.sh", postscript: directory + "/postscript.sh", hookDirectory: directory + "/hooks.d")
        try? FileManager.default.createDirectory(atPath: locations.hookDirectory, withIntermediateDirectories: true)
        self.handler = BuiltinCommandHandler(facts: FactsCollector(hooks: locations), guardExecutable: guardExecutable, silenceLimit: silenceLimit, syncfs: syncfs)
        await self.handler.prepare()
        let events = self.events
        self.handler.sessionOpened { events.append($0) }
    }

    /// Sends engine heartbeats every 250 ms until `stopHeartbeats()`.
    func startHeartbeats() {
        let handler = self.handler
        self.heartbeat = Task {
            while !Task.isCancelled {
                handler.engineHeard()
                try? await Task.sleep(for: .milliseconds(250))
            }
        }
    }

    func stopHeartbeats() {
        self.heartbeat?.cancel()
        self.heartbeat = nil
    }

    func perform(_ action: AgentCommand.OneOf_Action) async -> CommandResult {
        var command = AgentCommand()
        command.id = self.nextID
        self.nextID += 1
        command.action = action
        return await self.handler.perform(command)
    }

    func freeze(_ id: String, _ mounts: [String], budgetMs: UInt32 = 0, syncfs: Quiesce_Agent_V1_SyncfsPolicy = .unspecified) async -> CommandResult {
        var request = Quiesce_Agent_V1_FreezeRequest()
        request.freezeID = id
        request.mountPoints = mounts
        request.budgetMs = budgetMs
        request.syncfs = syncfs
        return await self.perform(.freeze(request))
    }

    func thaw(_ id: String) async -> CommandResult {
        var request = Quiesce_Agent_V1_ThawRequest()
        request.freezeID = id
        return await self.perform(.thaw(request))
    }

    /// Stops the handler (thaws, ends holds and the guard).
    func close() async {
        self.stopHeartbeats()
        await self.handler.shutdown()
    }
}

final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [Quiesce_Agent_V1_AgentEvent] = []
    func append(_ event: Quiesce_Agent_V1_AgentEvent) { self.lock.withLock { self.items.append(event) } }
    var all: [Quiesce_Agent_V1_AgentEvent] { self.lock.withLock { self.items } }
}

/// Writes a hook script owned by root with `mode`.
@discardableResult
func writeScript(_ path: String, mode: Int, owner: uid_t = 0, body: String) throws -> String {
    try body.write(toFile: path, atomically: false, encoding: .utf8)
    chown(path, owner, 0)  // before chmod: chown clears set-id bits
    chmod(path, mode_t(mode))
    return path
}

func sha256sum(_ path: String) throws -> String {
    String(try run("sha256sum", path).prefix(64))
}
