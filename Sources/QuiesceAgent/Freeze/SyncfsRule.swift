import CQuiesceLinux
import Foundation
import QuiesceProto

/// Whether a freeze flushes each filesystem (syncfs) just before its FIFREEZE.
///
/// FIFREEZE flushes the filesystem by itself (the kernel's freeze_super calls
/// sync_filesystem), but with writes already blocked: whatever is dirty is
/// written inside the frozen window. A syncfs first writes it while the
/// application can still write, so the freeze only has the rest to flush.
/// Measured on this project's bench layout (ext4 on a loop device, Linux 6.18):
///
/// * dirty data costs FIFREEZE about 2 ms per MiB: 8 MiB dirty → frozen 41 ms
///   without syncfs, 24 ms with; 32 MiB → 85 vs 25; 128 MiB → 250–460 vs 24.
/// * under a steady writer, where little is dirty at any moment (4 MiB), the
///   syncfs lengthens the freeze instead: FIFREEZE then waits for the journal
///   commit the syncfs started while the writer kept writing (frozen 63–76 ms
///   against 24–30 ms without; window 93 against 30).
///
/// So `auto`, the default, flushes when the instance's dirty page cache
/// (Dirty + Writeback, see ``DirtyPageGauge``: all filesystems, so it errs
/// towards flushing) is at least `minDirtyBytes` (16 MiB). Below that the flush
/// FIFREEZE does itself costs at most ~30 ms of frozen time. `always` and
/// `never` do what they say; the engine may ask for either per freeze.
///
/// Its weak spot: a writer that keeps writing hard. Much is dirty, so auto
/// flushes, but the flush runs long while the writer refills what FIFREEZE
/// then has to flush anyway (bench-freeze's first busy run, 100–110 MiB dirty
/// after its writer ran alone for 0.5 s: syncfs 0.5–0.8 s, window 1.1–1.6 s).
/// The figure cannot tell a burst that has ended from one that goes on, and
/// the kernel offers no per-filesystem dirty count outside debugfs. `never`
/// suits instances known to write like that.
public struct SyncfsRule: Sendable, Equatable {
    public enum Mode: String, Sendable, CaseIterable {
        case auto, always, never

        /// The same choice on the wire (facts, requests).
        public var policy: Quiesce_Agent_V1_SyncfsPolicy {
            switch self {
            case .auto: .auto
            case .always: .always
            case .never: .never
            }
        }

        /// The choice a request names; nil when it leaves it to the agent.
        public init?(_ policy: Quiesce_Agent_V1_SyncfsPolicy) {
            switch policy {
            case .auto: self = .auto
            case .always: self = .always
            case .never: self = .never
            case .unspecified, .UNRECOGNIZED: return nil
            }
        }
    }

    public var mode: Mode
    public var minDirtyBytes: UInt64

    public static let defaultMinDirtyMiB: UInt64 = 16
    public static let `default` = SyncfsRule(mode: .auto, minDirtyBytes: defaultMinDirtyMiB << 20)

    public init(mode: Mode, minDirtyBytes: UInt64 = defaultMinDirtyMiB << 20) {
        self.mode = mode
        self.minDirtyBytes = minDirtyBytes
    }

    public struct Decision: Sendable, Equatable {
        public var sync: Bool
        /// For the freeze reply and the agent's log, e.g. "auto: 4 MiB dirty < 16 MiB; FIFREEZE flushes it".
        public var reason: String
        public var dirtyKiB: UInt64?

        /// "flushed: always (the agent's setting)", for a log line.
        public var summary: String { "\(self.sync ? "flushed" : "not flushed"): \(self.reason)" }

        public init(sync: Bool, reason: String, dirtyKiB: UInt64?) {
            self.sync = sync
            self.reason = reason
            self.dirtyKiB = dirtyKiB
        }
    }

