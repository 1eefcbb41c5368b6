import CQuiesceLinux
import Foundation
import GRPCCore
import Logging
import QuiesceCore
import QuiesceProto
import QuiesceWire
import Synchronization

/// Freezes and thaws this instance's filesystems through the thaw guard,
/// and thaws by itself when the engine falls silent or the session ends.
///
/// The guard performs every FIFREEZE and FITHAW on descriptors the agent
/// opened before anything was frozen; the agent keeps its own copies so it
/// can still thaw if the guard itself disappears. While frozen the agent
/// writes nothing (logs go to ``LogGate``) and starts nothing.
public final class FreezeController: Sendable {
    public static let defaultBudget: Duration = .seconds(10)
    /// Without a message from the engine for this long while frozen, thaw.
    public let silenceLimit: Duration
    public let guardExecutable: String
    /// Whether a freeze flushes each filesystem first (a request may override it).
    public let syncfs: SyncfsRule
    /// Whether the guard expedites RCU grace periods while it freezes: FIFREEZE's
    /// own cost on an idle filesystem is grace periods (tens of milliseconds on a
    /// quiet VM, ~0.5 ms expedited). See quiesce-thaw-guard's rcu_expedite_begin.
    public let expediteRCU: Bool
    private let logger: Logger
    private let state = Mutex(State())
    /// Serializes thawOurselves (see there).
    private let ownThaw = NSLock()
    private let watchdogStarted = Mutex(false)
    /// Current holds, for the thaw reply.
    let holdStates: @Sendable () -> [Quiesce_Agent_V1_HoldState]

    struct Active {
        var id: String
        var mountPoints: [String]
        /// The agent's own descriptors, freeze order.
        var descriptors: [Int32]
        var frozenAt: ContinuousClock.Instant
        var budget: Duration
        /// Whether the freeze flushed first, and why (for the thaw's log line).
        var syncfs: SyncfsRule.Decision
        /// What the guard did about RCU grace periods (expedited, already, normal, unavailable, not-asked).
        var rcu: String
    }

    private struct State {
        var guardProcess: ThawGuard?
        var guardProblem: String? = "not started"
        var active: Active?
        /// A freeze or thaw request is being handled.
        var busy = false
        var lastThaw: Quiesce_Agent_V1_ThawResult?
        var lastEngineMessage = ContinuousClock.now
        var events: (@Sendable (Quiesce_Agent_V1_AgentEvent) -> Void)?
        var stopped = false
        /// Why a thaw that the guard will report was requested (engine silence), by freeze id.
        var pendingDetail: [String: String] = [:]
    }

    public init(
        guardExecutable: String? = nil, silenceLimit: Duration = .seconds(1), syncfs: SyncfsRule = .default, expediteRCU: Bool = true,
        holdStates: @escaping @Sendable () -> [Quiesce_Agent_V1_HoldState] = { [] },
        logger: Logger = Logger(label: "quiesce.agent.freeze")
    ) {
        self.guardExecutable = guardExecutable ?? ThawGuard.defaultExecutable()
        self.silenceLimit = silenceLimit
        self.syncfs = syncfs
        self.expediteRCU = expediteRCU
        self.holdStates = holdStates
        self.logger = logger
        // Open the dirty-page gauge's files now, not on the first freeze's path.
        _ = DirtyPageGauge.shared
    }

    // MARK: guard

    /// Starts the guard if it is not running (never while frozen: that would start a program from disk).
    public func startGuard() async throws {
        self.ensureWatchdog()
        let running = self.state.withLock { $0.guardProcess?.isAlive == true || $0.active != nil || $0.stopped }
        if running { return }
        do {
            let started = try await ThawGuard.start(executable: self.guardExecutable) { [weak self] message in
                self?.guardSaid(message)
            }
            if !started.oomAdjusted || !started.memoryLocked {
                self.logger.warning("thaw guard started without full protection", metadata: [
                    "oom_score_adj": "\(started.oomAdjusted ? "-1000" : "unchanged")", "memory_locked": "\(started.memoryLocked)",
                ])
            }
            self.state.withLock {
                $0.guardProcess = started
                $0.guardProblem = nil
            }
            self.logger.info("thaw guard ready", metadata: ["pid": "\(started.pid)", "executable": "\(started.executable)"])
        } catch {
            self.state.withLock { $0.guardProblem = "\(error)" }
            throw error
        }
    }

