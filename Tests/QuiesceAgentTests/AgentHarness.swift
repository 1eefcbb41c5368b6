import Foundation
import QuiesceAgent
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Synchronization

/// Drives a real BuiltinCommandHandler (with its real thaw guard process) the
/// way a session would, without the network: commands in, results out, and
/// engine heartbeats on demand.
final class AgentHarness: @unchecked Sendable {
    let handler: BuiltinCommandHandler
    let directory: String
    private var nextID: UInt64 = 1
    private var heartbeat: Heartbeat?
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

    /// Sends engine heartbeats every 250 ms until `stopHeartbeats()`, from a
    /// thread of its own as the engine sends them from an event-loop timer: a
    /// task would wait for the cooperative pool, which the tests running beside
    /// this one may keep busy for longer than the agent's 1 s silence limit.
    func startHeartbeats() {
        self.heartbeat?.stop()
        self.heartbeat = Heartbeat(handler: self.handler)
    }

    func stopHeartbeats() {
        self.heartbeat?.stop()
        self.heartbeat = nil
    }

    private final class Heartbeat: Sendable {
        private let running = Atomic(true)

        init(handler: BuiltinCommandHandler) {
            let thread = Thread { [self] in
                while self.running.load(ordering: .acquiring) {
                    handler.engineHeard()
                    usleep(250_000)
                }
            }
            thread.name = "test-engine-heartbeat"
            thread.stackSize = 1 << 18
            thread.start()
        }

        func stop() { self.running.store(false, ordering: .releasing) }
    }

    func perform(_ action: AgentCommand.OneOf_Action) async -> CommandResult {
        var command = AgentCommand()
        command.id = self.nextID
        self.nextID += 1
        command.action = action
        return await self.handler.perform(command)
    }

    /// Freeze status once the agent has recorded the end of its freeze, or
    /// after 1 s. A thaw by the guard or the agent's own fallback reaches the
    /// kernel first and the agent's books a moment later, so a write that went
    /// through does not mean the status says thawed yet on a loaded machine.
    func statusOnceThawed() async throws -> CommandResult {
        var status = await self.perform(.freezeStatus(.init()))
        let until = ContinuousClock.now + .seconds(1)
        while status.freezeStatus.frozen && ContinuousClock.now < until {
            try await Task.sleep(for: .milliseconds(5))
            status = await self.perform(.freezeStatus(.init()))
        }
        return status
    }

    /// Whether an event matching `matches` arrives within `limit` (the agent
    /// sends it after it has recorded what happened).
    func event(within limit: Duration = .seconds(1), _ matches: (Quiesce_Agent_V1_AgentEvent) -> Bool) async -> Bool {
        let until = ContinuousClock.now + limit
        while !self.events.all.contains(where: matches) {
            guard ContinuousClock.now < until else { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
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
    try writeExecutable(path, body, mode: 0o600)
    chown(path, owner, 0)  // before chmod: chown clears set-id bits
    chmod(path, mode_t(mode))
    return path
}

func sha256sum(_ path: String) async throws -> String {
    String(try await run("sha256sum", path).prefix(64))
}
