import Foundation
import QuiesceCore
import QuiescePluginProto
import QuiescePlugins
import QuiesceTestSupport
import Testing

/// Where the built plugins and the host are, facts and policies for plans.
enum PluginFixtures {
    /// The build directory (the test bundle sits next to the built products).
    static var buildDirectory: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
    }

    static var packageRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    /// The built-in plugins next to the build products, then `extra` (explicit entries), as `standard` orders them.
    static func searchPath(_ extra: [String] = []) -> PluginSearchPath {
        PluginSearchPath(entries: [.init(path: Self.buildDirectory, explicit: false, prefix: "libquiesce-plugin-")]
            + extra.map { .init(path: $0, explicit: true, prefix: "") })
    }

    static func registry(_ extra: [String] = [], timeout: Duration = .seconds(5)) async -> PluginRegistry {
        await PluginRegistry.load(searchPath: Self.searchPath(extra), hostExecutable: Self.buildDirectory + "/quiesce-plugin-host", timeout: timeout)
    }

    static let goodHash = String(repeating: "ab", count: 32)

    static func hook(_ name: String, _ path: String, refusal: String = "", mode: UInt32 = 0o700, owner: UInt32 = 0, sha256: String = goodHash) -> HookFactBuilder {
        HookFactBuilder(value: .with {
            $0.name = name
            $0.path = path
            $0.exists = refusal != "missing"
            $0.regularFile = refusal != "missing" && refusal != "not-regular"
            $0.ownerUid = owner
            $0.mode = mode
            $0.sha256 = refusal == "missing" ? "" : sha256
            $0.refusal = refusal
        })
    }

    struct HookFactBuilder { var value: Quiesce_Plugin_V1_HookFact }

    static func mount(_ point: String, _ fsType: String, device: String, readOnly: Bool = false) -> Quiesce_Plugin_V1_MountFact {
        .with {
            $0.mountPoint = point
            $0.fsType = fsType
            $0.device = device
            $0.readOnly = readOnly
            if !["ext3", "ext4", "xfs"].contains(fsType) {
                $0.notFreezableReason = "fs-not-eligible:\(fsType)"
            } else if readOnly {
                $0.notFreezableReason = "read-only"
            } else {
                $0.freezable = true
            }
        }
    }

    /// A Linux instance with "/" (ext4) and "/data" (XFS), valid seed scripts, a guard.
    static func facts(
        mounts: [Quiesce_Plugin_V1_MountFact]? = nil, hooks: [HookFactBuilder]? = nil, guardReady: Bool = true, os: String = "linux"
    ) -> InstanceFacts {
        .with {
            $0.instanceID = "i-test"
            $0.osFamily = os
            $0.hostname = "test"
            $0.guardReady = guardReady
            $0.capabilities = ["facts", "hooks", "fsfreeze", "holds"]
            $0.mounts = mounts ?? [
                Self.mount("/", "ext4", device: "/dev/vda1"),
                Self.mount("/data", "xfs", device: "/dev/vdb"),
                Self.mount("/run/user/0", "tmpfs", device: "tmpfs"),
                Self.mount("/srv/ro", "ext4", device: "/dev/vdc", readOnly: true),
            ]
            $0.hooks = (hooks ?? [Self.hook("prescript", "/tmp/prescript.sh"), Self.hook("postscript", "/tmp/postscript.sh")]).map(\.value)
        }
    }

    static func policy(
        _ plugin: Plugin, wanted: ConsistencyLevel = .application, minimum: ConsistencyLevel = .crash, budgetMs: UInt32 = 10_000,
        options: [String: OptionInput] = [:]
    ) throws -> PlanPolicy {
        try PlanPolicy.with {
            $0.name = "test-policy"
            $0.wanted = wanted.planLevel
            $0.minimum = minimum.planLevel
            $0.freezeBudgetMs = budgetMs
            $0.options = try plugin.resolveOptions(options)
        }
    }

    /// Compiles a C plugin from `source` into `directory/name.so` with the ABI header,
    /// on a thread of its own (cc on the cooperative pool would starve the tests running beside it).
    static func compile(_ source: String, name: String, in directory: String, defines: [String] = []) async throws -> String {
        let file = directory + "/\(name).c", output = directory + "/\(name).so"
        try source.write(toFile: file, atomically: true, encoding: .utf8)
        let arguments = ["/usr/bin/cc", "-shared", "-fPIC", "-O0", "-I", Self.packageRoot + "/Sources/CQuiescePlugin/include", "-o", output, file]
            + defines.map { "-D" + $0 }
        let finished = try await blocking { try ChildProcess.run(arguments) }
        guard finished.status == 0 else { throw CompileFailed(text: finished.output) }
        return output
    }

    struct CompileFailed: Error, CustomStringConvertible { var text: String; var description: String { "cc failed: \(self.text)" } }

    /// Process ids of running plugin hosts serving `pluginPath`.
    static func hostProcesses(for pluginPath: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let arguments = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return arguments.first?.hasSuffix("quiesce-plugin-host") == true && arguments.dropFirst().first == pluginPath
        }
    }
}

extension Plan {
    var stepIDs: [[String]] { [self.prepare.map(\.id), self.quiesce.map(\.id), self.thaw.map(\.id), self.cleanup.map(\.id)] }
    func step(_ id: String) -> PlanStep? { (self.prepare + self.quiesce + self.thaw + self.cleanup).first { $0.id == id } }
}