    /// Whether the guard is alive and armed (facts, refusals).
    public var guardReady: Bool { self.state.withLock { $0.guardProcess?.isAlive == true } }
    public var guardPID: Int32? { self.state.withLock { $0.guardProcess?.isAlive == true ? $0.guardProcess?.pid : nil } }
    public var isFrozen: Bool { self.state.withLock { $0.active != nil } }

    /// Where agent events (a thaw nobody asked for) go; set per session.
    public func attach(events: (@Sendable (Quiesce_Agent_V1_AgentEvent) -> Void)?) {
        self.state.withLock { $0.events = events }
    }

    /// Sends an event on the current session, if there is one.
    public func emit(_ event: Quiesce_Agent_V1_AgentEvent) {
        self.state.withLock { $0.events }?(event)
    }

    /// Any message from the engine proves it is alive.
    public func engineHeard() {
        self.state.withLock { $0.lastEngineMessage = .now }
    }

    // MARK: freeze

    public func freeze(_ request: Quiesce_Agent_V1_FreezeRequest) async -> (AgentStatus, Quiesce_Agent_V1_FreezeResult) {
        var result = Quiesce_Agent_V1_FreezeResult()
        result.freezeID = request.freezeID
        let budget: Duration = request.budgetMs > 0 ? .milliseconds(Int64(request.budgetMs)) : Self.defaultBudget
        result.budgetMs = UInt32(budget.milliseconds)
        if let refusal = Self.freezeIDRefusal(request.freezeID) { return (refusal, result) }
        guard !request.mountPoints.isEmpty else {
            return (.init(code: .invalidArgument, message: "freeze \(request.freezeID) names no mount points", reason: "bad-request"), result)
        }
        // Mount points must be mount roots now, of distinct read-write filesystems:
        // checked on descriptors opened before anything is frozen (statx, fstat,
        // fstatvfs — no mount-table parsing on the freeze path).
        var opened: [(path: String, fd: Int32)] = []
        func refuse(_ code: RPCError.Code, _ message: String, _ reason: String) -> (AgentStatus, Quiesce_Agent_V1_FreezeResult) {
            opened.forEach { close($0.fd) }
            return (.init(code: code, message: message, reason: reason), result)
        }
        var seenDevices: [UInt64: String] = [:]
        var mounts: [FreezeOrder.Mount] = []
        for path in request.mountPoints {
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else {
                let code = errno
                if code == ENOENT || code == ENOTDIR {
                    return refuse(.invalidArgument, "\(path) is not a mount point on this instance (\(String(cString: strerror(code))))", "not-a-mount")
                }
                return refuse(.failedPrecondition, "could not open \(path): \(String(cString: strerror(code)))", "open-failed")
            }
            opened.append((path, fd))
            guard quiesce_is_mount_root(fd) == 1 else {
                return refuse(.invalidArgument, "\(path) is not a mount point on this instance", "not-a-mount")
            }
            var info = stat()
            var fs = statvfs()
            guard fstat(fd, &info) == 0, fstatvfs(fd, &fs) == 0 else {
                return refuse(.failedPrecondition, "could not stat \(path): \(String(cString: strerror(errno)))", "open-failed")
            }
            let device = UInt64(info.st_dev)
            if let other = seenDevices[device] {
                return refuse(.invalidArgument, "\(path) and \(other) are the same filesystem (device \(info.st_dev)); name it once", "same-filesystem")
            }
            if fs.f_flag & UInt(ST_RDONLY) != 0 {
                return refuse(.invalidArgument, "\(path) is mounted read-only; there is nothing to freeze", "read-only")
            }
            seenDevices[device] = path
            // One mount has no order to find: spare its sysfs walk (a dozen system calls) on the freeze's path.
            let backedBy = request.mountPoints.count > 1 ? FreezeOrder.backingFilesystems(ofDevice: device) : nil
            mounts.append(FreezeOrder.Mount(path: path, device: device, backedBy: backedBy))
        }
        // Independent filesystems together, stacked ones upper before lower, "/" last
        // (the agent lives there; it is thawed first). See FreezeOrder.
        let (order, concurrent) = FreezeOrder.plan(mounts)
        opened = order.map { opened[$0] }
        let ordered = opened.map(\.path)
        let descriptors = opened.map(\.fd)

        // One freeze at a time, and never without the guard.
        let refusal: AgentStatus? = self.state.withLock { state in
            if let active = state.active {
                return .init(code: .failedPrecondition, message: "freeze \(active.id) is in progress; thaw it first", reason: "already-frozen")
            }
            if state.busy { return .init(code: .failedPrecondition, message: "another freeze or thaw is being handled", reason: "busy") }
            guard state.guardProcess?.isAlive == true else {
                return .init(code: .failedPrecondition, message: "the thaw guard is not running (\(state.guardProblem ?? "it exited")); the agent does not freeze without it", reason: "guard-missing")
            }
            state.busy = true
            return nil
        }
        if let refusal {
            descriptors.forEach { close($0) }
            return (refusal, result)
        }
        defer { self.state.withLock { $0.busy = false } }

        guard let guardProcess = self.state.withLock({ $0.guardProcess }) else {
            descriptors.forEach { close($0) }
            return (.init(code: .failedPrecondition, message: "the thaw guard is not running", reason: "guard-missing"), result)
        }

        LogGate.shared.close()
        self.state.withLock { $0.lastEngineMessage = .now }
        let id = request.freezeID
        // Decided as late as possible: the dirty figure is the one the freeze will meet.
        let flush = self.syncfs.decide(request)
        result.synced = flush.sync
        result.syncfsReason = flush.reason
        result.dirtyKib = flush.dirtyKiB ?? 0
        let replies: [GuardMessage]
        do {
            replies = try await guardProcess.request(
                "FREEZE \(id) \(budget.milliseconds) \(flush.sync ? 1 : 0) \(concurrent) \(self.expediteRCU ? 1 : 0)", descriptors: descriptors,
                accepts: { $0.freezeID == id || $0.freezeID == "-" },
                finishes: { message in
                    switch message {
                    case .frozen(_, let all, _, _, _): all
                    case .thawed, .error: true
                    default: false
                    }
                })
        } catch ThawGuardError.protocolError(let detail) {
            // Its answer was unreadable: whatever it froze for this id, it thaws now.
            _ = guardProcess.post("THAW \(id) cancelled")
            descriptors.forEach { close($0) }
            // The gate stays closed (this line is held): the guard may hold a freeze
            // until it reads that THAW, and at the latest until the budget runs out.
            // Then it opens, unless another freeze is under way (whose end opens it).
            self.logger.error("the thaw guard's answer to a freeze was unreadable", metadata: ["freeze_id": "\(id)", "detail": "\(detail)"])
            _ = DeadlineTimer(after: budget) { [weak self] in
                if self?.state.withLock({ $0.active == nil && !$0.busy }) ?? true { LogGate.shared.open() }
            }
            return (.init(code: .internalError, message: "the thaw guard's answer to freeze \(id) was unreadable (\(detail)); asked it to thaw whatever it froze", reason: "guard-protocol"), result)
        } catch {
            LogGate.shared.open()
            descriptors.forEach { close($0) }
            return (.init(code: .unavailable, message: "the thaw guard did not answer the freeze: \(error)", reason: "guard-missing"), result)
        }
        var frozen: (all: Bool, mounts: [GuardMessage.MountFrozen], rcu: String)?
        for reply in replies {
            switch reply {
            case .frozen(_, let all, _, let mounts, let rcu): frozen = (all, mounts, rcu)
            case .error(_, let reason, let detail):
                LogGate.shared.open()
                descriptors.forEach { close($0) }
                return (.init(code: .failedPrecondition, message: "the thaw guard refused: \(detail)", reason: reason), result)
            default: break
            }
        }
        guard let frozen, frozen.mounts.count == ordered.count else {
            LogGate.shared.open()
            descriptors.forEach { close($0) }
            return (.init(code: .internalError, message: "the thaw guard's answer did not match the request", reason: "guard-protocol"), result)
        }
        var firstFailure: (String, Int32)?
        for (path, mount) in zip(ordered, frozen.mounts) {
            var entry = Quiesce_Agent_V1_MountFreeze()
            entry.mountPoint = path
            entry.frozen = mount.frozen
            entry.syncfsUs = mount.syncfsMicros
            entry.freezeUs = mount.freezeMicros
            if mount.errno != 0 {
                entry.reason = Self.freezeReason(mount.errno)
                if firstFailure == nil { firstFailure = (path, mount.errno) }
            }
            result.mounts.append(entry)
        }
        guard frozen.all else {
            // The guard has already thawed what this attempt froze (all or nothing).
            LogGate.shared.open()
            descriptors.forEach { close($0) }
            for index in result.mounts.indices { result.mounts[index].frozen = false }
            let (path, code) = firstFailure ?? ("?", 0)
            let why = code == EBUSY
                ? "\(path) is already frozen by another owner (EBUSY); nothing of theirs was thawed"
                : "could not freeze \(path): \(String(cString: strerror(code)))"
            self.logger.warning("freeze failed", metadata: ["freeze_id": "\(id)", "mount": "\(path)", "reason": "\(Self.freezeReason(code))"])
            return (.init(code: .aborted, message: why, reason: Self.freezeReason(code)), result)
        }
        result.allFrozen = true
        let frozenAt = ContinuousClock.now
        self.state.withLock { state in
            state.active = Active(id: id, mountPoints: ordered, descriptors: descriptors, frozenAt: frozenAt, budget: budget, syncfs: flush, rcu: frozen.rcu)
        }
        if Task.isCancelled {
            // Cancelling a freeze thaws whatever it froze.
            let thaw = await self.thaw(id: id, cause: .cancelled)
            _ = thaw
            return (.init(code: .cancelled, message: "freeze \(id) was cancelled; thawed", reason: "cancelled"), result)
        }
        return (.ok, result)
    }

