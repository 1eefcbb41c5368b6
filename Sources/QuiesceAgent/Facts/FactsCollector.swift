import Foundation
import QuiesceCore
import QuiesceProto
import QuiesceWire

/// Collects the facts the engine plans with: OS, kernel, host, and every
/// mount with its filesystem type, device, size, and whether it can be frozen.
public struct FactsCollector: Sendable {
    /// Filesystems the seed allows freezing (NTFS is the Windows agent's).
    public static let freezableTypes: Set<String> = ["ext3", "ext4", "xfs"]

    /// Kernel interfaces, never data: left out of the facts entirely.
    static let virtualTypes: Set<String> = [
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
        "bpf", "configfs", "fusectl", "hugetlbfs", "autofs", "binfmt_misc", "nsfs", "rpc_pipefs", "selinuxfs",
        "efivarfs", "devtmpfs",
    ]

    public var mountInfoPath: String
    public var osReleasePath: String
    public var hooks: HookLocations

    public init(mountInfoPath: String = "/proc/self/mountinfo", osReleasePath: String = "/etc/os-release", hooks: HookLocations = .defaults) {
        self.mountInfoPath = mountInfoPath
        self.osReleasePath = osReleasePath
        self.hooks = hooks
    }

    /// Collects on a dedicated thread: `statvfs` on a hung network mount blocks.
    public func collect(includeHookHashes: Bool = false) async throws -> Facts {
        let collector = self
        return try await DedicatedThread.run(name: "quiesce-facts") { try collector.collectBlocking(includeHookHashes: includeHookHashes) }
    }

    public func collectBlocking(includeHookHashes: Bool = false) throws -> Facts {
        var facts = Facts()
        facts.osFamily = "linux"
        let release = Self.parseOSRelease((try? String(contentsOfFile: self.osReleasePath, encoding: .utf8)) ?? "")
        facts.osName = release["PRETTY_NAME"] ?? release["NAME"] ?? "Linux"
        facts.osVersion = release["VERSION_ID"] ?? ""
        var names = utsname()
        uname(&names)
        facts.kernelRelease = Self.string(from: names.release)
        facts.architecture = Self.string(from: names.machine)
        facts.hostname = ProcessInfo.processInfo.hostName
        facts.cpuCount = UInt32(ProcessInfo.processInfo.activeProcessorCount)
        facts.memoryBytes = ProcessInfo.processInfo.physicalMemory
        if let stat = Self.readWhole("/proc/stat"),
           let line = stat.split(separator: "\n").first(where: { $0.hasPrefix("btime ") }),
           let btime = UInt64(line.dropFirst(6).trimmingCharacters(in: .whitespaces))
        {
            facts.bootTimeUnix = btime
        }
        guard let text = Self.readWhole(self.mountInfoPath) else {
            throw FactsError.unreadable(source: self.mountInfoPath, detail: "cannot read the mount table")
        }
        facts.mounts = Self.mounts(from: try MountInfoEntry.parse(text))
        facts.hooks = HookInspector.facts(self.hooks, hashes: includeHookHashes)
        return facts
    }

    /// Reads a whole file with read(2) until end-of-file. procfs files report size 0,
    /// and Foundation's String(contentsOfFile:) stopped after the first 4 KiB of
    /// /proc/self/mountinfo: an instance with many mounts lost most of them.
    public static func readWhole(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var data = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 { data += chunk[0..<n]; continue }
            if n == 0 { break }
            if errno == EINTR { continue }
            return nil
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Turns mount table entries into facts: drops kernel interfaces, measures
    /// each filesystem, and says why any one cannot be frozen.
    static func mounts(from entries: [MountInfoEntry]) -> [Quiesce_Agent_V1_Mount] {
        var firstMountOfDevice: [String: String] = [:]
        var mounts: [Quiesce_Agent_V1_Mount] = []
        for entry in entries where !self.virtualTypes.contains(entry.fsType) {
            var mount = Quiesce_Agent_V1_Mount()
            mount.mountPoint = entry.mountPoint
            mount.device = entry.source
            mount.fsType = entry.fsType
            mount.readOnly = entry.readOnly
            mount.deviceNumber = entry.deviceNumber
            var info = statvfs()
            if statvfs(entry.mountPoint, &info) == 0 {
                mount.sizeBytes = UInt64(info.f_blocks) * UInt64(info.f_frsize)
                mount.availableBytes = UInt64(info.f_bavail) * UInt64(info.f_frsize)
            }
            if !self.freezableTypes.contains(entry.fsType) {
                mount.notFreezableReason = "fs-not-eligible:\(entry.fsType)"
            } else if entry.readOnly {
                mount.notFreezableReason = "read-only"
            } else if let first = firstMountOfDevice[entry.deviceNumber] {
                // A bind mount or second mount of a filesystem already listed: freezing that one freezes this.
                mount.notFreezableReason = "same-filesystem-as:\(first)"
            } else {
                firstMountOfDevice[entry.deviceNumber] = entry.mountPoint
                mount.freezable = true
            }
            mounts.append(mount)
        }
        return mounts
    }

    static func parseOSRelease(_ text: String) -> [String: String] {
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "="), !line.hasPrefix("#") else { continue }
            var value = line[line.index(after: equals)...]
            if value.count >= 2, let first = value.first, first == "\"" || first == "'", value.last == first {
                value = value.dropFirst().dropLast()
            }
            values[String(line[..<equals])] = String(value)
        }
        return values
    }

    static func string<T>(from tuple: T) -> String {
        withUnsafeBytes(of: tuple) { buffer in
            String(decoding: buffer.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }
}
