import Foundation
import GRPCCore
import QuiesceCore
import QuiesceProto
import QuiesceWire
import Synchronization

/// VSS on Linux, for tests and the demo: a working requester over a scenario's
/// writers and volumes. Writers follow VSS's state machine (STABLE →
/// WAITING_FOR_FREEZE → WAITING_FOR_THAW → WAITING_FOR_POST_SNAPSHOT →
/// WAITING_FOR_BACKUP_COMPLETE → STABLE, or FAILED_AT_<phase> with a VSS_E_*
/// error), each phase's events sent to every writer at once, as VSS does. The
/// hold of writes is real: a FIFREEZE of the volumes' filesystems through the
/// agent's thaw guard, released by the engine's thaw or by the hold limit (at
/// most 10 s; then VSS_E_HOLD_WRITES_TIMEOUT) — so a simulated Windows instance
/// keeps invariant 1 as a Linux one does.
public final class VssSimulator: VssBackend {
    public let scenario: VssScenario
    let freezer: FreezeController
    private let state = Mutex(State())

    struct WriterState {
        var stateCode: UInt32 = 1
        var lastError = ""
        var excluded = false
        /// How many sets have met each scripted failure (for `times`).
        var failures: [VssScenario.Phase: Int] = [:]
    }

    struct ActiveSet {
        var freezeID: String
        var setID: String
        var participants: [Int]
        var writersFrozenAt: ContinuousClock.Instant?
        var calls: [String]
    }

    private struct State {
        var writers: [WriterState]
        var active: ActiveSet?
        var busy = false
        var last: Quiesce_Agent_V1_VssThawResult?
        init(count: Int) { self.writers = Array(repeating: WriterState(), count: count) }
        init() { self.writers = [] }
    }

    public init(scenario: VssScenario, freezer: FreezeController) {
        self.scenario = scenario
        self.freezer = freezer
        self.state.withLock { $0 = State(count: scenario.writers.count) }
    }

    // MARK: facts

    public func facts(base: Facts) async -> Facts {
        var facts = base
        facts.osFamily = "windows"
        facts.osName = self.scenario.osName
        facts.osVersion = self.scenario.osVersion
        facts.kernelRelease = self.scenario.osVersion
        facts.hostname = self.scenario.hostname
        facts.hooks = []
        facts.syncfs = .unspecified
        facts.syncfsMinDirtyBytes = 0
        facts.vssService = self.scenario.vssService
        facts.mounts = self.scenario.volumes.map { volume in
            var mount = Quiesce_Agent_V1_Mount()
            mount.mountPoint = volume.name
            mount.device = "\\\\?\\Volume{\(VssScenario.uuid(from: "volume:" + volume.name))}\\"
            mount.fsType = volume.fsType
            var fs = statvfs()
            var info = stat()
            if statvfs(volume.path, &fs) == 0 {
                mount.sizeBytes = UInt64(fs.f_blocks) * UInt64(fs.f_frsize)
                mount.availableBytes = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
                mount.readOnly = fs.f_flag & UInt(ST_RDONLY) != 0
            }
            if stat(volume.path, &info) == 0 { mount.deviceNumber = "\((info.st_dev >> 8) & 0xfff):\((info.st_dev & 0xff) | ((info.st_dev >> 12) & 0xfff00))" }
            if !Self.vssTypes.contains(volume.fsType.uppercased()) {
                mount.notFreezableReason = "fs-not-eligible:\(volume.fsType)"
            } else if mount.readOnly {
                mount.notFreezableReason = "read-only"
            } else {
                mount.freezable = true
            }
            return mount
        }
        facts.vssWriters = self.writerFacts()
        return facts
    }

    /// File systems VSS snapshots.
    static let vssTypes: Set<String> = ["NTFS", "REFS"]

    private func writerFacts() -> [Quiesce_Agent_V1_VssWriter] {
        let states = self.state.withLock { $0.writers }
        return zip(self.scenario.writers, states).map { writer, state in Self.describe(writer, state) }
    }

    static func describe(_ writer: VssScenario.Writer, _ state: WriterState) -> Quiesce_Agent_V1_VssWriter {
        var fact = Quiesce_Agent_V1_VssWriter()
        fact.name = writer.name
        fact.writerID = writer.id
        fact.instanceID = writer.instanceID
        fact.components = writer.components
        fact.stateCode = state.stateCode
        fact.state = VssErrors.states[state.stateCode] ?? "UNKNOWN"
        fact.healthy = state.stateCode >= 1 && state.stateCode <= 5
        fact.lastError = state.lastError
        fact.lastErrorCode = VssErrors.code(of: state.lastError) ?? 0
        fact.excluded = state.excluded
        return fact
    }

