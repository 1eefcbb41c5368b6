import Foundation
import GRPCCore
import Logging
import QuiesceCore
import QuiesceProto
import QuiesceWire

/// Performs the actions the engine asks for. One handler serves every
/// session of an agent; it must be safe to call concurrently.
public protocol CommandHandling: Sendable {
    /// The capabilities announced in the hello.
    var capabilities: [String] { get }

    /// Performs one command. Called on a task that is cancelled when the
    /// engine cancels the command or its deadline passes.
    func perform(_ command: AgentCommand) async -> CommandResult

    /// Called once before the first session (starts the thaw guard).
    func prepare() async
    /// A session is open; `events` sends unsolicited events on it.
    func sessionOpened(events: @escaping @Sendable (Quiesce_Agent_V1_AgentEvent) -> Void)
    /// Any message arrived from the engine.
    func engineHeard()
    /// The session ended (anything frozen must be thawed: nobody is watching).
    func sessionEnded() async
    /// The agent stops.
    func shutdown() async
    /// Whether anything is frozen now (nothing is written to disk then).
    var isFrozen: Bool { get }
}

extension CommandHandling {
    public func prepare() async {}
    public func sessionOpened(events: @escaping @Sendable (Quiesce_Agent_V1_AgentEvent) -> Void) {}
    public func engineHeard() {}
    public func sessionEnded() async {}
    public func shutdown() async {}
    public var isFrozen: Bool { false }
}

/// The built-in actions: facts, hooks, freeze and thaw through the thaw
/// guard, freeze status, holds — or, given a VSS backend (Windows, or the VSS
/// simulator), facts and VSS snapshot sets, the Windows agent's actions. An
/// action the agent does not perform answers UNIMPLEMENTED with reason
/// "not-implemented", so an engine can tell an agent without an action from a
/// failed action.
public struct BuiltinCommandHandler: CommandHandling {
    public let facts: FactsCollector
    public let hooks: HookRunner
    public let freezer: FreezeController
    public let holds: Holds
    /// Whether `prepare()` starts the thaw guard (without it every freeze is refused).
    public let startsGuard: Bool
    /// The Windows side: VSS snapshot sets instead of FIFREEZE, scripts and holds.
    public let vss: (any VssBackend)?

    public init(
        facts: FactsCollector = FactsCollector(), hooks: HookRunner? = nil, guardExecutable: String? = nil,
        silenceLimit: Duration = .seconds(1), syncfs: SyncfsRule = .default, expediteRCU: Bool = true, startsGuard: Bool = true,
        vssScenario: VssScenario? = nil, vss: (any VssBackend)? = nil, logger: Logger = Logger(label: "quiesce.agent.freeze")
    ) {
        self.facts = facts
        self.startsGuard = startsGuard
        let hooks = hooks ?? HookRunner(locations: facts.hooks)
        self.hooks = hooks
        let sink = EventSink()
        let holds = Holds(runner: hooks) { id, message in
            var event = Quiesce_Agent_V1_AgentEvent()
            event.kind = .holdDied
            event.message = message
            sink.emit(event)
        }
        self.holds = holds
        let freezer = FreezeController(
            guardExecutable: guardExecutable, silenceLimit: silenceLimit, syncfs: syncfs, expediteRCU: expediteRCU,
            holdStates: { holds.states() }, logger: logger)
        sink.freezer = freezer
        self.freezer = freezer
        // A scenario makes this agent a simulated Windows instance; `vss` is a real backend (WindowsVssBackend on Windows).
        self.vss = vssScenario.map { VssSimulator(scenario: $0, freezer: freezer) } ?? vss
    }

    public var isFrozen: Bool { self.freezer.isFrozen }

    public var capabilities: [String] { self.vss == nil ? ["facts", "hooks", "fsfreeze", "holds"] : ["facts", "vss"] }

    public func prepare() async {
        // Without a guard the agent still serves facts and hooks; freezes are refused ("guard-missing").
        if self.startsGuard { try? await self.freezer.startGuard() }
    }