    /// Why `id` cannot name a freeze (the thaw guard's protocol puts it on a line): nil when it can.
    static func freezeIDRefusal(_ id: String) -> AgentStatus? {
        guard id.isEmpty || id.contains(where: { $0 == " " || $0 == "\n" }) || id.utf8.count > 100 else { return nil }
        return .init(code: .invalidArgument, message: "expected a freeze id (1-100 characters, no spaces), found \"\(id)\"", reason: "bad-request")
    }

    static func freezeReason(_ code: Int32) -> String {
        switch code {
        case EBUSY: "freeze-ebusy"
        case EOPNOTSUPP: "freeze-unsupported"
        case EPERM, EACCES: "freeze-permission"
        default: "freeze-failed-errno-\(code)"
        }
    }

    /// While frozen: thaw when the engine has been silent for `silenceLimit`.
    /// One plain thread for the controller's lifetime, not a task: a busy
    /// cooperative pool must not delay a thaw, and no thread is created on the
    /// freeze path. It only sends THAW to the guard; the guard's THAWED is
    /// recorded where the guard is read, on the event loop (with no guard, it thaws directly).
    private func ensureWatchdog() {
        let first = self.watchdogStarted.withLock { started -> Bool in
            defer { started = true }
            return !started
        }
        guard first else { return }
        let limit = self.silenceLimit
        // While nothing is frozen it looks a quarter of the limit apart (an idle
        // agent wakes 4 times a second, not 50; a 5 ms freeze window meets a
        // tick 2% of the time). A freeze sets lastEngineMessage when it starts,
        // so the next look, less than the limit later, still finds the silence
        // deadline ahead and sleeps until exactly then: the thaw comes at the
        // limit, not later. Each heartbeat moves the deadline, so while frozen
        // it wakes about once per limit. Nothing wakes it on purpose: a wake-up
        // on the freeze's path cost ~0.05 ms whenever it landed on the same CPU.
        let idlePoll = min(limit / 4, .milliseconds(250))
        let thread = Thread { [weak self] in
            var watching = false
            while true {
                var pause = idlePoll
                if watching, let lastHeard = self?.state.withLock({ $0.lastEngineMessage }) {
                    pause = max(limit - (ContinuousClock.now - lastHeard), .milliseconds(20))
                }
                usleep(UInt32(clamping: pause.nanoseconds / 1000))
                guard let self else { return }
                let (silent, id, guardProcess, busy) = self.state.withLock { state in
                    (ContinuousClock.now - state.lastEngineMessage, state.active?.id, state.guardProcess, state.busy)
                }
                watching = id != nil || busy
                guard let id, silent >= limit else { continue }
                let detail = "no message from the engine for \(silent.milliseconds) ms"
                self.state.withLock { $0.pendingDetail[id] = detail }
                if let guardProcess, guardProcess.isAlive, guardProcess.post("THAW \(id) engine-silent") {
                    // Wait (bounded) for the guard's answer to be recorded (on the event loop that reads it).
                    for _ in 0..<250 where self.state.withLock({ $0.active?.id == id }) { usleep(2_000) }
                }
                if self.state.withLock({ $0.active?.id == id }) {
                    _ = self.thawOurselves(id: id, cause: .engineSilent, holds: self.holdStates(), detail: detail)
                }
            }
        }
        thread.name = "quiesce-freeze-watchdog"
        thread.stackSize = 1 << 18
        thread.start()
    }