    /// The decision for one freeze: the request's policy if it names one, else
    /// this (the agent's) rule. `dirtyKiB` is read only when `auto` needs it.
    public func decide(_ request: Quiesce_Agent_V1_FreezeRequest, dirtyKiB: () -> UInt64? = { DirtyPageGauge.shared.read() }) -> Decision {
        let (mode, whose): (Mode, String) =
            if request.skipSyncfs { (.never, "the engine asked: skip_syncfs") }
            else if let asked = Mode(request.syncfs) { (asked, "the engine asked") }
            else { (self.mode, "the agent's setting") }
        switch mode {
        case .always: return Decision(sync: true, reason: "always (\(whose))", dirtyKiB: nil)
        case .never: return Decision(sync: false, reason: "never (\(whose))", dirtyKiB: nil)
        case .auto:
            let threshold = Self.mebibytes(self.minDirtyBytes >> 10)
            guard let dirty = dirtyKiB() else {
                return Decision(sync: true, reason: "auto: the dirty page count (meminfo) is unreadable, flushed to be safe", dirtyKiB: nil)
            }
            if dirty >= self.minDirtyBytes / 1024 {
                return Decision(sync: true, reason: "auto: \(Self.mebibytes(dirty)) dirty >= \(threshold)", dirtyKiB: dirty)
            }
            return Decision(sync: false, reason: "auto: \(Self.mebibytes(dirty)) dirty < \(threshold); FIFREEZE flushes it", dirtyKiB: dirty)
        }
    }

    /// "12 MiB", "0.3 MiB" (to the nearest tenth below 10 MiB). Integer arithmetic,
    /// not Foundation's String(format:): it runs on every freeze's path.
    static func mebibytes(_ kib: UInt64) -> String {
        if kib >= 10 << 10 || kib % 1024 == 0 { return "\(kib >> 10) MiB" }
        let tenths = (kib * 10 + 512) / 1024
        return "\(tenths / 10).\(tenths % 10) MiB"
    }

    /// Dirty + Writeback (KiB) from meminfo's text ("Dirty:     1234 kB" lines, or
    /// "Node 0 Dirty:  1234 kB" in a node's file); nil when either line is missing
    /// or malformed. Parsed in C: it runs on the freeze's path.
    public static func dirtyKiB(meminfo text: String) -> UInt64? {
        var kib: UInt64 = 0
        var copy = text
        let parsed = copy.withUTF8 { bytes in
            bytes.withMemoryRebound(to: CChar.self) { quiesce_parse_dirty_kib($0.baseAddress, UInt(bytes.count), &kib) }
        }
        return parsed == 0 ? kib : nil
    }
}

/// Where the syncfs rule reads how much of the page cache is dirty, just
/// before a freeze: each NUMA node's meminfo in sysfs
/// (/sys/devices/system/node/nodeN/meminfo), opened once at start-up and
/// re-read from offset 0 — sysfs generates the text afresh on each read — and
/// summed. That costs 0.012 ms (p50, one node, this VM) against 0.09 ms to
/// open, read and close /proc/meminfo, which stays the fallback (no node
/// files, or a read fails). Neither touches a disk, so both are safe while
/// something is frozen.
public final class DirtyPageGauge: Sendable {
    /// Opened on first use; the freeze controller touches it when it is made.
    public static let shared = DirtyPageGauge()

    private let nodeFiles: [Int32]

    public init() {
        var descriptors = [Int32](repeating: -1, count: 64)
        let count = Int(quiesce_open_node_meminfo(&descriptors, Int32(descriptors.count)))
        self.nodeFiles = Array(descriptors.prefix(max(count, 0)))
    }

    deinit { self.nodeFiles.forEach { close($0) } }

    /// Which source answers: "N node meminfo file(s)" or "/proc/meminfo".
    public var source: String { self.nodeFiles.isEmpty ? "/proc/meminfo" : "\(self.nodeFiles.count) node meminfo file\(self.nodeFiles.count == 1 ? "" : "s")" }

    /// Dirty + Writeback now, in KiB; nil when neither source can be read.
    public func read() -> UInt64? {
        var kib: UInt64 = 0
        if !self.nodeFiles.isEmpty,
           self.nodeFiles.withUnsafeBufferPointer({ quiesce_read_node_dirty_kib($0.baseAddress, Int32($0.count), &kib) }) == 0
        {
            return kib
        }
        return Self.readProcMeminfo()
    }

    /// Dirty + Writeback from /proc/meminfo, opened and read now.
    public static func readProcMeminfo() -> UInt64? {
        var kib: UInt64 = 0
        return quiesce_read_dirty_kib(&kib) == 0 ? kib : nil
    }
}
