import QuiesceCore
import QuiesceProto

extension Quiesce_Agent_V1_Facts {
    /// "Debian GNU/Linux 12, kernel 6.1.0 x86_64, host db-1, 2 CPUs, 8 GiB".
    public var summary: String {
        if self.osFamily == "windows" {
            return "\(self.osName) \(self.osVersion) \(self.architecture), host \(self.hostname), \(self.cpuCount) CPUs, \(formatBytes(self.memoryBytes))"
        }
        return "\(self.osName), kernel \(self.kernelRelease) \(self.architecture), host \(self.hostname), "
            + "\(self.cpuCount) CPUs, \(formatBytes(self.memoryBytes))"
    }

    /// "thaw guard ready; syncfs before FIFREEZE: auto (16 MiB or more dirty)"; nil from an agent that does not freeze.
    public var freezeSummary: String? {
        if self.osFamily == "windows" {
            return "VSS service \(self.vssService.isEmpty ? "not reported" : self.vssService); hold guard \(self.guardReady ? "ready" : "missing (snapshot sets are refused)"); \(self.vssWriters.count) writer\(self.vssWriters.count == 1 ? "" : "s")"
        }
        let syncfs: String
        switch self.syncfs {
        case .auto: syncfs = "auto (when \(formatBytes(self.syncfsMinDirtyBytes)) or more of the page cache is dirty)"
        case .always: syncfs = "always"
        case .never: syncfs = "never"
        case .unspecified, .UNRECOGNIZED: return nil
        }
        return "thaw guard \(self.guardReady ? "ready" : "missing (freezes are refused)"); syncfs before FIFREEZE: \(syncfs)"
    }

    /// The mounts as a table, with whether each can be frozen or why not.
    public func mountTable() -> String {
        var table = TextTable(headers: [self.osFamily == "windows" ? "VOLUME" : "MOUNT", "TYPE", "DEVICE", "SIZE", "FREE", "MODE", self.osFamily == "windows" ? "VSS" : "FREEZE"])
        for mount in self.mounts {
            table.append([
                mount.mountPoint, mount.fsType, mount.device, formatBytes(mount.sizeBytes), formatBytes(mount.availableBytes),
                mount.readOnly ? "ro" : "rw", mount.freezable ? "eligible" : mount.notFreezableReason,
            ])
        }
        return table.render()
    }

    /// The seed scripts and hooks, with whether each may run or why not.
    public func hookTable() -> String {
        var table = TextTable(headers: ["HOOK", "PATH", "OWNER", "MODE", "SIZE", "RUNS?"])
        for hook in self.hooks {
            let refusal: String = switch hook.refusal {
            case .none: "yes"
            case .missing: "no: missing"
            case .notRegular: "no: not a regular file"
            case .wrongOwner: "no: owner is not root"
            case .wrongMode: "no: mode must be 0700 or stricter"
            case .hashMismatch: "no: content changed"
            case .unknownHook: "no: unknown hook"
            case .UNRECOGNIZED(let value): "no (\(value))"
            }
            table.append([
                hook.name, hook.path, hook.exists ? "\(hook.ownerUid)" : "-", hook.exists ? String(hook.mode, radix: 8) : "-",
                hook.exists ? formatBytes(hook.sizeBytes) : "-", refusal,
            ])
        }
        return table.render()
    }

    /// The VSS writers (Windows): name, id, state, last error, components.
    public func writerTable() -> String {
        var table = TextTable(headers: ["WRITER", "ID", "STATE", "LAST ERROR", "COMPONENTS"])
        for writer in self.vssWriters {
            table.append([
                writer.name, writer.writerID, writer.state + (writer.stateCode == 0 ? "" : " (\(writer.stateCode))"),
                writer.lastError.isEmpty ? "-" : VssErrors.describe(writer.lastError, code: writer.lastErrorCode),
                writer.components.isEmpty ? "-" : writer.components.joined(separator: ", "),
            ])
        }
        return table.render()
    }

    /// The tables `quiesce facts` prints after the summary: mounts and hooks, or (Windows) volumes and writers.
    public func detailTables() -> String {
        if self.osFamily == "windows" { return self.mountTable() + "\n\n" + self.writerTable() }
        return self.mountTable() + "\n\n" + self.hookTable()
    }
}
