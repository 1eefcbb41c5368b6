import Foundation
import QuiesceCore
import QuiescePlugins
import QuiescePluginProto
import QuiesceProto
import QuiesceWire

/// How the engine carries out each action kind on the agent, by ActionKind.name: the engine's
/// half of the kind table in QuiescePlugins/ActionKinds.swift (which says where a kind stands,
/// what it blocks, what undoes it and how its thaw reply proves its level). A new platform's
/// kind is one entry there and one performer here.
extension PlanRunner {
    typealias Performer = @Sendable (PlanRunner, PlanStep, _ timeout: Duration, inout RunState) async throws -> StepResult

    static let performers: [String: Performer] = [
        ActionKind.runHook.name: { try await $0.runHook($1, timeout: $2, state: &$3) },
        ActionKind.freeze.name: { try await $0.freeze($1, timeout: $2, state: &$3) },
        ActionKind.thaw.name: { try await $0.thaw($1, timeout: $2, state: &$3) },
        ActionKind.hold.name: { try await $0.hold($1, timeout: $2, state: &$3) },
        ActionKind.release.name: { try await $0.release($1, timeout: $2, state: &$3) },
        ActionKind.vssFreeze.name: { try await $0.vssFreeze($1, timeout: $2, state: &$3) },
        ActionKind.vssThaw.name: { try await $0.vssThaw($1, timeout: $2, state: &$3) },
    ]

    /// The kinds this engine can carry out (every kind of ActionKind.all, checked by a test).
    public static var performedKinds: Set<String> { Set(Self.performers.keys) }

    /// Commands that run a hook get this much longer than the hook's own timeout, for the trip.
    private static let slack: Duration = .seconds(2)

    /// A script or binary on the guest, by name and hash; ok when it exited 0 in time.
    private func runHook(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        guard case .runHook(let action)? = step.action.kind else { return .init(ok: false, detail: "not a run-hook action") }
        let reply = try await self.engine.runHook(.with {
            $0.hook = .init(action.hook)
            $0.args = action.args
            $0.timeoutMs = step.timeoutMs
        }, on: self.instanceID, deadline: timeout + Self.slack)
        guard reply.isOK, let hook = reply.payload else { return .init(ok: false, detail: Self.describe(reply.status)) }
        if !hook.ran { return .init(ok: false, detail: "\(hook.refusal.reasonCode): \(hook.refusalDetail)") }
        if hook.timedOut { return .init(ok: false, detail: "timed out after \(step.timeoutMs) ms (killed)") }
        if hook.signal != 0 { return .init(ok: false, detail: "killed by signal \(hook.signal)") }
        if hook.exitCode != 0 {
            let stderr = String(decoding: hook.stderrTail, as: UTF8.self).split(separator: "\n").last.map { ": \($0)" } ?? ""
            return .init(ok: false, detail: "exit \(hook.exitCode)\(stderr)")
        }
        return .init(ok: true, detail: "")
    }

    /// FIFREEZE of the listed filesystems through the thaw guard, bounded by what is left of the budget.
    private func freeze(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        guard case .freeze(let action)? = step.action.kind else { return .init(ok: false, detail: "not a freeze action") }
        let reply = try await self.engine.freeze(.with {
            $0.freezeID = self.freezeID
            $0.mountPoints = action.mountPoints
            $0.budgetMs = UInt32(self.remainingBudget(state).milliseconds)
            $0.skipSyncfs = action.skipSyncfs
        }, on: self.instanceID, deadline: timeout)
        guard reply.isOK, let freeze = reply.payload, freeze.allFrozen else {
            let failed = reply.payload?.mounts.first { !$0.frozen && !$0.reason.isEmpty }
            let detail = failed.map { "\($0.reason) on \($0.mountPoint)" } ?? Self.describe(reply.status)
            return .init(ok: false, detail: detail)
        }
        state.frozen = true
        state.freezeMounts = action.mountPoints
        let kernel = freeze.mounts.map { $0.syncfsUs + $0.freezeUs }.max().map { Duration.microseconds(Int64($0)) }
        return .init(ok: true, detail: "", agent: reply.elapsed, kernel: kernel)
    }

    /// The engine's thaw command; its reply is the freeze's proof.
    private func thaw(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        let reply = try await self.engine.thaw(self.freezeID, on: self.instanceID, deadline: timeout)
        if let thaw = reply.payload, reply.isOK {
            state.outcome.thaw = thaw
            state.outcome.frozen = .microseconds(Int64(thaw.frozenUs))
            state.frozen = false
            return .init(ok: true, detail: "", agent: reply.elapsed)
        }
        if reply.reason == "unknown-freeze" && !state.frozen { return .init(ok: true, detail: "nothing was frozen") }
        return .init(ok: false, detail: Self.describe(reply.status))
    }

