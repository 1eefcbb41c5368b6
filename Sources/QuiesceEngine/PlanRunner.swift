import Foundation
import QuiesceCore
import QuiescePlugins
import QuiescePluginProto
import QuiesceProto
import QuiesceWire

/// What happened when a plan ran on one instance.
public struct PlanOutcome: Sendable {
    public struct StepRecord: Sendable {
        public var phase: String
        public var id: String
        public var action: String
        public var ok: Bool
        /// "exit 3", "freeze-ebusy: …", "timed out", "" when it worked.
        public var detail: String
        /// The whole call, engine clock: from sending the command to reading its answer.
        public var elapsed: Duration
        public var attempt: Int
        /// The agent's share of `elapsed` (its own clock, from reading the command to sending the answer).
        public var agent: Duration?
        /// The kernel's share of that (freeze: the slowest mount's syncfs + FIFREEZE, measured by the thaw guard).
        public var kernel: Duration?
        /// Whether the step's kind holds writes across the snapshot (ActionKind.holdsWrites): a freeze, a VSS hold.
        public var holdsWrites: Bool = false

        public init(phase: String, id: String, action: String, ok: Bool, detail: String, elapsed: Duration, attempt: Int,
                    agent: Duration? = nil, kernel: Duration? = nil) {
            self.phase = phase
            self.id = id
            self.action = action
            self.ok = ok
            self.detail = detail
            self.elapsed = elapsed
            self.attempt = attempt
            self.agent = agent
            self.kernel = kernel
        }
    }

    public var instanceID: String
    public var plugin: String
    /// What the plan expected if every step worked.
    public var planned: ConsistencyLevel
    /// What the thaw reply proves (invariant 3), never more than planned.
    public var achieved: ConsistencyLevel
    /// A `fail` step failed, the snapshot failed, or `achieved` is below the policy's minimum.
    public var failed: Bool
    /// Why `achieved` is below the policy's wanted level, or why it failed, each "code: detail".
    public var reasons: [String]
    /// Problems after the snapshot that do not change its level (a thaw script that failed).
    public var warnings: [String]
    public var steps: [StepRecord]
    public var snapshotTaken: Bool
    public var freezeID: String
    /// The agent's thaw reply, when a freeze was thawed.
    public var thaw: Quiesce_Agent_V1_ThawResult?
    /// The filesystems' frozen window, measured on the guest.
    public var frozen: Duration?
    /// From the start of the first blocking step to the end of the last one (the application's stall), measured by the engine.
    public var blocked: Duration?
    /// What holds recorded under their lock (`quiesce-meta KEY=VALUE` lines: a binlog position, a GTID, a marker),
    /// kept only when the hold proved it held until its release.
    public var metadata: [String: String] = [:]
    /// Windows: the VSS writers' states after the set (or when it failed), and the set's id.
    public var vssWriters: [Quiesce_Agent_V1_VssWriter] = []
    public var vssSetID: String = ""
}

/// Runs a validated plan against a connected agent: prepare, quiesce, the
/// snapshot (a closure), thaw, cleanup. The level it records is the one the
/// thaw reply proves: thawed by command, same freeze id, within budget, every
/// hold alive at thaw (ARCHITECTURE.md, invariant 3).
public struct PlanRunner: Sendable {
    public var engine: Engine
    public var instanceID: String
    public var policy: PlanPolicy
    /// Unique per run and instance; the thaw must name it.
    public var freezeID: String

    public init(engine: Engine, instanceID: String, policy: PlanPolicy, freezeID: String) {
        self.engine = engine
        self.instanceID = instanceID
        self.policy = policy
        self.freezeID = freezeID
    }

    var budget: Duration { .milliseconds(Int64(self.policy.freezeBudgetMs == 0 ? 10_000 : self.policy.freezeBudgetMs)) }