    // MARK: thaw

    /// Thaws freeze `id` (or reports how it already ended).
    public func thaw(_ request: Quiesce_Agent_V1_ThawRequest) async -> (AgentStatus, Quiesce_Agent_V1_ThawResult) {
        let result = await self.thaw(id: request.freezeID, cause: .command)
        guard let result else {
            let current = self.state.withLock { $0.active?.id }
            let message = current.map { "freeze \"\(request.freezeID)\" is not the one in progress (\($0))" }
                ?? "no freeze \"\(request.freezeID)\" is in progress or recently ended"
            return (.init(code: .notFound, message: message, reason: "unknown-freeze"), Quiesce_Agent_V1_ThawResult())
        }
        return (.ok, result)
    }

    /// Thaws the active freeze if it is `id`. When it already ended, returns how it ended; nil if unknown.
    @discardableResult
    func thaw(id: String, cause: Quiesce_Agent_V1_ThawCause, detail: String = "") async -> Quiesce_Agent_V1_ThawResult? {
        // Wait for a freeze or thaw in flight (the guard answers one request at a time).
        while true {
            let decision: Int = self.state.withLock { state in
                if state.busy { return 0 }
                guard let active = state.active, active.id == id else { return 1 }
                state.busy = true
                return 2
            }
            if decision == 1 {
                return self.state.withLock { state in state.lastThaw?.freezeID == id ? state.lastThaw : nil }
            }
            if decision == 2 { break }
            try? await Task.sleep(for: .milliseconds(1))
        }
        defer { self.state.withLock { $0.busy = false } }
        let holds = self.holdStates()
        let guardProcess = self.state.withLock { $0.guardProcess }
        var replies: [GuardMessage] = []
        if let guardProcess, guardProcess.isAlive {
            replies = (try? await guardProcess.request(
                "THAW \(id) \(cause.word)",
                accepts: { $0.freezeID == id },
                finishes: { _ in true })) ?? []
        }
        if case .thawed(_, let word, let micros, let within, let mounts)? = replies.first {
            return self.finish(id: id, cause: Self.cause(word) ?? cause, frozenMicros: micros, withinBudget: within, mounts: mounts, holds: holds, detail: detail)
        }
        if self.state.withLock({ $0.active?.id != id }) {
            // The guard thawed it first (budget) and our THAW found nothing: report that thaw.
            return self.state.withLock { $0.lastThaw?.freezeID == id ? $0.lastThaw : nil }
        }
        // No guard to ask (it died): thaw with our own descriptors, on a thread of its own (FITHAW blocks).
        let why = detail.isEmpty ? "the thaw guard was gone; the agent thawed" : detail
        return (try? await DedicatedThread.run(name: "quiesce-thaw") { self.thawOurselves(id: id, cause: cause, holds: holds, detail: why) }) ?? nil
    }