    public func sessionOpened(events: @escaping @Sendable (Quiesce_Agent_V1_AgentEvent) -> Void) {
        self.freezer.attach(events: events)
        self.freezer.engineHeard()
    }

    public func engineHeard() { self.freezer.engineHeard() }

    public func sessionEnded() async {
        self.freezer.attach(events: nil)
        await self.vss?.abortAll(detail: "the session to the engine ended")
        await self.freezer.thawAll(cause: .engineSilent, detail: "the session to the engine ended")
    }

    public func shutdown() async {
        await self.vss?.abortAll(detail: "the agent is stopping")
        await self.freezer.stop()
        await self.holds.releaseAll()
    }

    public func perform(_ command: AgentCommand) async -> CommandResult {
        var result = CommandResult()
        result.commandID = command.id
        switch command.action {
        case .facts(let request):
            do {
                var facts = try await self.facts.collect(includeHookHashes: request.includeHookHashes)
                facts.guardReady = self.freezer.guardReady
                facts.syncfs = self.freezer.syncfs.mode.policy
                facts.syncfsMinDirtyBytes = self.freezer.syncfs.minDirtyBytes
                if let vss = self.vss { facts = await vss.facts(base: facts) }
                result.facts = facts
                result.status = .ok
            } catch {
                result.status = .init(code: .internalError, message: "could not collect facts: \(error)", reason: "facts-failed")
            }
        case .vssFreeze(let request)? where self.vss != nil:
            (result.status, result.vssFreeze) = await self.vss!.freeze(request)
        case .vssThaw(let request)? where self.vss != nil:
            (result.status, result.vssThaw) = await self.vss!.thaw(request)
        case .freezeStatus:
            result.freezeStatus = self.freezer.status()
            result.status = .ok
        case .some(let action) where self.vss != nil:
            result.status = .init(
                code: .unimplemented,
                message: "\(action.name) is not implemented by the Windows agent \(QuiesceVersion.software) (it drives VSS: vss-freeze, vss-thaw)",
                reason: "not-implemented")
        case .runHook(let request):
            if let refusal = self.refuseWhileFrozen("run-hook") {
                result.status = refusal
                return result
            }
            let hook = await self.hooks.run(request)
            result.runHook = hook
            if !hook.ran {
                let reason = hook.refusal == .none ? "hook-spawn-failed" : "hook-" + hook.refusal.reasonCode
                result.status = .init(code: hook.refusal == .none ? .internalError : .failedPrecondition, message: hook.refusalDetail, reason: reason)
            } else {
                result.status = .ok
            }
        case .freeze(let request):
            (result.status, result.freeze) = await self.freezer.freeze(request)
        case .thaw(let request):
            (result.status, result.thaw) = await self.freezer.thaw(request)
        case .hold(let request):
            if let refusal = self.refuseWhileFrozen("hold") {
                result.status = refusal
                return result
            }
            (result.status, result.hold) = await self.holds.start(request)
        case .release(let request):
            (result.status, result.release) = await self.holds.release(request.holdID)
        case .some(let action):
            result.status = .init(
                code: .unimplemented,
                message: "\(action.name) is not implemented by the Linux agent \(QuiesceVersion.software)",
                reason: "not-implemented")
        case nil:
            let detail = command.unknownFields.data.isEmpty ? "no action set" : "an action this agent does not know (is the engine newer?)"
            result.status = .init(code: .unimplemented, message: "unknown command: \(detail)", reason: "unknown-command")
        }
        return result
    }

    /// Nothing starts from disk while frozen (invariant 1).
    private func refuseWhileFrozen(_ action: String) -> AgentStatus? {
        guard let status = Optional(self.freezer.status()), status.frozen else { return nil }
        return .init(code: .failedPrecondition, message: "\(action) refused: freeze \(status.freezeID) is in progress and nothing is started while frozen", reason: "frozen")
    }
}

/// Routes hold events through the freeze controller's per-session event sink.
private final class EventSink: @unchecked Sendable {
    weak var freezer: FreezeController?
    func emit(_ event: Quiesce_Agent_V1_AgentEvent) { self.freezer?.emit(event) }
}