    /// Runs `plan`; `snapshot` is called once, after the quiesce phase, unless the instance already failed.
    public func run(_ plan: Plan, snapshot: @Sendable () async throws -> Void) async -> PlanOutcome {
        let planned = ConsistencyLevel(plan.expected) ?? .crash
        var state = RunState(
            outcome: PlanOutcome(
                instanceID: self.instanceID, plugin: plan.plugin, planned: planned, achieved: planned, failed: false,
                reasons: plan.reasons, warnings: [], steps: [], snapshotTaken: false, freezeID: self.freezeID))

        for step in plan.prepare {
            let result = await self.execute(step, phase: "prepare", state: &state)
            if !result.ok { self.apply(step, result, to: &state) }
            if state.outcome.failed { break }
        }

        // Quiesce, with retries of the whole phase.
        var started: [PlanStep] = []
        if !state.outcome.failed {
            let attempts = Int(plan.quiesceRetries) + 1
            var backoff = Backoff(base: .milliseconds(200), cap: .seconds(2), floor: .milliseconds(50))
            let levelBefore = state.outcome.achieved, reasonsBefore = state.outcome.reasons
            state.attempts = attempts
            for attempt in 1...attempts {
                state.attempt = attempt
                started = []
                var failure: (PlanStep, StepResult)?
                for step in plan.quiesce {
                    started.append(step)
                    let result = await self.execute(step, phase: "quiesce", state: &state)
                    if !result.ok {
                        if attempt < attempts { failure = (step, result); break }
                        self.apply(step, result, to: &state)
                        if state.outcome.failed { break }
                    }
                }
                guard let failure, attempt < attempts else { break }
                // Undo what started, wait (never while frozen: everything is undone), try again.
                await self.undo(started, plan: plan, state: &state, for: .retry)
                state.outcome.warnings.append("quiesce attempt \(attempt) failed at \(failure.0.id): \(failure.1.detail); retrying")
                state.outcome.achieved = levelBefore
                state.outcome.reasons = reasonsBefore
                state.frozen = false
                state.heldIDs = []
                state.vssWriterFailures = []
                try? await Task.sleep(for: backoff.next())
            }
        }

        if !state.outcome.failed {
            let begin = ContinuousClock.now
            do {
                try await snapshot()
                state.outcome.snapshotTaken = true
            } catch {
                state.outcome.failed = true
                state.outcome.reasons.append("snapshot-failed: \(error)")
            }
            state.outcome.steps.append(.init(phase: "snapshot", id: "snapshot", action: "snapshot", ok: state.outcome.snapshotTaken,
                                             detail: state.outcome.snapshotTaken ? "" : "\(state.outcome.reasons.last ?? "")",
                                             elapsed: .now - begin, attempt: state.attempt))
        }

        await self.undo(started, plan: plan, state: &state, for: .thaw)
        for step in plan.cleanup {
            let result = await self.execute(step, phase: "cleanup", state: &state)
            if !result.ok { state.outcome.warnings.append("\(step.id) failed: \(result.detail)") }
        }
        self.prove(&state)
        return state.outcome
    }

    // MARK: - Steps

    struct RunState {
        var outcome: PlanOutcome
        var attempt = 1
        var frozen = false
        var heldIDs: [String] = []
        var firstBlock: ContinuousClock.Instant?
        var lastBlockEnd: ContinuousClock.Instant?
        var freezeMounts: [String] = []
        /// Holds whose hook said at release that its lock did not hold (exit code not 0).
        var brokenHolds: [String] = []
        var attempts = 1
        /// VSS: the set whose writes a vss-freeze step holds (none before one succeeded), and its thaw reply.
        var vssSetID: String? { self.outcome.vssSetID.isEmpty ? nil : self.outcome.vssSetID }
        var vssThaw: Quiesce_Agent_V1_VssThawResult?
        /// VSS writers that failed before the hold (the hold still stands): each caps the level at filesystem.
        var vssWriterFailures: [String] = []
    }

    struct StepResult {
        var ok: Bool
        var detail: String
        var agent: Duration? = nil
        var kernel: Duration? = nil
        /// The hook named why it failed (its last line of output, `code: detail`): recorded instead of the step's generic reason.
        var hookReason: String? = nil
    }

    /// Why the started quiesce steps are being undone.
    private enum UndoCause {
        /// The run's thaw phase: also runs the thaw steps that undo nothing (a postscript).
        case thaw
        /// A failed quiesce attempt before another: only what undoes a started step.
        case retry

        /// The phase the steps are recorded under.
        var phase: String { self == .thaw ? "thaw" : "undo" }
    }

    /// Runs the thaw-phase steps that undo the started quiesce steps (and, for the thaw, those that undo nothing), in plan order.
    private func undo(_ started: [PlanStep], plan: Plan, state: inout RunState, for cause: UndoCause) async {
        let startedUndos = Set(started.map(\.undo))
        let allUndos = Set(plan.quiesce.map(\.undo))
        for step in plan.thaw where startedUndos.contains(step.id) || (!allUndos.contains(step.id) && cause == .thaw) {
            let result = await self.execute(step, phase: cause.phase, state: &state)
            if !result.ok { state.outcome.warnings.append("\(step.id) failed: \(result.detail)") }
        }
    }