    /// The guard is gone while frozen: FITHAW with the agent's descriptors, "/" first.
    /// One caller at a time (the guard's reader thread and a thaw command can both
    /// get here): the first thaws and closes the descriptors; a second waiting
    /// behind it must not FITHAW numbers that were closed meanwhile and may name
    /// another file by now. Callers are on threads of their own, never the pool.
    private func thawOurselves(id: String, cause: Quiesce_Agent_V1_ThawCause, holds: [Quiesce_Agent_V1_HoldState], detail: String) -> Quiesce_Agent_V1_ThawResult? {
        self.ownThaw.lock()
        defer { self.ownThaw.unlock() }
        guard let active = self.state.withLock({ $0.active }), active.id == id else {
            return self.state.withLock { $0.lastThaw?.freezeID == id ? $0.lastThaw : nil }
        }
        var mounts: [GuardMessage.MountThawed] = Array(repeating: .init(thawed: false, errno: 0), count: active.descriptors.count)
        for index in active.descriptors.indices.reversed() {
            if quiesce_fithaw(active.descriptors[index]) == 0 {
                mounts[index] = .init(thawed: true, errno: 0)
            } else {
                mounts[index] = .init(thawed: false, errno: errno)
            }
        }
        let elapsed = ContinuousClock.now - active.frozenAt
        return self.finish(
            id: id, cause: cause, frozenMicros: UInt64(max(elapsed.nanoseconds / 1000, 0)), withinBudget: elapsed <= active.budget,
            mounts: mounts, holds: holds, detail: detail)
    }

