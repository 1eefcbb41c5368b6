import QuiesceCore

/// What the agent's replies said about one run's quiesce, in terms every action kind can read:
/// the plan runner fills it from the thaw (or VSS thaw) reply and what its steps saw, and each
/// quiesce step's kind judges it (`ActionKind.verdict`). Nothing here is trusted beyond what
/// the replies say: a missing reply is evidence too.
public struct ThawEvidence: Sendable, Equatable {
    /// The thaw reply: the agent's own account of how the freeze ended.
    public struct Thaw: Sendable, Equatable {
        /// The freeze it names.
        public var freezeID: String
        /// What ended it: "command" (the engine's thaw), "budget", "session-lost", "guard" …
        public var cause: String
        public var frozenMs: UInt64
        public var withinBudget: Bool
        /// Holds the agent had at the thaw, by id: alive then or not.
        public var holds: [String: Bool]

        public init(freezeID: String, cause: String, frozenMs: UInt64, withinBudget: Bool, holds: [String: Bool] = [:]) {
            self.freezeID = freezeID
            self.cause = cause
            self.frozenMs = frozenMs
            self.withinBudget = withinBudget
            self.holds = holds
        }
    }

    /// A VSS writer as the agent reported it.
    public struct Writer: Sendable, Equatable {
        public var name: String
        /// "STABLE", "FAILED_AT_FREEZE" …
        public var state: String
        /// "VSS_E_WRITERERROR_NONRETRYABLE", or "".
        public var lastError: String
        public var lastErrorCode: UInt32
        /// Left out of the set by the plan (include/exclude): never counted.
        public var excluded: Bool

        public init(name: String, state: String, lastError: String = "", lastErrorCode: UInt32 = 0, excluded: Bool = false) {
            self.name = name
            self.state = state
            self.lastError = lastError
            self.lastErrorCode = lastErrorCode
            self.excluded = excluded
        }

        /// "SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)", "Registry Writer STABLE".
        var described: String {
            "\(self.name) \(self.state)" + (self.lastError.isEmpty ? "" : " " + VssErrors.describe(self.lastError, code: self.lastErrorCode))
        }

        /// What the run report lists: the writer's state and error, or "Registry Writer excluded".
        public var outcome: String { self.excluded ? "\(self.name) excluded" : self.described }

        /// "vss-writer-failed: SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)".
        public var failureReason: String { "vss-writer-failed: " + self.described }
    }

    /// What VSS said: the set the hold belongs to, and how its thaw went.
    public struct Vss: Sendable, Equatable {
        /// The snapshot set the vss-freeze reply named.
        public var setID: String
        /// Writers that failed before the hold (the hold still stood): from the vss-freeze reply.
        public var failuresBeforeHold: [String]
        /// The VSS thaw reply's set id, whether writes were held until the engine's thaw, and its error; nil when none came.
        public var thawSetID: String?
        public var writesHeld: Bool
        public var error: String
        public var errorCode: UInt32
        /// Every writer's state after the set (from the VSS thaw reply).
        public var writersAfter: [Writer]

        public init(setID: String, failuresBeforeHold: [String] = [], thawSetID: String? = nil, writesHeld: Bool = false,
                    error: String = "", errorCode: UInt32 = 0, writersAfter: [Writer] = []) {
            self.setID = setID
            self.failuresBeforeHold = failuresBeforeHold
            self.thawSetID = thawSetID
            self.writesHeld = writesHeld
            self.error = error
            self.errorCode = errorCode
            self.writersAfter = writersAfter
        }
    }

    /// The run's freeze id: the thaw reply must name it.
    public var freezeID: String
    public var thaw: Thaw?
    public var vss: Vss?
    /// Holds whose hook said at release that its lock did not hold, by id: the reason.
    public var brokenReleases: [String: String]

    public init(freezeID: String, thaw: Thaw? = nil, vss: Vss? = nil, brokenReleases: [String: String] = [:]) {
        self.freezeID = freezeID
        self.thaw = thaw
        self.vss = vss
        self.brokenReleases = brokenReleases
    }
}

/// One thing the evidence says against a step's level: the level it caps the run at, and why
/// ("code: detail"). A kind's verdict is a list of them, most serious first; none means proven.
public struct ProofFinding: Sendable, Equatable, CustomStringConvertible {
    public var ceiling: ConsistencyLevel
    public var reason: String

