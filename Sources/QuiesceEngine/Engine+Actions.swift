import GRPCCore
import QuiesceCore
import QuiesceProto
import QuiesceWire

/// An agent's answer to one action: its status, and the payload when it sent one
/// (a refused freeze still says which mount refused and why).
public struct AgentReply<Payload: Sendable>: Sendable {
    public var status: AgentStatus
    public var payload: Payload?
    /// Time the agent spent, measured on the guest.
    public var elapsed: Duration

    public var isOK: Bool { self.status.isOK }
    /// The stable machine-readable reason (e.g. "freeze-ebusy", "hook-wrong-mode").
    public var reason: String { self.status.reason }
}

/// Typed calls for every built-in action, with deadlines: what the coordinator uses.
/// They throw only when no answer came (no session, session lost, deadline, cancellation);
/// an answer with a failure status is returned for the caller to judge.
extension Engine {
    private func call<P>(
        _ action: AgentCommand.OneOf_Action, to instanceID: String, deadline: Duration,
        extract: (CommandResult.OneOf_Payload?) -> P?
    ) async throws -> AgentReply<P> {
        let result = try await self.send(action, to: instanceID, deadline: deadline)
        return AgentReply(status: result.status, payload: extract(result.payload), elapsed: .microseconds(Int64(result.elapsedUs)))
    }

    /// Runs a hook (the seed's pre/postscript or a named hook, optionally pinned by SHA-256).
    public func runHook(_ request: Quiesce_Agent_V1_RunHookRequest, on instanceID: String, deadline: Duration? = nil) async throws
        -> AgentReply<Quiesce_Agent_V1_HookResult>
    {
        // The agent's own timeout kills the hook; the deadline leaves room for that and the answer.
        let timeout: Duration = request.timeoutMs > 0 ? .milliseconds(Int64(request.timeoutMs)) : .seconds(60)
        return try await self.call(.runHook(request), to: instanceID, deadline: deadline ?? timeout + .seconds(5)) {
            if case .runHook(let value)? = $0 { value } else { nil }
        }
    }

    /// Freezes mounts on an instance. From the moment this is sent until the
    /// matching ``thaw(_:on:deadline:)`` (or the budget plus slack), the engine
    /// sends this agent a heartbeat every 250 ms: the agent thaws after 1 s without one.
    public func freeze(_ request: Quiesce_Agent_V1_FreezeRequest, on instanceID: String, deadline: Duration = .seconds(30)) async throws
        -> AgentReply<Quiesce_Agent_V1_FreezeResult>
    {
        let budget: Duration = request.budgetMs > 0 ? .milliseconds(Int64(request.budgetMs)) : .seconds(10)
        return try await self.holding(.freeze(request), freezeID: request.freezeID, on: instanceID, budget: budget, deadline: deadline) {
            if case .freeze(let v)? = $0 { v } else { nil }
        } held: { $0.allFrozen }
    }

    /// Sends an action that freezes (or holds writes) with the freeze heartbeats running: they
    /// start before it is sent and stop unless `held` says writes are now held (the thaw stops
    /// them then). An unanswered freeze is thawed by the agent's silence rule once they stop.
    private func holding<P>(
        _ action: AgentCommand.OneOf_Action, freezeID: String, on instanceID: String, budget: Duration, deadline: Duration,
        extract: (CommandResult.OneOf_Payload?) -> P?, held: (P) -> Bool
    ) async throws -> AgentReply<P> {
        let session = try await self.liveSession(for: instanceID)
        session.beginFreezeHeartbeats(freezeID, limit: deadline + budget + .seconds(2))
        do {
            let result = try await session.send(action, deadline: deadline)
            let payload = extract(result.payload)
            if !(result.status.isOK && payload.map(held) == true) { session.endFreezeHeartbeats(freezeID) }
            return AgentReply(status: result.status, payload: payload, elapsed: .microseconds(Int64(result.elapsedUs)))
        } catch {
            session.endFreezeHeartbeats(freezeID)
            throw error
        }
    }