    /// Records how freeze `id` ended, opens the log gate and tells the engine when it did not ask.
    private func finish(
        id: String, cause: Quiesce_Agent_V1_ThawCause, frozenMicros: UInt64, withinBudget: Bool, mounts: [GuardMessage.MountThawed],
        holds: [Quiesce_Agent_V1_HoldState], detail: String
    ) -> Quiesce_Agent_V1_ThawResult? {
        func describe(_ active: Active) -> Quiesce_Agent_V1_ThawResult {
            var result = Quiesce_Agent_V1_ThawResult()
            result.freezeID = id
            result.cause = cause
            result.frozenUs = frozenMicros
            result.withinBudget = withinBudget
            result.holds = holds
            for (path, mount) in zip(active.mountPoints, mounts) {
                var entry = Quiesce_Agent_V1_MountThaw()
                entry.mountPoint = path
                // EINVAL from FITHAW: it was no longer frozen (someone thawed it under us).
                entry.thawed = mount.thawed
                if mount.errno == EINVAL { entry.reason = "already-thawed-by-someone-else" } else if mount.errno != 0 { entry.reason = "thaw-failed-errno-\(mount.errno)" }
                result.mounts.append(entry)
            }
            return result
        }
        // "Not frozen" and the thaw that ended it become visible together: a status
        // read in between used to see neither the freeze nor its thaw.
        let ended: (Active, Quiesce_Agent_V1_ThawResult, (@Sendable (Quiesce_Agent_V1_AgentEvent) -> Void)?)? = self.state.withLock { state in
            guard let active = state.active, active.id == id else { return nil }
            let result = describe(active)
            state.active = nil
            state.lastThaw = result
            return (active, result, state.events)
        }
        guard let (active, result, events) = ended else { return self.state.withLock { $0.lastThaw?.freezeID == id ? $0.lastThaw : nil } }
        active.descriptors.forEach { close($0) }
        LogGate.shared.open()
        let how = cause.word
        self.logger.info("thawed", metadata: [
            "freeze_id": "\(id)", "cause": "\(how)", "frozen_ms": "\(Double(frozenMicros) / 1000)", "within_budget": "\(withinBudget)",
            "syncfs": "\(active.syncfs.summary)", "rcu": "\(active.rcu)", "detail": "\(detail)",
        ])
        if cause != .command {
            var event = Quiesce_Agent_V1_AgentEvent()
            event.kind = .thawed
            event.freezeID = id
            event.message = "freeze \(id) thawed by \(how)\(detail.isEmpty ? "" : ": \(detail)")"
            event.thaw = result
            events?(event)
        }
        return result
    }

