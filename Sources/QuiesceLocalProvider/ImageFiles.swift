import CQuiesceLinux
import Crypto
import Foundation
import QuiesceCore

/// Blocking file operations on disk images. Called only from dedicated
/// threads (ARCHITECTURE.md, invariant 9).
enum ImageFiles {
    struct CloneResult {
        var method: SnapshotMethod
        var dataBytes: UInt64
        var sizeBytes: UInt64
    }

    /// Clones `source` (an open descriptor) into a new file at `destination`:
    /// reflink where the filesystem can, sparse copy elsewhere.
    static func clone(source: Int32, to destination: String, allowReflink: Bool = true) throws -> CloneResult {
        let target = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard target >= 0 else { throw posixError("create", destination) }
        defer { close(target) }
        var result = try clone(source: source, into: target, path: destination, allowReflink: allowReflink)
        if result.method == .reflink { result.dataBytes = try dataBytes(target, size: result.sizeBytes) }
        return result
    }

    /// Clones `source` into `target`, an empty file open for writing (`path` names it in errors).
    /// Only what fixes the point in time: a reflink's `dataBytes` is left 0 for the caller to
    /// count from the clone afterwards (SEEK_DATA over every extent is not for a frozen window).
    static func clone(source: Int32, into target: Int32, path: String, allowReflink: Bool) throws -> CloneResult {
        var info = stat()
        guard fstat(source, &info) == 0 else { throw posixError("fstat", path) }
        let size = UInt64(info.st_size)
        if allowReflink {
            if quiesce_ficlone(target, source) == 0 { return CloneResult(method: .reflink, dataBytes: 0, sizeBytes: size) }
            // "Cannot share extents here" falls back to copying; anything else is a real failure.
            let reason = errno
            guard [EOPNOTSUPP, EXDEV, EINVAL, ENOTTY, ENOSYS, EPERM].contains(reason) else {
                throw posixError("FICLONE", path, code: reason)
            }
        }
        let copied = try sparseCopy(from: source, to: target, size: size, path: path)
        return CloneResult(method: .sparseCopy, dataBytes: copied, sizeBytes: size)
    }

    /// Copies only the data extents (SEEK_DATA/SEEK_HOLE), so holes stay holes.
    static func sparseCopy(from source: Int32, to target: Int32, size: UInt64, path: String) throws -> UInt64 {
        var copied: UInt64 = 0
        for (start, end) in try extents(source, size: size) {
            var sourceOffset = Int64(start)
            var targetOffset = Int64(start)
            while sourceOffset < Int64(end) {
                let n = quiesce_copy_file_range(source, &sourceOffset, target, &targetOffset, UInt(Int64(end) - sourceOffset))
                if n < 0 {
                    if errno == EXDEV || errno == ENOSYS || errno == EINVAL {
                        try readWriteCopy(source, target, from: sourceOffset, to: Int64(end), path: path)
                        break
                    }
                    throw posixError("copy_file_range", path)
                }
                if n == 0 { break }
            }
            copied += end - start
        }
        guard ftruncate(target, off_t(size)) == 0 else { throw posixError("ftruncate", path) }
        return copied
    }

    static func readWriteCopy(_ source: Int32, _ target: Int32, from start: Int64, to end: Int64, path: String) throws {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset = start
        while offset < end {
            let want = Int(min(Int64(buffer.count), end - offset))
            let n = buffer.withUnsafeMutableBytes { pread(source, $0.baseAddress, want, off_t(offset)) }
            guard n > 0 else { throw posixError("pread", path) }
            let written = buffer.withUnsafeBytes { pwrite(target, $0.baseAddress, n, off_t(offset)) }
            guard written == n else { throw posixError("pwrite", path) }
            offset += Int64(n)
        }
    }

    /// The data extents of a file as [start, end) byte ranges.
    static func extents(_ fd: Int32, size: UInt64) throws -> [(UInt64, UInt64)] {
        var ranges: [(UInt64, UInt64)] = []
        var offset: Int64 = 0
        while UInt64(offset) < size {
            let data = quiesce_seek_data(fd, offset)
            if data < 0 {
                if errno == ENXIO { break }
                // No SEEK_DATA support: treat the rest as data.
                ranges.append((UInt64(offset), size))
                break
            }
            var hole = quiesce_seek_hole(fd, data)
            if hole < 0 { hole = Int64(size) }
            ranges.append((UInt64(data), UInt64(hole)))
            offset = hole
        }
        return ranges
    }

    static func dataBytes(_ fd: Int32, size: UInt64) throws -> UInt64 {
        try extents(fd, size: size).reduce(0) { $0 + ($1.1 - $1.0) }
    }

    /// SHA-256 over the logical size, then each data extent's offset, length and
    /// bytes: detects any change to data or layout, without reading gigabytes
    /// of holes.
    static func sparseDigest(path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw posixError("open", path) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw posixError("fstat", path) }
        let size = UInt64(info.st_size)
        var hasher = SHA256()
        func feed(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { hasher.update(bufferPointer: $0) } }
        feed(size)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        for (start, end) in try extents(fd, size: size) {
            feed(start)
            feed(end - start)
            var offset = start
            while offset < end {
                let want = Int(min(UInt64(buffer.count), end - offset))
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(offset)) }
                guard n > 0 else { throw posixError("pread", path) }
                buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                offset += UInt64(n)
            }
        }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }

    /// Loop devices whose backing file is `path` (e.g. ["/dev/loop3"]).
    static func loopAttachments(of path: String) -> [String] {
        guard let resolved = realpath(path, nil) else { return [] }
        defer { free(resolved) }
        let target = String(cString: resolved)
        let devices = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return devices.filter { $0.hasPrefix("loop") }.sorted().compactMap { device in
            guard let backing = try? String(contentsOfFile: "/sys/block/\(device)/loop/backing_file", encoding: .utf8) else { return nil }
            return backing.trimmingCharacters(in: .whitespacesAndNewlines) == target ? "/dev/\(device)" : nil
        }
    }

    static func fsyncPath(_ path: String, directory: Bool = false) throws {
        let fd = open(path, (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw posixError("open", path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw posixError("fsync", path) }
    }

    static func posixError(_ call: String, _ path: String, code: Int32 = errno) -> ProviderError {
        let text = "\(call) \(path): \(String(cString: strerror(code)))"
        switch code {
        case ENOENT: return .notFound(text)
        case EEXIST, EBUSY: return .conflict(text)
        case EAGAIN, EINTR, ENOMEM: return .transient(text)
        default: return .permanent(text)
        }
    }
}
