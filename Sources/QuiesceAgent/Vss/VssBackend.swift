import QuiesceCore
import QuiesceProto
import QuiesceWire

/// The agent's VSS side: what a Windows instance reports, and one snapshot set
/// driven as a VSS requester. Two implementations: ``VssSimulator`` (Linux, a
/// scenario file, real holds through the thaw guard) and, compiled on Windows
/// only, `WindowsVssBackend` (the VSS API; see README, Windows).
///
/// The requester's sequence, which both follow:
///
///     InitializeForBackup → SetBackupState(COPY | FULL) → GatherWriterMetadata
///     → StartSnapshotSet → AddToSnapshotSet (each volume) → PrepareForBackup
///     → GatherWriterStatus → DoSnapshotSet: writers freeze, the provider flushes
///       and holds the volumes' writes and signals "frozen" from CommitSnapshots
///       ── freeze answered; the engine takes the snapshot; thaw asked ──
///     → the hold released → writers thaw, post-snapshot → GatherWriterStatus
///     → BackupComplete                        (or AbortBackup on any error)
///
/// The hold ends by itself after the hold limit (10 s, VSS_E_HOLD_WRITES_TIMEOUT).
public protocol VssBackend: Sendable {
    /// The instance as Windows reports it: OS, volumes as mounts, the VSS service, writers.
    func facts(base: Facts) async -> Facts
    /// Runs the sequence up to "frozen": answers when the volumes' writes are held
    /// (or the set failed, with its VSS error).
    func freeze(_ request: Quiesce_Agent_V1_VssFreezeRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssFreezeResult)
    /// Releases the hold and finishes the set; says how the hold ended and every writer's state.
    func thaw(_ request: Quiesce_Agent_V1_VssThawRequest) async -> (AgentStatus, Quiesce_Agent_V1_VssThawResult)
    /// Nobody is watching (the session ended, the agent stops): release any hold, abort the set.
    func abortAll(detail: String) async
}