    public init(_ ceiling: ConsistencyLevel, _ reason: String) {
        self.ceiling = ceiling
        self.reason = reason
    }

    public var description: String { "\(self.ceiling.name) \(self.reason)" }
}

/// The checks kinds share.
public enum Proof {
    /// The thaw reply proves a write hold when it exists, names this freeze, was caused by the
    /// engine's thaw command, and came within the budget (invariant 3). `what` names the hold in
    /// the reason when there is no reply ("freeze F", "snapshot set S").
    public static func thawReply(_ evidence: ThawEvidence, missing what: String) -> [ProofFinding] {
        guard let thaw = evidence.thaw else { return [ProofFinding(.crash, "thaw-unproven: no thaw reply for \(what)")] }
        if thaw.freezeID != evidence.freezeID {
            return [ProofFinding(.crash, "thaw-mismatch: the thaw reply names freeze \(thaw.freezeID), not \(evidence.freezeID)")]
        }
        if thaw.cause != "command" {
            return [ProofFinding(.crash, "thawed-by-\(thaw.cause): the freeze ended before the engine asked (frozen \(thaw.frozenMs) ms)")]
        }
        if !thaw.withinBudget { return [ProofFinding(.crash, "over-budget: frozen \(thaw.frozenMs) ms, beyond the budget")] }
        return []
    }

    /// A FIFREEZE: the thaw reply alone.
    static func freeze(_ evidence: ThawEvidence) -> [ProofFinding] {
        self.thawReply(evidence, missing: "freeze \(evidence.freezeID)")
    }

    /// An application hold (FTWRL): alive at the thaw (crash otherwise: the reply contradicts the
    /// run), and its hook exited 0 when released (filesystem otherwise: the freeze still held).
    static func hold(_ holdID: String, _ evidence: ThawEvidence) -> [ProofFinding] {
        var findings: [ProofFinding] = []
        if let thaw = evidence.thaw {
            switch thaw.holds[holdID] {
            case false?: findings.append(ProofFinding(.crash, "hold-died: hold \(holdID) had ended before the thaw"))
            case nil: findings.append(ProofFinding(.crash, "hold-died: hold \(holdID) was gone at the thaw"))
            case true?: break
            }
        }
        if let broken = evidence.brokenReleases[holdID] { findings.append(ProofFinding(.filesystem, broken)) }
        return findings
    }

    /// A VSS hold: the VSS thaw reply names this set and says writes were held until the engine's
    /// thaw (within VSS's 10 s), the thaw inside it proves the freeze like any other, and — for
    /// application — every writer in the set failed nowhere and was STABLE after BackupComplete.
    static func vss(_ evidence: ThawEvidence) -> [ProofFinding] {
        guard let vss = evidence.vss else { return [ProofFinding(.crash, "thaw-unproven: no VSS snapshot set was held")] }
        guard let thawSet = vss.thawSetID else { return [ProofFinding(.crash, "thaw-unproven: no VSS thaw reply for snapshot set \(vss.setID)")] }
        if thawSet != vss.setID {
            return [ProofFinding(.crash, "vss-set-mismatch: the thaw reply names snapshot set \(thawSet), not \(vss.setID)")]
        }
        if !vss.writesHeld {
            let cause = evidence.thaw?.cause ?? "nothing"
            if vss.error == "VSS_E_HOLD_WRITES_TIMEOUT" || cause == "budget" {
                return [ProofFinding(.crash, "vss-hold-timeout: \(VssErrors.describe("VSS_E_HOLD_WRITES_TIMEOUT")): "
                    + "the hold of writes ended after \(evidence.thaw?.frozenMs ?? 0) ms, before the engine's thaw")]
            }
            let error = vss.error.isEmpty ? "" : " (\(VssErrors.describe(vss.error, code: vss.errorCode)))"
            return [ProofFinding(.crash, "vss-hold-lost: writes were released by \(cause), not the engine's thaw\(error)")]
        }
        var findings = self.thawReply(evidence, missing: "snapshot set \(vss.setID)")
        var failures = vss.failuresBeforeHold
        for writer in vss.writersAfter where !writer.excluded && writer.state != "STABLE" {
            if !failures.contains(writer.failureReason) { failures.append(writer.failureReason) }
        }
        findings += failures.map { ProofFinding(.filesystem, $0) }
        return findings
    }
}