    /// A hook that takes an application lock and keeps it (FTWRL): ok once it printed its ready line.
    private func hold(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        guard case .hold(let action)? = step.action.kind else { return .init(ok: false, detail: "not a hold action") }
        let reply = try await self.engine.hold(.with {
            $0.holdID = action.holdID
            $0.hook = .init(action.hook)
            $0.args = action.args
            $0.readyLine = action.readyLine
            $0.readyTimeoutMs = step.timeoutMs
            $0.maxHoldMs = UInt32(self.budget.milliseconds)
        }, on: self.instanceID, deadline: timeout + Self.slack)
        guard reply.isOK, let hold = reply.payload, hold.ready else {
            // The agent quotes the hook's output after "output: " (or "Output: ").
            let output = reply.payload.map { payload -> Substring in
                guard let range = payload.detail.range(of: "output: ", options: [.backwards, .caseInsensitive]) else { return Substring(payload.detail) }
                return payload.detail[range.upperBound...]
            }
            return .init(ok: false, detail: reply.payload.map { "\($0.refusal == .none ? "not-ready" : $0.refusal.reasonCode): \($0.detail)" }
                ?? Self.describe(reply.status), hookReason: output.flatMap { Self.hookReason(in: $0) })
        }
        return .init(ok: true, detail: "")
    }

    /// Ends a hold; its hook's exit status says whether the lock held to the end.
    private func release(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        guard case .release(let action)? = step.action.kind else { return .init(ok: false, detail: "not a release action") }
        let reply = try await self.engine.release(action.holdID, on: self.instanceID, deadline: timeout + Self.slack)
        guard reply.isOK, let release = reply.payload else { return .init(ok: false, detail: Self.describe(reply.status)) }
        if !release.aliveAtRelease { return .init(ok: false, detail: "hold \(action.holdID) had already ended") }
        let output = Substring(String(decoding: release.outputTail, as: UTF8.self))
        // Released on request, the hook says whether its lock held to the end: exit 0.
        if release.exited && release.exitCode != 0 {
            let why = Self.hookReason(in: output) ?? output.split(separator: "\n").last.map(String.init) ?? ""
            state.brokenHolds[action.holdID] = "hold-failed-at-release: hold \(action.holdID) exited \(release.exitCode) when released: \(why)"
            return .init(ok: false, detail: "exit \(release.exitCode): \(why)")
        }
        for (key, value) in Self.holdMetadata(in: output) { state.outcome.metadata[key] = value }
        return .init(ok: true, detail: "")
    }

    /// A VSS snapshot set: writers freeze, then the volumes' writes are held (at most 10 s).
    private func vssFreeze(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        guard case .vssFreeze(let action)? = step.action.kind else { return .init(ok: false, detail: "not a vss-freeze action") }
        let limit = min(Int64(action.holdLimitMs == 0 ? VssErrors.holdLimitMs : action.holdLimitMs), self.remainingBudget(state).milliseconds)
        let reply = try await self.engine.vssFreeze(.with {
            $0.freezeID = self.freezeID
            $0.volumes = action.volumes
            $0.includeWriters = action.includeWriters
            $0.backupType = action.backupType == "full" ? .full : .copy
            $0.budgetMs = UInt32(limit)
            $0.includeWriterNames = action.includeWritersNamed
            $0.excludeWriterNames = action.excludeWritersNamed
        }, on: self.instanceID, deadline: timeout)
        if let vss = reply.payload { state.outcome.vssWriters = vss.writers }
        guard reply.isOK, let vss = reply.payload, vss.allHeld else {
            let error = reply.payload.map { $0.error.isEmpty ? "" : " (\(VssErrors.describe($0.error, code: $0.errorCode)))" } ?? ""
            return .init(ok: false, detail: Self.describe(reply.status) + (reply.status.message.contains("0x") ? "" : error))
        }
        state.frozen = true
        state.outcome.vssSetID = vss.snapshotSetID
        let kernel = vss.volumes.map { $0.syncfsUs + $0.freezeUs }.max().map { Duration.microseconds(Int64($0)) }
        // Writers that failed before the hold: the hold stands (filesystem-consistent at least).
        let failed = vss.writers.filter { !$0.excluded && !$0.healthy }
        if !failed.isEmpty {
            let reasons = failed.map { Self.writer($0).failureReason }
            if failed.allSatisfy({ action.retryOn.contains($0.lastError) }) && state.attempt < state.attempts {
                // A new snapshot set may cure it: undo this one (the hold is released) and try again.
                return .init(ok: false, detail: reasons.joined(separator: "; "), agent: reply.elapsed, kernel: kernel)
            }
            state.vssWriterFailures = reasons
            return .init(ok: true, detail: reasons.joined(separator: "; "), agent: reply.elapsed, kernel: kernel)
        }
        return .init(ok: true, detail: "", agent: reply.elapsed, kernel: kernel)
    }

    /// Releases the VSS hold; the writers thaw and BackupComplete runs. Its reply is the vss-freeze's proof.
    private func vssThaw(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        let reply = try await self.engine.vssThaw(self.freezeID, on: self.instanceID, deadline: timeout)
        if let vss = reply.payload, reply.isOK {
            state.vssThaw = vss
            state.outcome.thaw = vss.thaw
            state.outcome.frozen = .microseconds(Int64(vss.thaw.frozenUs))
            state.outcome.vssWriters = vss.writers
            state.frozen = false
            let error = vss.error.isEmpty ? "" : VssErrors.describe(vss.error, code: vss.errorCode)
            return .init(ok: true, detail: error, agent: reply.elapsed)
        }
        if reply.reason == "unknown-freeze" && !state.frozen { return .init(ok: true, detail: "nothing was frozen") }
        return .init(ok: false, detail: Self.describe(reply.status))
    }
}