    // MARK: freeze (up to CommitSnapshots)

    public func freeze(_ request: Quiesce_Agent_V1_VssFreezeRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssFreezeResult) {
        var result = Quiesce_Agent_V1_VssFreezeResult()
        result.freezeID = request.freezeID
        let limitMs = min(request.budgetMs == 0 ? VssErrors.holdLimitMs : request.budgetMs, VssErrors.holdLimitMs)
        result.budgetMs = limitMs
        if let refusal = FreezeController.freezeIDRefusal(request.freezeID) { return (refusal, result) }
        guard !request.volumes.isEmpty else {
            return (.init(code: .invalidArgument, message: "vss-freeze \(request.freezeID) names no volumes", reason: "bad-request"), result)
        }
        let refusal: AgentStatus? = self.state.withLock { state in
            if let active = state.active {
                return .init(code: .failedPrecondition, message: "snapshot set \(active.setID) (freeze \(active.freezeID)) is in progress: \(VssErrors.describe("VSS_E_SNAPSHOT_SET_IN_PROGRESS"))", reason: "vss-set-in-progress")
            }
            if state.busy { return .init(code: .failedPrecondition, message: "another snapshot set is being started", reason: "busy") }
            state.busy = true
            return nil
        }
        if let refusal { return (refusal, result) }
        defer { self.state.withLock { $0.busy = false } }

        var calls: [String] = []
        func call(_ name: String, _ began: ContinuousClock.Instant) {
            calls.append(String(format: "%@ %.2f ms", name, Double((ContinuousClock.now - began).nanoseconds) / 1e6))
        }
        func fail(_ code: RPCError.Code, _ error: String, _ message: String, _ reason: String) -> (AgentStatus, Quiesce_Agent_V1_VssFreezeResult) {
            calls.append("AbortBackup")
            self.state.withLock { state in
                for index in state.writers.indices where !state.writers[index].excluded && Self.isWaiting(state.writers[index].stateCode) {
                    state.writers[index].stateCode = 1
                }
            }
            result.error = error
            result.errorCode = VssErrors.code(of: error) ?? 0
            result.writers = self.writerFacts()
            result.calls = calls
            return (.init(code: code, message: message + ": " + VssErrors.describe(error), reason: reason), result)
        }

        var began = ContinuousClock.now
        guard self.scenario.vssService == "running" else {
            call("InitializeForBackup", began)
            return fail(.failedPrecondition, "VSS_E_UNEXPECTED", "InitializeForBackup failed: the Volume Shadow Copy service is \(self.scenario.vssService)", "vss-service-not-running")
        }
        call("InitializeForBackup", began)
        began = .now
        call("SetBackupState(\(request.backupType == .full ? "FULL" : "COPY"))", began)

        // Who takes part: writers on, minus those left out by name or id.
        let include = Set(request.includeWriterNames), exclude = Set(request.excludeWriterNames)
        var participants: [Int] = []
        self.state.withLock { state in
            for (index, writer) in self.scenario.writers.enumerated() {
                let named = { (set: Set<String>) in set.contains(writer.name) || set.contains(writer.id) }
                let takesPart = request.includeWriters && (include.isEmpty || named(include)) && !named(exclude)
                state.writers[index].excluded = !takesPart
                if takesPart {
                    participants.append(index)
                    // A new set starts from STABLE (VSS resets a writer's failure at the next set).
                    state.writers[index].stateCode = 1
                    state.writers[index].lastError = ""
                }
            }
        }
        if request.includeWriters {
            began = .now
            await self.phase(.identify, participants, next: 1)
            call("GatherWriterMetadata", began)
        }
        let setID = UUID().uuidString.lowercased()
        result.snapshotSetID = setID
        began = .now
        call("StartSnapshotSet {\(setID)}", began)
        var paths: [String] = []
        for name in request.volumes {
            guard let volume = self.scenario.volumes.first(where: { $0.name.caseInsensitiveCompare(name) == .orderedSame }) else {
                return fail(.invalidArgument, "VSS_E_OBJECT_NOT_FOUND", "AddToSnapshotSet(\(name)) failed: no such volume (this instance has \(self.scenario.volumes.map(\.name).joined(separator: ", ")))", "vss-volume-unknown")
            }
            guard Self.vssTypes.contains(volume.fsType.uppercased()) else {
                return fail(.invalidArgument, "VSS_E_VOLUME_NOT_SUPPORTED", "AddToSnapshotSet(\(name)) failed: VSS does not snapshot \(volume.fsType) volumes", "vss-volume-not-supported")
            }
            paths.append(volume.path)
            call("AddToSnapshotSet \(volume.name)", .now)
        }
        began = .now
        await self.phase(.prepareBackup, participants, next: 2)
        call("PrepareForBackup", began)
        began = .now
        call("GatherWriterStatus", began)
        if Task.isCancelled { return fail(.cancelled, "VSS_E_UNEXPECTED", "vss-freeze \(request.freezeID) was cancelled before DoSnapshotSet", "cancelled") }

        // DoSnapshotSet: writers prepare and freeze, then the provider flushes and holds the volumes' writes.
        began = .now
        await self.phase(.prepareSnapshot, participants, next: 2)
        await self.phase(.freeze, participants, next: 3)
        let frozenAt = ContinuousClock.now
        if Task.isCancelled { return fail(.cancelled, "VSS_E_UNEXPECTED", "vss-freeze \(request.freezeID) was cancelled in DoSnapshotSet", "cancelled") }
        let (status, hold) = await self.freezer.freeze(.with {
            $0.freezeID = request.freezeID
            $0.mountPoints = paths
            $0.budgetMs = limitMs
        })
        let names = Dictionary(uniqueKeysWithValues: self.scenario.volumes.map { ($0.path, $0.name) })
        result.volumes = hold.mounts.map { mount in
            var entry = mount
            entry.mountPoint = names[mount.mountPoint] ?? mount.mountPoint
            return entry
        }
        guard status.isOK, hold.allFrozen else {
            call("DoSnapshotSet", began)
            return fail(status.isOK ? .aborted : (RPCError.Code(status.rpcCode) ?? .aborted), "VSS_E_FLUSH_WRITES_TIMEOUT",
                        "DoSnapshotSet failed: the volumes' writes could not be held (\(status.reason): \(status.message))", "vss-hold-failed")
        }
        call("DoSnapshotSet → CommitSnapshots (writes held)", began)
        self.state.withLock { $0.active = ActiveSet(freezeID: request.freezeID, setID: setID, participants: participants, writersFrozenAt: frozenAt, calls: calls) }
        result.allHeld = true
        result.writers = self.writerFacts()
        result.calls = calls
        return (.ok, result)
    }

