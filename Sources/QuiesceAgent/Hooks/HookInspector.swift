import Crypto
import Foundation
import QuiesceCore
import QuiesceProto

/// Where the agent looks for hooks. The seed's scripts are fixed paths (set in
/// the agent's local configuration, never by the engine); named hooks live in
/// one root-owned directory.
public struct HookLocations: Sendable, Hashable {
    public var prescript: String
    public var postscript: String
    public var hookDirectory: String

    public init(prescript: String = "/tmp/prescript.sh", postscript: String = "/tmp/postscript.sh", hookDirectory: String = "/etc/quiesce/hooks.d") {
        self.prescript = prescript
        self.postscript = postscript
        self.hookDirectory = hookDirectory
    }

    public static let defaults = HookLocations()
}

/// A hook opened and checked on its descriptor: the same descriptor is what
/// gets hashed and, later, executed, so swapping the path after the check
/// changes nothing (invariant 5).
public struct CheckedHook: ~Copyable {
    public let fact: Quiesce_Agent_V1_HookFact
    /// Open (O_NOFOLLOW) when the hook passed every check; -1 otherwise.
    public let descriptor: Int32

    deinit { if self.descriptor >= 0 { close(self.descriptor) } }
}

/// Checks hooks the way the seed requires: a regular file (not a symlink,
/// opened with O_NOFOLLOW), owned by root, executable by its owner, with no
/// group or other permission bits; and, when the engine pins one, with the
/// expected SHA-256 of the content read from the open descriptor.
public enum HookInspector {
    /// Opens and checks `path`. The result's descriptor stays open only for a hook that may run.
    public static func check(name: String, path: String, pinnedSHA256: String? = nil, hashAlways: Bool = false, rootUID: uid_t = 0) -> CheckedHook {
        var fact = Quiesce_Agent_V1_HookFact()
        fact.name = name
        fact.path = path
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let code = errno
            switch code {
            case ENOENT, ENOTDIR:
                fact.refusal = .missing
                return CheckedHook(fact: fact, descriptor: -1)
            case ELOOP:
                // O_NOFOLLOW on a symlink: it exists but is not a regular file.
                fact.exists = true
                fact.refusal = .notRegular
                return CheckedHook(fact: fact, descriptor: -1)
            default:
                fact.refusal = .missing
                return CheckedHook(fact: fact, descriptor: -1)
            }
        }
        fact.exists = true
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            close(fd)
            fact.refusal = .missing
            return CheckedHook(fact: fact, descriptor: -1)
        }
        fact.regularFile = (info.st_mode & S_IFMT) == S_IFREG
        fact.ownerUid = info.st_uid
        fact.mode = UInt32(info.st_mode & 0o7777)
        fact.sizeBytes = UInt64(info.st_size)
        let wantHash = pinnedSHA256 != nil || hashAlways
        if fact.regularFile && wantHash, let digest = self.sha256(fd) { fact.sha256 = digest }

        if !fact.regularFile {
            fact.refusal = .notRegular
        } else if info.st_uid != rootUID {
            fact.refusal = .wrongOwner
        } else if info.st_mode & 0o077 != 0 || info.st_mode & 0o100 == 0 || info.st_mode & 0o6000 != 0 {
            // Group/other bits, not executable by its owner, or set-id bits.
            fact.refusal = .wrongMode
        } else if let pinned = pinnedSHA256, pinned.lowercased() != fact.sha256 {
            fact.refusal = .hashMismatch
        }
        if fact.refusal != .none {
            close(fd)
            return CheckedHook(fact: fact, descriptor: -1)
        }
        return CheckedHook(fact: fact, descriptor: fd)
    }

    /// The seed's scripts and every entry of the hook directory, for facts.
    public static func facts(_ locations: HookLocations, hashes: Bool) -> [Quiesce_Agent_V1_HookFact] {
        var facts = [
            self.check(name: "prescript", path: locations.prescript, hashAlways: hashes).fact,
            self.check(name: "postscript", path: locations.postscript, hashAlways: hashes).fact,
        ]
        let names = (try? FileManager.default.contentsOfDirectory(atPath: locations.hookDirectory)) ?? []
        for name in names.sorted() where !name.hasPrefix(".") {
            facts.append(self.check(name: name, path: locations.hookDirectory + "/" + name, hashAlways: hashes).fact)
        }
        return facts
    }

    /// Human words for a refusal, for logs and reasons.
    public static func explain(_ fact: Quiesce_Agent_V1_HookFact) -> String {
        switch fact.refusal {
        case .none: "\(fact.path) may run"
        case .missing: "\(fact.path) does not exist"
        case .notRegular: "\(fact.path) is not a regular file (symlinks are refused)"
        case .wrongOwner: "\(fact.path) is owned by uid \(fact.ownerUid); expected root (0)"
        case .wrongMode: "\(fact.path) has mode \(String(fact.mode, radix: 8)); expected 0700 or stricter, executable by root, no group or other bits"
        case .hashMismatch: "\(fact.path) has SHA-256 \(fact.sha256), not the one the plan pinned"
        case .unknownHook: "no hook named \"\(fact.name)\""
        case .UNRECOGNIZED(let value): "refused (\(value))"
        }
    }

    /// SHA-256 of the whole file, read through the descriptor (pread: its offset is untouched).
    static func sha256(_ fd: Int32) -> String? {
        var hasher = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var offset: off_t = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
            if n < 0 { return nil }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            offset += off_t(n)
        }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }
}