    /// The guard spoke unasked (a budget thaw) or died (nil).
    private func guardSaid(_ message: GuardMessage?) {
        switch message {
        case .thawed(let id, let word, let micros, let within, let mounts)?:
            let holds = self.holdStates()
            let cause = Self.cause(word) ?? .guard
            let pending = self.state.withLock { $0.pendingDetail.removeValue(forKey: id) }
            _ = self.finish(id: id, cause: cause, frozenMicros: micros, withinBudget: within, mounts: mounts, holds: holds,
                            detail: cause == .budget ? "the freeze budget ran out" : pending ?? "")
        case nil:
            let (stopped, active, events) = self.state.withLock { state -> (Bool, String?, (@Sendable (Quiesce_Agent_V1_AgentEvent) -> Void)?) in
                state.guardProblem = "it exited"
                return (state.stopped, state.active?.id, state.events)
            }
            // `stop()` ended it on purpose (after thawing): nothing was lost.
            if stopped { return }
            var event = Quiesce_Agent_V1_AgentEvent()
            event.kind = .guardLost
            event.message = "the thaw guard process exited" + (active.map { " during freeze \($0); the agent thaws itself" } ?? "")
            events?(event)
            self.logger.error("thaw guard lost", metadata: ["freeze_id": "\(active ?? "-")"])
            // On this (the reader's) thread, now: no task needs to be scheduled for the thaw.
            if let active {
                _ = self.thawOurselves(id: active, cause: .guard, holds: self.holdStates(), detail: "the thaw guard exited; the agent thawed with its own descriptors")
            }
            Task.detached { [weak self] in
                guard let self else { return }
                // Start a new one once nothing is frozen.
                try? await Task.sleep(for: .milliseconds(100))
                try? await self.startGuard()
            }
        default:
            break  // a late reply to a request already answered
        }
    }

    /// Status for FreezeStatusRequest.
    public func status() -> Quiesce_Agent_V1_FreezeStatus {
        self.state.withLock { state in
            var status = Quiesce_Agent_V1_FreezeStatus()
            if let active = state.active {
                status.frozen = true
                status.freezeID = active.id
                status.mountPoints = active.mountPoints
                status.frozenForUs = UInt64(max((ContinuousClock.now - active.frozenAt).nanoseconds / 1000, 0))
            }
            if let last = state.lastThaw { status.lastThaw = last }
            return status
        }
    }

    /// Thaws whatever is frozen (the session ended, the agent stops).
    public func thawAll(cause: Quiesce_Agent_V1_ThawCause, detail: String) async {
        if let id = self.state.withLock({ $0.active?.id }) {
            await self.thaw(id: id, cause: cause, detail: detail)
        }
    }

    /// Thaws, then ends the guard.
    public func stop() async {
        await self.thawAll(cause: .agentShutdown, detail: "the agent is stopping")
        let guardProcess = self.state.withLock { state -> ThawGuard? in
            state.stopped = true
            return state.guardProcess
        }
        guardProcess?.shutdown()
    }

    static func cause(_ word: String) -> Quiesce_Agent_V1_ThawCause? {
        switch word {
        case "command": .command
        case "budget": .budget
        case "guard": .guard
        case "engine-silent": .engineSilent
        case "cancelled": .cancelled
        case "agent-shutdown": .agentShutdown
        default: nil
        }
    }
}