    private func apply(_ step: PlanStep, _ result: StepResult, to state: inout RunState) {
        let reason = step.onFailure.reason.isEmpty ? "\(step.id)-failed" : step.onFailure.reason
        let text = result.hookReason ?? "\(reason): \(result.detail)"
        switch step.onFailure.outcome {
        case .downgradeTo(let level)?:
            let level = ConsistencyLevel(level) ?? .crash
            if level < state.outcome.achieved { state.outcome.achieved = level }
            state.outcome.reasons.append(text)
        case .fail?, nil:
            state.outcome.failed = true
            state.outcome.reasons.append(text)
        }
    }

    /// A hook may say why it failed in its own words: when the last line of its
    /// output reads `code: detail` with a kebab-case code of at least two words
    /// (`mariadb-lock-timeout: no lock within 500 ms; …`), that line is the reason
    /// recorded, instead of the step's generic one.
    static func hookReason(in output: Substring) -> String? {
        guard let line = output.split(separator: "\n").last(where: { !$0.allSatisfy(\.isWhitespace) }),
              let colon = line.firstIndex(of: ":") else { return nil }
        let code = line[..<colon]
        guard code.contains("-"), code.first.map({ $0.isASCII && $0.isLowercase }) == true, code.last != "-",
              code.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "-") }) else { return nil }
        return String(line.prefix(1000))
    }

    /// `quiesce-meta KEY=VALUE` lines of a hold's output: what it recorded under its lock.
    static func holdMetadata(in output: Substring) -> [String: String] {
        var metadata: [String: String] = [:]
        for line in output.split(separator: "\n") where line.hasPrefix("quiesce-meta ") {
            let pair = line.dropFirst("quiesce-meta ".count)
            guard let equals = pair.firstIndex(of: "=") else { continue }
            let key = pair[..<equals], value = pair[pair.index(after: equals)...]
            guard !key.isEmpty, key.count <= 64, value.count <= 256,
                  key.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "_" || $0 == "-") }) else { continue }
            metadata[String(key)] = String(value)
        }
        return metadata
    }

    private func execute(_ step: PlanStep, phase: String, state: inout RunState) async -> StepResult {
        let begin = ContinuousClock.now
        // A hold blocks the application from its ready line on (the lock is taken just before it),
        // not while its hook starts: counted from its answer below.
        let isHold: Bool = if case .hold? = step.action.kind { true } else { false }
        if step.blocking && !isHold && state.firstBlock == nil { state.firstBlock = begin }
        let timeout = Duration.milliseconds(Int64(step.timeoutMs))
        let result: StepResult
        do {
            result = try await self.perform(step, timeout: timeout, state: &state)
        } catch {
            result = StepResult(ok: false, detail: "no answer: \(error)")
        }
        let end = ContinuousClock.now
        if step.blocking && isHold && result.ok && state.firstBlock == nil { state.firstBlock = end }
        if step.blocking { state.lastBlockEnd = end }
        var record = PlanOutcome.StepRecord(phase: phase, id: step.id, action: step.actionSummary, ok: result.ok, detail: result.detail,
                                            elapsed: end - begin, attempt: state.attempt, agent: result.agent, kernel: result.kernel)
        record.holdsWrites = ActionKind.of(step.action)?.holdsWrites ?? false
        state.outcome.steps.append(record)
        return result
    }

    /// What is left of the freeze budget: it counts from the first step that blocked writes, not from the FIFREEZE.
    private func remainingBudget(_ state: RunState) -> Duration {
        let spent = state.firstBlock.map { ContinuousClock.now - $0 } ?? .zero
        return max(self.budget - spent, .milliseconds(100))
    }

    private func perform(_ step: PlanStep, timeout: Duration, state: inout RunState) async throws -> StepResult {
        let slack: Duration = .seconds(2)
        switch step.action.kind {
        case .runHook(let action)?:
            let reply = try await self.engine.runHook(.with {
                $0.hook = .init(action.hook)
                $0.args = action.args
                $0.timeoutMs = step.timeoutMs
            }, on: self.instanceID, deadline: timeout + slack)
            guard reply.isOK, let hook = reply.payload else { return .init(ok: false, detail: Self.describe(reply.status)) }
            if !hook.ran { return .init(ok: false, detail: "\(hook.refusal.reasonCode): \(hook.refusalDetail)") }
            if hook.timedOut { return .init(ok: false, detail: "timed out after \(step.timeoutMs) ms (killed)") }
            if hook.signal != 0 { return .init(ok: false, detail: "killed by signal \(hook.signal)") }
            if hook.exitCode != 0 {
                let stderr = String(decoding: hook.stderrTail, as: UTF8.self).split(separator: "\n").last.map { ": \($0)" } ?? ""
                return .init(ok: false, detail: "exit \(hook.exitCode)\(stderr)")
            }
            return .init(ok: true, detail: "")
        case .freeze(let action)?:
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
        case .thaw?:
            let reply = try await self.engine.thaw(self.freezeID, on: self.instanceID, deadline: timeout)
            if let thaw = reply.payload, reply.isOK {
                state.outcome.thaw = thaw
                state.outcome.frozen = .microseconds(Int64(thaw.frozenUs))
                state.frozen = false
                return .init(ok: true, detail: "", agent: reply.elapsed)
            }
            if reply.reason == "unknown-freeze" && !state.frozen { return .init(ok: true, detail: "nothing was frozen") }
            return .init(ok: false, detail: Self.describe(reply.status))
        case .hold(let action)?:
            let reply = try await self.engine.hold(.with {
                $0.holdID = action.holdID
                $0.hook = .init(action.hook)
                $0.args = action.args
                $0.readyLine = action.readyLine
                $0.readyTimeoutMs = step.timeoutMs
                $0.maxHoldMs = UInt32(self.budget.milliseconds)
            }, on: self.instanceID, deadline: timeout + slack)
            guard reply.isOK, let hold = reply.payload, hold.ready else {
                // The agent quotes the hook's output after "output: " (or "Output: ").
                let output = reply.payload.map { payload -> Substring in
                    guard let range = payload.detail.range(of: "output: ", options: [.backwards, .caseInsensitive]) else { return Substring(payload.detail) }
                    return payload.detail[range.upperBound...]
                }
                return .init(ok: false, detail: reply.payload.map { "\($0.refusal == .none ? "not-ready" : $0.refusal.reasonCode): \($0.detail)" }
                    ?? Self.describe(reply.status), hookReason: output.flatMap { Self.hookReason(in: $0) })
            }
            state.heldIDs.append(action.holdID)
            return .init(ok: true, detail: "")
        case .release(let action)?:
            let reply = try await self.engine.release(action.holdID, on: self.instanceID, deadline: timeout + slack)
            guard reply.isOK, let release = reply.payload else { return .init(ok: false, detail: Self.describe(reply.status)) }
            if !release.aliveAtRelease { return .init(ok: false, detail: "hold \(action.holdID) had already ended") }
            let output = Substring(String(decoding: release.outputTail, as: UTF8.self))
            // Released on request, the hook says whether its lock held to the end: exit 0.
            if release.exited && release.exitCode != 0 {
                let why = Self.hookReason(in: output) ?? output.split(separator: "\n").last.map(String.init) ?? ""
                state.brokenHolds.append("hold-failed-at-release: hold \(action.holdID) exited \(release.exitCode) when released: \(why)")
                return .init(ok: false, detail: "exit \(release.exitCode): \(why)")
            }
            for (key, value) in Self.holdMetadata(in: output) { state.outcome.metadata[key] = value }
            return .init(ok: true, detail: "")
        case .vssFreeze(let action)?:
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
                let reasons = failed.map(Self.writerReason)
                if failed.allSatisfy({ action.retryOn.contains($0.lastError) }) && state.attempt < state.attempts {
                    // A new snapshot set may cure it: undo this one (the hold is released) and try again.
                    return .init(ok: false, detail: reasons.joined(separator: "; "), agent: reply.elapsed, kernel: kernel)
                }
                state.vssWriterFailures = reasons
                return .init(ok: true, detail: reasons.joined(separator: "; "), agent: reply.elapsed, kernel: kernel)
            }
            return .init(ok: true, detail: "", agent: reply.elapsed, kernel: kernel)
        case .vssThaw?:
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
        case nil:
            return .init(ok: false, detail: "unknown action")
        }
    }

    /// "vss-writer-failed: SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)".
    static func writerReason(_ writer: Quiesce_Agent_V1_VssWriter) -> String {
        let error = writer.lastError.isEmpty ? "" : " " + VssErrors.describe(writer.lastError, code: writer.lastErrorCode)
        return "vss-writer-failed: \(writer.name) \(writer.state)\(error)"
    }

    /// Invariant 3: above crash only with a thaw reply that proves the freeze held.
    private func prove(_ state: inout RunState) {
        if let first = state.firstBlock, let last = state.lastBlockEnd { state.outcome.blocked = last - first }
        // The steps that held writes across the snapshot (a freeze, a VSS hold): see ActionKind.holdsWrites.
        let froze = state.outcome.steps.contains { $0.phase == "quiesce" && $0.ok && $0.holdsWrites }
        if state.outcome.achieved > .crash {
            var broken: String?
            if !froze {
                broken = "not-frozen: no freeze held across the snapshot"
            } else if let setID = state.vssSetID, let vss = state.vssThaw, !vss.writesHeld || vss.snapshotSetID != setID {
                // VSS: the reply must name this set and say its writes were held until the engine's thaw.
                if vss.snapshotSetID != setID {
                    broken = "vss-set-mismatch: the thaw reply names snapshot set \(vss.snapshotSetID), not \(setID)"
                } else if vss.error == "VSS_E_HOLD_WRITES_TIMEOUT" || vss.thaw.cause == .budget {
                    broken = "vss-hold-timeout: \(VssErrors.describe("VSS_E_HOLD_WRITES_TIMEOUT")): the hold of writes ended after \(vss.thaw.frozenUs / 1000) ms, before the engine's thaw"
                } else {
                    broken = "vss-hold-lost: writes were released by \(vss.thaw.cause.word), not the engine's thaw\(vss.error.isEmpty ? "" : " (\(VssErrors.describe(vss.error, code: vss.errorCode)))")"
                }
            } else if state.vssSetID != nil && state.vssThaw == nil {
                broken = "thaw-unproven: no VSS thaw reply for snapshot set \(state.vssSetID!)"
            } else if let thaw = state.outcome.thaw {
                if thaw.freezeID != self.freezeID {
                    broken = "thaw-mismatch: the thaw reply names freeze \(thaw.freezeID), not \(self.freezeID)"
                } else if thaw.cause != .command {
                    broken = "thawed-by-\(thaw.cause.word): the freeze ended before the engine asked (frozen \(thaw.frozenUs / 1000) ms)"
                } else if !thaw.withinBudget {
                    broken = "over-budget: frozen \(thaw.frozenUs / 1000) ms, beyond the budget"
                } else if let dead = thaw.holds.first(where: { !$0.aliveAtThaw }) {
                    broken = "hold-died: hold \(dead.holdID) had ended before the thaw"
                } else if let missing = state.heldIDs.first(where: { id in !thaw.holds.contains { $0.holdID == id } }) {
                    broken = "hold-died: hold \(missing) was gone at the thaw"
                }
            } else {
                broken = "thaw-unproven: no thaw reply for freeze \(self.freezeID)"
            }
            if let broken, state.outcome.snapshotTaken {
                state.outcome.achieved = .crash
                state.outcome.reasons.append(broken)
            }
        }
        // A hold that says its lock did not hold (its session was lost): the freeze still held.
        if state.outcome.achieved == .application, let broken = state.brokenHolds.first {
            state.outcome.achieved = .filesystem
            state.outcome.reasons.append(broken)
        }
        // VSS writers: application only when every writer in the set failed nowhere and was STABLE after BackupComplete.
        if state.outcome.achieved == .application, state.vssSetID != nil {
            var failures = state.vssWriterFailures
            if let vss = state.vssThaw {
                for writer in vss.writers where !writer.excluded && writer.state != "STABLE" {
                    let reason = Self.writerReason(writer)
                    if !failures.contains(reason) { failures.append(reason) }
                }
            }
            if !failures.isEmpty {
                state.outcome.achieved = .filesystem
                state.outcome.reasons += failures
            }
        }
        if state.outcome.achieved < .application { state.outcome.metadata = [:] }
        if !state.outcome.snapshotTaken { state.outcome.achieved = min(state.outcome.achieved, .crash) }
        if let minimum = ConsistencyLevel(self.policy.minimum), state.outcome.achieved < minimum, !state.outcome.failed {
            state.outcome.failed = true
            state.outcome.reasons.append("below-minimum: reached \(state.outcome.achieved.name), the policy needs at least \(minimum.name)")
        }
    }

    static func describe(_ status: AgentStatus) -> String {
        let reason = status.reason.isEmpty ? status.rpcCode.description : status.reason
        return status.message.isEmpty ? reason : "\(reason): \(status.message)"
    }
}
