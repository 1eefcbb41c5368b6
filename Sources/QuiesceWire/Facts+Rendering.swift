import QuiesceCore
import QuiesceProto

extension Quiesce_Agent_V1_Facts {
    /// "Debian GNU/Linux 12, kernel 6.1.0 x86_64, host db-1, 2 CPUs, 8 GiB".
    public var summary: String {
        "\(self.osName), kernel \(self.kernelRelease) \(self.architecture), host \(self.hostname), "
            + "\(self.cpuCount) CPUs, \(formatBytes(self.memoryBytes))"
    }

    /// The mounts as a table, with whether each can be frozen or why not.
    public func mountTable() -> String {
        var table = TextTable(headers: ["MOUNT", "TYPE", "DEVICE", "SIZE", "FREE", "MODE", "FREEZE"])
        for mount in self.mounts {
            table.append([
                mount.mountPoint, mount.fsType, mount.device, formatBytes(mount.sizeBytes), formatBytes(mount.availableBytes),
                mount.readOnly ? "ro" : "rw", mount.freezable ? "eligible" : mount.notFreezableReason,
            ])
        }
        return table.render()
    }
}
