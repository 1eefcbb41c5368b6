import Foundation
import QuiesceCore

/// fsck of a snapshot, on a copy: the snapshot itself is never written. An
/// image whose journal (ext4) or log (XFS) must be replayed before it checks
/// clean is reported ok-after-recovery, not ok.
///
/// On ext4 that is a level indicator: a freeze flushes the journal and clears
/// needs_recovery, so only a crash-consistent image needs the replay. XFS keeps
/// its log dirty across a freeze (measured here: `xfs_repair -n` asks for a
/// replay on a frozen clone), so on XFS it is not.
enum FilesystemCheck {
    static func check(snapshot: String, scratch: String, disk: String) throws -> Inventory.DiskCheck {
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let copy = "\(scratch)/\(disk)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        defer { unlink(copy) }
        // A reflink where possible; a sparse copy elsewhere.
        _ = try tool("cp", "--reflink=auto", "--sparse=always", snapshot, copy)
        let fsType = (try? tool("blkid", "-o", "value", "-s", "TYPE", copy).output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? ""
        switch fsType {
        case "ext2", "ext3", "ext4":
            let header = try tool("dumpe2fs", "-h", copy).output
            let needsRecovery = header.split(separator: "\n").contains { $0.hasPrefix("Filesystem features:") && $0.contains("needs_recovery") }
            if needsRecovery { _ = try? tool("e2fsck", "-fy", copy) }  // replays the journal on the copy
            let result = try tool("e2fsck", "-fn", copy, allowFailure: true)
            return outcome(disk, fsType, clean: result.status == 0, recovered: needsRecovery, detail: result.lastLines())
        case "xfs":
            var result = try tool("xfs_repair", "-n", copy, allowFailure: true)
            var recovered = false
            if result.status != 0 && result.output.contains("log") {
                // A dirty log: mount the copy (nouuid: it shares its original's UUID) so XFS replays it.
                let mountPoint = "\(scratch)/mnt-\(getpid())-\(disk)"
                try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
                defer { try? FileManager.default.removeItem(atPath: mountPoint) }
                _ = try tool("mount", "-o", "loop,nouuid", copy, mountPoint)
                _ = try? tool("umount", mountPoint)
                recovered = true
                result = try tool("xfs_repair", "-n", copy, allowFailure: true)
            }
            return outcome(disk, fsType, clean: result.status == 0, recovered: recovered, detail: result.lastLines())
        default:
            return Inventory.DiskCheck(
                disk: disk, outcome: .ok, filesystem: fsType.isEmpty ? nil : fsType,
                detail: fsType.isEmpty ? "checksum ok; no filesystem recognised, nothing to fsck" : "checksum ok; no checker for \(fsType)")
        }
    }

    static func outcome(_ disk: String, _ fsType: String, clean: Bool, recovered: Bool, detail: String) -> Inventory.DiskCheck {
        let outcome: Inventory.DiskCheck.Outcome = !clean ? .filesystemErrors : (recovered ? .okAfterRecovery : .ok)
        return Inventory.DiskCheck(disk: disk, outcome: outcome, filesystem: fsType, detail: detail)
    }

    @discardableResult
    static func tool(_ arguments: String..., allowFailure: Bool = false) throws -> ChildProcess.Finished {
        let finished: ChildProcess.Finished
        do {
            finished = try ChildProcess.run(arguments)
        } catch {
            throw InventoryError.tool("cannot run \(arguments[0]): \(error)")
        }
        if finished.status != 0 && !allowFailure {
            throw InventoryError.tool("\(arguments.joined(separator: " ")) exited \(finished.status): \(finished.lastLines())")
        }
        return finished
    }
}
