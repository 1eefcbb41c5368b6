#if os(Windows)
// The agent's VSS backend on Windows: the requester's sequence through
// Sources/CQuiesceVSS (IVssBackupComponents), the same steps the simulator plays.
//
// NOT BUILT OR RUN YET: this machine cannot build Windows code, and the rest of
// QuiesceAgent is Linux's (the thaw guard, FIFREEZE). What a Windows agent still
// needs is listed in README, Windows: a VSS provider that holds writes from
// CommitSnapshots until the thaw event, a Windows hold guard, the service wrapper.
import CQuiesceVSS
import Foundation
import QuiesceCore
import QuiesceProto
import QuiesceWire
import Synchronization

public final class WindowsVssBackend: VssBackend {
    private let active = Mutex<(freezeID: String, setID: String, handle: OpaquePointer, heldAt: ContinuousClock.Instant, limit: Duration)?>(nil)
    private let last = Mutex<Quiesce_Agent_V1_VssThawResult?>(nil)

    public init() {}

    static func name(_ hr: Int32) -> String {
        let code = UInt32(bitPattern: hr)
        return VssErrors.codes.first { $0.value == code }?.key ?? String(format: "HRESULT 0x%08X", code)
    }

    static func writers(_ handle: OpaquePointer) -> [Quiesce_Agent_V1_VssWriter] {
        var buffer = [quiesce_vss_writer](repeating: quiesce_vss_writer(), count: 64)
        var count: UInt32 = 0
        guard quiesce_vss_writers(handle, &buffer, UInt32(buffer.count), &count) == 0 else { return [] }
        return buffer.prefix(Int(count)).map { raw in
            var copy = raw
            var writer = Quiesce_Agent_V1_VssWriter()
            writer.name = withUnsafeBytes(of: &copy.name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            writer.writerID = withUnsafeBytes(of: &copy.writer_id) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            writer.instanceID = withUnsafeBytes(of: &copy.instance_id) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            writer.stateCode = raw.state
            writer.state = VssErrors.states[raw.state] ?? "UNKNOWN"
            writer.healthy = raw.state >= 1 && raw.state <= 5
            if raw.failure != 0 {
                writer.lastError = Self.name(raw.failure)
                writer.lastErrorCode = UInt32(bitPattern: raw.failure)
            }
            return writer
        }
    }

    public func facts(base: Facts) async -> Facts {
        var facts = base
        facts.osFamily = "windows"
        facts.vssService = switch quiesce_vss_service_state() { case 1: "running"; case 0: "stopped"; default: "disabled" }
        var handle: OpaquePointer?
        if quiesce_vss_open(&handle) == 0, let handle {
            facts.vssWriters = Self.writers(handle)
            quiesce_vss_close(handle)
        }
        return facts
    }

    public func freeze(_ request: Quiesce_Agent_V1_VssFreezeRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssFreezeResult) {
        var result = Quiesce_Agent_V1_VssFreezeResult()
        result.freezeID = request.freezeID
        let limit = min(request.budgetMs == 0 ? VssErrors.holdLimitMs : request.budgetMs, VssErrors.holdLimitMs)
        result.budgetMs = limit
        func fail(_ hr: Int32, _ what: String, _ handle: OpaquePointer?) -> (AgentStatus, Quiesce_Agent_V1_VssFreezeResult) {
            if let handle {
                result.writers = Self.writers(handle)
                quiesce_vss_abort(handle)
                quiesce_vss_close(handle)
            }
            result.error = Self.name(hr)
            result.errorCode = UInt32(bitPattern: hr)
            return (.init(code: .failedPrecondition, message: "\(what) failed: \(VssErrors.describe(result.error, code: result.errorCode))", reason: "vss-failed"), result)
        }
        guard self.active.withLock({ $0 == nil }) else {
            return (.init(code: .failedPrecondition, message: "a snapshot set is in progress", reason: "vss-set-in-progress"), result)
        }
        var opened: OpaquePointer?
        let hr = quiesce_vss_open(&opened)
        guard hr == 0, let handle = opened else { return fail(hr, "CreateVssBackupComponents", nil) }
        let excluded = request.includeWriters ? request.excludeWriterNames : []
        var setID = [CChar](repeating: 0, count: 40)
        let prepared = withCStrings(request.volumes) { volumes in
            withCStrings(excluded) { writers in
                quiesce_vss_prepare(handle, request.backupType == .full ? 1 : 0, request.includeWriters ? 1 : 0, volumes, UInt32(request.volumes.count),
                                    writers, UInt32(excluded.count), &setID)
            }
        }
        guard prepared == 0 else { return fail(prepared, "preparing the snapshot set", handle) }
        result.snapshotSetID = String(cString: setID)
        let done = quiesce_vss_do_snapshot_set(handle, limit)
        guard done == 0 else { return fail(done, "DoSnapshotSet", handle) }
        result.allHeld = true
        result.writers = Self.writers(handle)
        for volume in request.volumes {
            var entry = Quiesce_Agent_V1_MountFreeze()
            entry.mountPoint = volume
            entry.frozen = true
            result.volumes.append(entry)
        }
        self.active.withLock { $0 = (request.freezeID, result.snapshotSetID, handle, .now, .milliseconds(Int64(limit))) }
        return (.ok, result)
    }

    public func thaw(_ request: Quiesce_Agent_V1_VssThawRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssThawResult) {
        guard let set = self.active.withLock({ state -> (freezeID: String, setID: String, handle: OpaquePointer, heldAt: ContinuousClock.Instant, limit: Duration)? in
            guard let current = state, current.freezeID == request.freezeID else { return nil }
            state = nil
            return current
        }) else {
            if let last = self.last.withLock({ $0 }), last.thaw.freezeID == request.freezeID { return (.ok, last) }
            return (.init(code: .notFound, message: "no snapshot set for freeze \"\(request.freezeID)\"", reason: "unknown-freeze"), .init())
        }
        var result = Quiesce_Agent_V1_VssThawResult()
        result.snapshotSetID = set.setID
        let released = quiesce_vss_release(set.handle, 60_000)
        let held = ContinuousClock.now - set.heldAt
        result.thaw.freezeID = set.freezeID
        result.thaw.frozenUs = UInt64(max(held.nanoseconds / 1000, 0))
        if released == 0 {
            result.thaw.cause = .command
            result.thaw.withinBudget = held <= set.limit
            result.writesHeld = result.thaw.withinBudget
            _ = quiesce_vss_backup_complete(set.handle)
        } else {
            result.thaw.cause = .budget
            result.error = Self.name(released)
            result.errorCode = UInt32(bitPattern: released)
            quiesce_vss_abort(set.handle)
        }
        result.writers = Self.writers(set.handle)
        quiesce_vss_close(set.handle)
        self.last.withLock { $0 = result }
        return (.ok, result)
    }

    public func abortAll(detail: String) async {
        if let set = self.active.withLock({ state in defer { state = nil }; return state }) {
            quiesce_vss_abort(set.handle)
            quiesce_vss_close(set.handle)
        }
    }
}

/// Runs `body` with `strings` as a C array of C strings.
private func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> T) -> T {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer($0) }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
#endif