    // MARK: thaw (the hold released, the set finished)

    public func thaw(_ request: Quiesce_Agent_V1_VssThawRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssThawResult) {
        let active: ActiveSet? = self.state.withLock { state in
            guard let active = state.active, active.freezeID == request.freezeID, !state.busy else { return nil }
            state.busy = true
            return active
        }
        guard let active else {
            if let last = self.state.withLock({ $0.last }), last.thaw.freezeID == request.freezeID { return (.ok, last) }
            return (.init(code: .notFound, message: "no snapshot set for freeze \"\(request.freezeID)\" is in progress or recently ended", reason: "unknown-freeze"),
                    Quiesce_Agent_V1_VssThawResult())
        }
        defer { self.state.withLock { $0.busy = false } }
        return (.ok, await self.finish(active, cause: .command, detail: ""))
    }

    public func abortAll(detail: String) async {
        let active: ActiveSet? = self.state.withLock { state in
            guard let active = state.active, !state.busy else { return nil }
            state.busy = true
            return active
        }
        guard let active else { return }
        defer { self.state.withLock { $0.busy = false } }
        _ = await self.finish(active, cause: .engineSilent, detail: detail)
    }

    private func finish(_ active: ActiveSet, cause: Quiesce_Agent_V1_ThawCause, detail: String) async -> Quiesce_Agent_V1_VssThawResult {
        var calls = active.calls
        var result = Quiesce_Agent_V1_VssThawResult()
        result.snapshotSetID = active.setID
        let began = ContinuousClock.now
        // Release the hold (the provider's CommitSnapshots returns). If it already ended (the hold
        // limit, the engine's silence, the guard), the freezer says how.
        let thaw = await self.freezer.thaw(id: active.freezeID, cause: cause, detail: detail) ?? {
            var missing = Quiesce_Agent_V1_ThawResult()
            missing.freezeID = active.freezeID
            missing.cause = .unspecified
            return missing
        }()
        result.thaw = thaw
        calls.append(String(format: "release the hold (%@) %.2f ms", thaw.cause.word, Double((ContinuousClock.now - began).nanoseconds) / 1e6))
        result.writesHeld = cause == .command && thaw.cause == .command && thaw.withinBudget
        if result.writesHeld {
            let thawBegan = ContinuousClock.now
            // The writer's own window from its freeze to its thaw (VSS: 60 s).
            if let frozenAt = active.writersFrozenAt, ContinuousClock.now - frozenAt > self.scenario.writerTimeout {
                self.state.withLock { state in
                    for index in active.participants where state.writers[index].stateCode == 3 {
                        state.writers[index].stateCode = VssScenario.Phase.thaw.failedState
                        state.writers[index].lastError = "VSS_E_WRITERERROR_TIMEOUT"
                    }
                }
            }
            await self.phase(.thaw, active.participants, next: 4)
            await self.phase(.postSnapshot, active.participants, next: 5)
            calls.append(String(format: "DoSnapshotSet done (writers thawed, post-snapshot) %.2f ms", Double((ContinuousClock.now - thawBegan).nanoseconds) / 1e6))
            calls.append("GatherWriterStatus")
            let completeBegan = ContinuousClock.now
            await self.phase(.backupComplete, active.participants, next: 1)
            calls.append(String(format: "BackupComplete %.2f ms", Double((ContinuousClock.now - completeBegan).nanoseconds) / 1e6))
        } else {
            // The set failed: VSS cancelled the hold (its limit) or nobody was watching. Writers get OnAbort.
            let error = thaw.cause == .budget ? "VSS_E_HOLD_WRITES_TIMEOUT" : "VSS_E_UNEXPECTED"
            result.error = error
            result.errorCode = VssErrors.code(of: error) ?? 0
            self.state.withLock { state in
                for index in active.participants where Self.isWaiting(state.writers[index].stateCode) { state.writers[index].stateCode = 1 }
            }
            calls.append("DoSnapshotSet failed: \(VssErrors.describe(error))")
            calls.append("AbortBackup")
        }
        result.writers = self.writerFacts()
        result.calls = calls
        self.state.withLock { state in
            state.active = nil
            state.last = result
        }
        return result
    }