    /// Thaws freeze `freezeID`. The reply's cause is the proof: only `.command` means the freeze held until now.
    public func thaw(_ freezeID: String, on instanceID: String, deadline: Duration = .seconds(10)) async throws
        -> AgentReply<Quiesce_Agent_V1_ThawResult>
    {
        var request = Quiesce_Agent_V1_ThawRequest()
        request.freezeID = freezeID
        defer { Task { await self.registry.session(for: instanceID)?.endFreezeHeartbeats(freezeID) } }
        return try await self.call(.thaw(request), to: instanceID, deadline: deadline) {
            if case .thaw(let value)? = $0 { value } else { nil }
        }
    }

    /// Starts a VSS snapshot set on a Windows agent; answered once the volumes' writes are held
    /// (or the set failed). Heartbeats as for ``freeze(_:on:deadline:)``: the agent releases the hold
    /// after 1 s without one.
    public func vssFreeze(_ request: Quiesce_Agent_V1_VssFreezeRequest, on instanceID: String, deadline: Duration = .seconds(30)) async throws
        -> AgentReply<Quiesce_Agent_V1_VssFreezeResult>
    {
        let budget: Duration = .milliseconds(Int64(request.budgetMs > 0 ? request.budgetMs : VssErrors.holdLimitMs))
        return try await self.holding(.vssFreeze(request), freezeID: request.freezeID, on: instanceID, budget: budget, deadline: deadline) {
            if case .vssFreeze(let v)? = $0 { v } else { nil }
        } held: { $0.allHeld }
    }

    /// Releases a VSS set's hold and finishes the set (writers thaw, BackupComplete). The reply's
    /// thaw cause, `writes_held` and writer states are the proof.
    public func vssThaw(_ freezeID: String, on instanceID: String, deadline: Duration = .seconds(30)) async throws
        -> AgentReply<Quiesce_Agent_V1_VssThawResult>
    {
        var request = Quiesce_Agent_V1_VssThawRequest()
        request.freezeID = freezeID
        defer { Task { await self.registry.session(for: instanceID)?.endFreezeHeartbeats(freezeID) } }
        return try await self.call(.vssThaw(request), to: instanceID, deadline: deadline) {
            if case .vssThaw(let value)? = $0 { value } else { nil }
        }
    }

    public func freezeStatus(of instanceID: String, deadline: Duration = .seconds(5)) async throws -> AgentReply<Quiesce_Agent_V1_FreezeStatus> {
        try await self.call(.freezeStatus(.init()), to: instanceID, deadline: deadline) {
            if case .freezeStatus(let value)? = $0 { value } else { nil }
        }
    }

    /// Starts a hold and waits for its ready line.
    public func hold(_ request: Quiesce_Agent_V1_HoldRequest, on instanceID: String, deadline: Duration? = nil) async throws
        -> AgentReply<Quiesce_Agent_V1_HoldResult>
    {
        let ready: Duration = request.readyTimeoutMs > 0 ? .milliseconds(Int64(request.readyTimeoutMs)) : .seconds(30)
        return try await self.call(.hold(request), to: instanceID, deadline: deadline ?? ready + .seconds(5)) {
            if case .hold(let value)? = $0 { value } else { nil }
        }
    }

    public func release(_ holdID: String, on instanceID: String, deadline: Duration = .seconds(10)) async throws
        -> AgentReply<Quiesce_Agent_V1_ReleaseResult>
    {
        var request = Quiesce_Agent_V1_ReleaseRequest()
        request.holdID = holdID
        return try await self.call(.release(request), to: instanceID, deadline: deadline) {
            if case .release(let value)? = $0 { value } else { nil }
        }
    }

    /// Events the instance's agent sent unasked on its current session.
    public func events(of instanceID: String) async -> [Quiesce_Agent_V1_AgentEvent] {
        await self.registry.session(for: instanceID)?.events ?? []
    }
}
