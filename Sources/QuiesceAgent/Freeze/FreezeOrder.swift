import Foundation

/// The order in which a freeze's filesystems are frozen, and which of them can
/// be frozen at once.
///
/// Independent filesystems (on disks of their own) are frozen together, so the
/// frozen window grows with the slowest FIFREEZE rather than the sum of them.
/// A filesystem *stacked* on another — a loop device whose image file lives on
/// another filesystem of the same freeze — must be frozen before the one under
/// it: its FIFREEZE flushes through the loop device into the image, which would
/// block forever on a lower filesystem that is already frozen. Those go one by
/// one, upper before lower; "/" always last, on its own (the agent lives there).
/// Thawing runs in reverse, so the lower filesystem is writable again before
/// the upper one's thaw writes its superblock.
public enum FreezeOrder {
    public struct Mount: Sendable, Equatable {
        public var path: String
        /// st_dev of the mounted filesystem.
        public var device: UInt64
        /// st_dev of the filesystems holding the files this one's block device
        /// is made of (loop images, also under device-mapper or md); nil when
        /// that could not be found out (such a mount is never frozen concurrently).
        public var backedBy: Set<UInt64>?

        public init(path: String, device: UInt64, backedBy: Set<UInt64>?) {
            self.path = path
            self.device = device
            self.backedBy = backedBy
        }
    }

    /// Indices into `mounts` in freeze order, and how many of the first ones are frozen together (≥ 1).
    public static func plan(_ mounts: [Mount]) -> (order: [Int], concurrent: Int) {
        // Which mounts of this freeze each one sits on, and which sit on it.
        var lower: [Int: Set<Int>] = [:]
        var stacked = Set<Int>()
        for (i, mount) in mounts.enumerated() {
            for (j, other) in mounts.enumerated() where i != j && (mount.backedBy ?? []).contains(other.device) {
                lower[i, default: []].insert(j)
                stacked.insert(i)
                stacked.insert(j)
            }
        }
        let root = mounts.indices.filter { mounts[$0].path == "/" }
        let independent = mounts.indices.filter { mounts[$0].path != "/" && mounts[$0].backedBy != nil && !stacked.contains($0) }
        var rest = mounts.indices.filter { !independent.contains($0) && !root.contains($0) }
        // Upper before lower: repeatedly take the first mount (request order) nothing left still sits on.
        var ordered: [Int] = []
        while !rest.isEmpty {
            let next = rest.firstIndex { candidate in !rest.contains { (lower[$0] ?? []).contains(candidate) } } ?? 0
            ordered.append(rest.remove(at: next))
        }
        let order = independent + ordered + root
        return (order, max(1, independent.count))
    }

    /// The filesystems (st_dev) holding the image files behind block device
    /// `device`, following device-mapper and md members down to loop devices.
    /// nil when sysfs does not describe the device.
    public static func backingFilesystems(ofDevice device: UInt64, sysfs: String = "/sys/dev/block") -> Set<UInt64>? {
        var result = Set<UInt64>()
        var seen = Set<String>()
        func visit(_ directory: String, depth: Int) -> Bool {
            guard depth < 16, seen.insert(directory).inserted else { return true }
            guard FileManager.default.fileExists(atPath: directory) else { return false }
            if let backing = try? String(contentsOfFile: directory + "/loop/backing_file", encoding: .utf8) {
                var info = stat()
                let path = backing.trimmingCharacters(in: .newlines)
                // A deleted or unreachable image: its filesystem is unknown; play safe.
                guard stat(path, &info) == 0 else { return false }
                result.insert(UInt64(info.st_dev))
            }
            // A partition's parent holds the loop (loop0p1 → loop0).
            if FileManager.default.fileExists(atPath: directory + "/partition") {
                let resolved = (try? FileManager.default.destinationOfSymbolicLink(atPath: directory)).map {
                    URL(fileURLWithPath: $0, relativeTo: URL(fileURLWithPath: sysfs + "/")).deletingLastPathComponent().path
                }
                if let parent = resolved, !visit(parent, depth: depth + 1) { return false }
            }
            for member in (try? FileManager.default.contentsOfDirectory(atPath: directory + "/slaves")) ?? [] {
                if !visit(directory + "/slaves/" + member, depth: depth + 1) { return false }
            }
            return true
        }
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & 0xffff_f000)
        let minor = (device & 0xff) | ((device >> 12) & 0xffff_ff00)
        return visit("\(sysfs)/\(major):\(minor)", depth: 0) ? result : nil
    }
}