    /// STABLE and the waiting states: a writer that has not failed.
    static func isWaiting(_ code: UInt32) -> Bool { code >= 2 && code <= 5 }

    // MARK: writers

    /// Sends one phase's event to every participant that has not failed, all at once (as VSS
    /// does), and waits for each answer or its timeout. A writer that answers moves to `next`.
    private func phase(_ phase: VssScenario.Phase, _ participants: [Int], next: UInt32) async {
        let live = self.state.withLock { state in participants.filter { state.writers[$0].stateCode >= 1 && state.writers[$0].stateCode <= 5 } }
        guard !live.isEmpty else { return }
        let timeout = self.scenario.writerTimeout
        await withTaskGroup(of: (Int, String?).self) { group in
            for index in live {
                let behaviour = self.scenario.writers[index].phases[phase]
                let counted: Bool = self.state.withLock { state in
                    guard case .fail(_, let times)? = behaviour else { return false }
                    let met = state.writers[index].failures[phase, default: 0]
                    if let times, met >= times { return false }
                    state.writers[index].failures[phase] = met + 1
                    return true
                }
                group.addTask {
                    switch behaviour {
                    case nil: return (index, nil)
                    case .fail(let error, _)?: return (index, counted ? error : nil)
                    case .delay(let ms)?:
                        let wait = Duration.milliseconds(ms)
                        try? await Task.sleep(for: min(wait, timeout))
                        return (index, wait > timeout ? "VSS_E_WRITERERROR_TIMEOUT" : nil)
                    case .hang?:
                        try? await Task.sleep(for: timeout)
                        return (index, "VSS_E_WRITER_NOT_RESPONDING")
                    }
                }
            }
            for await (index, error) in group {
                self.state.withLock { state in
                    if let error {
                        state.writers[index].stateCode = phase.failedState
                        state.writers[index].lastError = error
                    } else {
                        state.writers[index].stateCode = next
                    }
                }
            }
        }
    }
}
