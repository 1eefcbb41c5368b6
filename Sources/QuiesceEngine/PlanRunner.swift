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
    /// `afterQuiesce` hears, as soon as the quiesce phase is over, whether the snapshot follows
    /// (a consistency group's other members must not wait, frozen, for one that failed).
    public func run(_ plan: Plan, afterQuiesce: (@Sendable (_ snapshotFollows: Bool) async -> Void)? = nil,
                    snapshot: @Sendable () async throws -> Void) async -> PlanOutcome {
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
                    if result.ok { state.proving.append(.init(action: step.action, holdsWrites: ActionKind.of(step.action)?.holdsWrites ?? false)) }
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
                state.proving = []
                state.brokenHolds = [:]
                state.vssWriterFailures = []
                try? await Task.sleep(for: backoff.next())
            }
        }

        if let afterQuiesce { await afterQuiesce(!state.outcome.failed) }
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
        /// The quiesce steps that succeeded in the last attempt: each is judged by its kind's verdict.
        var proving: [ProvingStep] = []
        var firstBlock: ContinuousClock.Instant?
        var lastBlockEnd: ContinuousClock.Instant?
        var freezeMounts: [String] = []
        /// Holds whose hook said at release that its lock did not hold (exit code not 0).
        var brokenHolds: [String: String] = [:]
        var attempts = 1
        /// VSS: the set whose writes a vss-freeze step holds (none before one succeeded), and its thaw reply.
        var vssSetID: String? { self.outcome.vssSetID.isEmpty ? nil : self.outcome.vssSetID }
        var vssThaw: Quiesce_Agent_V1_VssThawResult?
        /// VSS writers that failed before the hold (the hold still stands): each caps the level at filesystem.
        var vssWriterFailures: [String] = []
    }

    struct ProvingStep {
        var action: PlanAction
        var holdsWrites: Bool
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
            if let kind = ActionKind.of(step.action), let perform = Self.performers[kind.name] {
                result = try await perform(self, step, timeout, &state)
            } else {
                result = StepResult(ok: false, detail: "unknown action")
            }
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
    func remainingBudget(_ state: RunState) -> Duration {
        let spent = state.firstBlock.map { ContinuousClock.now - $0 } ?? .zero
        return max(self.budget - spent, .milliseconds(100))
    }

    /// Invariant 3: above crash only with a thaw reply that proves the freeze held. Each quiesce
    /// step that succeeded is judged by its kind (ActionKind.verdict) on the same evidence, the
    /// write-holding step first: without its proof nothing above crash holds.
    private func prove(_ state: inout RunState) {
        if let first = state.firstBlock, let last = state.lastBlockEnd { state.outcome.blocked = last - first }
        let provers = state.proving.sorted { ($0.holdsWrites ? 0 : 1) < ($1.holdsWrites ? 0 : 1) }
        if state.outcome.achieved > .crash && state.outcome.snapshotTaken && !provers.contains(where: \.holdsWrites) {
            state.outcome.achieved = .crash
            state.outcome.reasons.append("not-frozen: no freeze held across the snapshot")
        }
        let evidence = self.evidence(state)
        for step in provers {
            guard let kind = ActionKind.of(step.action) else { continue }
            // The lowest ceiling the step's findings set, with every reason at it (several VSS writers);
            // a reply that contradicts the run only matters for a snapshot that was taken.
            let findings = kind.verdict(step.action, evidence).filter {
                $0.ceiling < state.outcome.achieved && ($0.ceiling > .crash || state.outcome.snapshotTaken)
            }
            guard let ceiling = findings.map(\.ceiling).min() else { continue }
            state.outcome.achieved = ceiling
            state.outcome.reasons += findings.filter { $0.ceiling == ceiling }.map(\.reason)
        }
        if state.outcome.achieved < .application { state.outcome.metadata = [:] }
        if !state.outcome.snapshotTaken { state.outcome.achieved = min(state.outcome.achieved, .crash) }
        if let minimum = ConsistencyLevel(self.policy.minimum), state.outcome.achieved < minimum, !state.outcome.failed {
            state.outcome.failed = true
            state.outcome.reasons.append("below-minimum: reached \(state.outcome.achieved.name), the policy needs at least \(minimum.name)")
        }
    }

    /// What the replies said, in the terms of ThawEvidence.
    private func evidence(_ state: RunState) -> ThawEvidence {
        var evidence = ThawEvidence(freezeID: self.freezeID, brokenReleases: state.brokenHolds)
        if let thaw = state.outcome.thaw {
            evidence.thaw = .init(freezeID: thaw.freezeID, cause: thaw.cause.word, frozenMs: thaw.frozenUs / 1000, withinBudget: thaw.withinBudget,
                                  holds: Dictionary(thaw.holds.map { ($0.holdID, $0.aliveAtThaw) }, uniquingKeysWith: { $0 && $1 }))
        }
        if let setID = state.vssSetID {
            var vss = ThawEvidence.Vss(setID: setID, failuresBeforeHold: state.vssWriterFailures)
            if let reply = state.vssThaw {
                vss.thawSetID = reply.snapshotSetID
                vss.writesHeld = reply.writesHeld
                vss.error = reply.error
                vss.errorCode = reply.errorCode
                vss.writersAfter = reply.writers.map(Self.writer)
            }
            evidence.vss = vss
        }
        return evidence
    }

    /// A writer from the agent's reply, as the proof and the report read it.
    public static func writer(_ writer: Quiesce_Agent_V1_VssWriter) -> ThawEvidence.Writer {
        .init(name: writer.name, state: writer.state, lastError: writer.lastError, lastErrorCode: writer.lastErrorCode, excluded: writer.excluded)
    }

    static func describe(_ status: AgentStatus) -> String {
        let reason = status.reason.isEmpty ? status.rpcCode.description : status.reason
        return status.message.isEmpty ? reason : "\(reason): \(status.message)"
    }
}
