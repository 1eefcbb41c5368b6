import Foundation
import Logging
import QuiesceAgent
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePKI
import QuiescePlugins
import QuiesceWire

/// `quiesce demo`: the whole product on one machine. An XFS reflink pool on a
/// loop device; eight instances — five Linux, three Windows played by the VSS
/// simulator — whose disks are images in the pool, loop-mounted;
/// one agent per instance on loopback over mutual TLS; a fleet backup through
/// the coordinator; the report with all three levels and their reasons; one
/// snapshot verified; everything unmounted, detached and removed. Needs root.
public struct FleetDemo: Sendable {
    public var json: Bool
    public var progress: @Sendable (String) -> Void

    public init(json: Bool = false, progress: @escaping @Sendable (String) -> Void) {
        self.json = json
        self.progress = progress
    }

    /// What it needs, when it cannot run (nil when it can).
    public static var missingRequirement: String? {
        if getuid() != 0 {
            return "the full demo needs root: it makes loop devices, XFS and ext4 filesystems, and freezes them (run it with sudo)"
        }
        for tool in ["losetup", "mount", "umount", "mkfs.xfs", "mkfs.ext4", "mkfs.ext2", "truncate"]
        where !["/usr/sbin", "/sbin", "/usr/bin", "/bin"].contains(where: { FileManager.default.isExecutableFile(atPath: "\($0)/\(tool)") }) {
            return "the full demo needs \(tool) (apt-get install xfsprogs e2fsprogs util-linux)"
        }
        return nil
    }

    struct Instance {
        var id: String
        var policy: String
        var fsType: String
        var scripts: String  // "valid", "0755", "none"
        /// The level the demo must show for it (and the reason's code, when below application).
        var expected: ConsistencyLevel
        var reason: String
        /// A Windows instance, played by the VSS simulator: "healthy", "writer-fails", "vss-stopped".
        var windows: String? = nil
    }

    static let instances = [
        Instance(id: "web-1", policy: "app", fsType: "ext4", scripts: "valid", expected: .application, reason: ""),
        Instance(id: "web-2", policy: "app", fsType: "ext4", scripts: "valid", expected: .application, reason: ""),
        Instance(id: "db-1", policy: "app", fsType: "ext4", scripts: "0755", expected: .filesystem, reason: "prescript-wrong-mode"),
        Instance(id: "legacy-1", policy: "app", fsType: "ext2", scripts: "valid", expected: .crash, reason: "no-eligible-filesystem"),
        Instance(id: "cache-1", policy: "baseline", fsType: "ext4", scripts: "none", expected: .crash, reason: ""),
        Instance(id: "win-sql-1", policy: "win", fsType: "ext4", scripts: "none", expected: .application, reason: "", windows: "healthy"),
        Instance(id: "win-mail-1", policy: "win", fsType: "ext4", scripts: "none", expected: .filesystem, reason: "vss-writer-failed", windows: "writer-fails"),
        Instance(id: "win-old-1", policy: "win", fsType: "ext4", scripts: "none", expected: .crash, reason: "vss-service-not-running", windows: "vss-stopped"),
    ]

    /// The simulated Windows instance's scenario: its one volume C:\ is the instance's loop-mounted disk.
    static func scenario(_ instance: Instance, volume: String) -> VssScenario {
        var writers = [
            VssScenario.Writer(name: "Registry Writer", id: "afbab4a2-367d-4d15-a586-71dbb18f8485", instanceID: VssScenario.uuid(from: "registry"),
                               components: ["Registry"]),
        ]
        switch instance.windows {
        case "healthy"?:
            writers.insert(.init(name: "SqlServerWriter", id: "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a", instanceID: VssScenario.uuid(from: "sql"),
                                 components: ["master", "model", "sales"]), at: 0)
        case "writer-fails"?:
            writers.insert(.init(name: "Microsoft Exchange Writer", id: "76fe1ac4-15f7-4bcd-987e-8e1acb462fb7", instanceID: VssScenario.uuid(from: "exchange"),
                                 components: ["Mailbox Database"], phases: [.freeze: .fail(error: "VSS_E_WRITERERROR_NONRETRYABLE", times: nil)]), at: 0)
        default: break
        }
        return VssScenario(hostname: instance.id, vssService: instance.windows == "vss-stopped" ? "stopped" : "running",
                           volumes: [.init(name: "C:\\", fsType: "NTFS", path: volume)], writers: writers)
    }

    /// Instances whose outcome is not what the demo shows (empty when it worked).
    static func surprises(in report: RunReport) -> [String] {
        Self.instances.compactMap { instance in
            guard let outcome = report.instances.first(where: { $0.instanceID == instance.id }) else { return "\(instance.id): no outcome" }
            let reasonOK = instance.reason.isEmpty || outcome.reasons.first?.hasPrefix(instance.reason + ":") == true
            guard outcome.achieved == instance.expected, reasonOK else {
                return "\(instance.id): expected \(instance.expected.name)\(instance.reason.isEmpty ? "" : " (\(instance.reason))"), got \(outcome.achieved?.name ?? "no snapshot") \(outcome.reasons)"
            }
            return nil
        }
    }

    static var ramDirectory: String { "/dev/shm/quiesce-demo-\(getpid())" }

    /// Runs the demo; returns what to print on stdout and the run's exit code.
    public func run() async throws -> (output: String, exitCode: Int32) {
        let directory = "/tmp/quiesce-demo-\(getpid())"
        let system = System()
        let stack = Teardown()
        func removeDirectories() {
            for path in [directory, Self.ramDirectory] { try? FileManager.default.removeItem(atPath: path) }
        }
        do {
            let result = try await self.body(system: system, directory: directory, stack: stack)
            await stack.run()
            self.progress("cleaning up: agents stopped, filesystems unmounted, loop devices detached")
            let left = (try? await system.blocking { system.cleanUp() }) ?? []
            guard left.isEmpty else {
                throw CommandError(text: "could not undo \(left.joined(separator: ", ")); \(directory) is left in place")
            }
            removeDirectories()
            return result
        } catch {
            await stack.run()
            let left = (try? await system.blocking { system.cleanUp() }) ?? []
            if left.isEmpty { removeDirectories() }
            else { self.progress("could not undo \(left.joined(separator: ", ")); \(directory) is left in place") }
            throw error
        }
    }

    private func body(system: System, directory: String, stack: Teardown) async throws -> (output: String, exitCode: Int32) {
        let began = ContinuousClock.now
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])

        self.progress("making the pool: an XFS filesystem with reflink on a loop device")
        // The pool's image in RAM where there is /dev/shm, as in bench-fleet: every instance here
        // shares this machine's one disk, and each FIFREEZE's cache flush would wait for that disk
        // (10-20 ms here) — what the demo shows is then the machine's disk, not Quiesce's window.
        let inRAM = FileManager.default.isWritableFile(atPath: "/dev/shm")
        if inRAM {
            try FileManager.default.createDirectory(atPath: Self.ramDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        let pool = try await system.blocking {
            let image = (inRAM ? Self.ramDirectory : directory) + "/pool.img"
            try system.run("truncate", "-s", "512M", image)
            try system.run("mkfs.xfs", "-q", "-m", "reflink=1", image)
            return try system.mount(try system.attach(image), at: directory + "/pool")
        }
        let provider = try LocalProvider(pool: pool + "/quiesce", createBurst: 20, createsPerSecond: 50)

        self.progress("making \(Self.instances.count) instances (\(Self.instances.filter { $0.windows != nil }.count) of them Windows, played by the VSS simulator): a 64 MiB disk each, in the pool, loop-mounted")
        var mounts: [String: String] = [:]
        for instance in Self.instances {
            let image = try provider.diskPath("\(instance.id)-data")
            mounts[instance.id] = try await system.blocking {
                try system.run("truncate", "-s", "64M", image)
                try system.run("mkfs.\(instance.fsType)", "-q", "-F", image)
                // Direct I/O, as a VM's disk with cache=none: the guest's writes reach the image, not a host page cache.
                let mountPoint = try system.mount(try system.attach(image, directIO: true), at: directory + "/\(instance.id)")
                // Something to snapshot.
                try Data(repeating: 0x5a, count: 1 << 20).write(to: URL(fileURLWithPath: mountPoint + "/data.bin"))
                return mountPoint
            }
            let hooks = directory + "/hooks-\(instance.id)"
            try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            if instance.scripts != "none" {
                let mode = instance.scripts == "0755" ? 0o755 : 0o700
                for (name, text) in [("prescript.sh", "#!/bin/sh\necho \"app on $(hostname) paused\"\n"), ("postscript.sh", "#!/bin/sh\necho resumed\n")] {
                    guard FileManager.default.createFile(
                        atPath: hooks + "/" + name, contents: Data(text.utf8), attributes: [.posixPermissions: name == "prescript.sh" ? mode : 0o700])
                    else { throw CommandError(text: "cannot write \(hooks)/\(name)") }
                }
            }
        }

        self.progress("making a throw-away CA and an engine on 127.0.0.1")
        let ca = CADirectory(path: directory + "/ca")
        try ca.initialize(commonName: "Quiesce demo CA", names: ["localhost"], ipAddresses: ["127.0.0.1"])
        for instance in Self.instances { try ca.issue(.agent(instanceID: instance.id)) }
        var quiet = Logger(label: "quiesce.demo")
        quiet.logLevel = .critical
        let engine = try Engine(
            configuration: EngineConfiguration(
                listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles,
                adminSocketPath: directory + "/admin.sock", limits: .defaults),
            logger: quiet)
        let engineTask = Task { try await engine.run() }
        stack.push {
            engine.shutdown()
            _ = try? await engineTask.value
        }
        let address = try await engine.listeningAddress()

        self.progress("starting \(Self.instances.count) agents (mutual TLS, a thaw guard each; the Windows ones drive simulated VSS)")
        let guardPath = PluginSearchPath.executableDirectory + "/quiesce-thaw-guard"
        var handlers: [BuiltinCommandHandler] = []
        var agentTasks: [Task<Void, any Error>] = []
        for instance in Self.instances {
            let hooks = directory + "/hooks-\(instance.id)"
            let handler = BuiltinCommandHandler(
                facts: FactsCollector(hooks: HookLocations(prescript: hooks + "/prescript.sh", postscript: hooks + "/postscript.sh", hookDirectory: hooks)),
                guardExecutable: guardPath, vssScenario: instance.windows == nil ? nil : Self.scenario(instance, volume: mounts[instance.id]!), logger: quiet)
            handlers.append(handler)
            let runner = AgentRunner(
                configuration: AgentConfiguration(engine: address, identity: ca.agentFiles(instanceID: instance.id),
                                                  backoff: Backoff(base: .milliseconds(50), cap: .milliseconds(500))),
                handler: handler, logger: quiet)
            agentTasks.append(Task { try await runner.run() })
        }
        let stopAgents = agentTasks
        let stopHandlers = handlers
        stack.push {
            for task in stopAgents { task.cancel() }
            for task in stopAgents { _ = try? await task.value }
            for handler in stopHandlers { await handler.shutdown() }
        }

        let plugins = await PluginRegistry.load()
        stack.push { await plugins.shutdown() }
        if let failure = plugins.failures.first { self.progress("plugin not loaded: \(failure)") }
        let fleetText = self.fleetFile(pool: provider.pool, mounts: mounts, directory: directory)
        let fleet = try FleetFile.parse(fleetText, path: "demo-fleet.yaml", plugins: plugins)
        let catalog = try SQLiteCatalog(path: directory + "/catalog.db")

        self.progress("backing up the fleet (policies: app = linux-freeze wanting application; win = windows-vss wanting application; baseline = crash)")
        let coordinator = Coordinator(
            engine: engine, plugins: plugins,
            providers: ["pool": .init(provider: provider, bucket: TokenBucket(burst: 20, perSecond: 50))], catalog: catalog, fleet: fleet)
        let report = await coordinator.run(runID: "demo-\(getpid())", agentWait: .seconds(20)) { event in
            if case .instanceFinished(let outcome) = event {
                self.progress("  \(outcome.instanceID): \(outcome.achieved?.name ?? "failed")")
            }
        }

        // Verify one snapshot: checksums of the clone against the ones recorded after the thaw.
        var verification = "no snapshot to verify"
        if let web = report.instances.first(where: { $0.instanceID == "web-1" }), let group = web.groupID {
            let results = try await provider.verify(group)
            let ok = results.allSatisfy { $0.recorded == $0.actual }
            verification = "verified \(group) (web-1): \(results.count) disk\(results.count == 1 ? "" : "s"), checksums \(ok ? "match" : "DIFFER")"
        }
        let elapsed = ContinuousClock.now - began
        // The demo is meant to show all three levels: it succeeds when each instance got the level it should.
        let surprises = Self.surprises(in: report)
        let code: Int32 = surprises.isEmpty ? 0 : 1
        if self.json {
            let object: [String: Any] = ["run": report.runID, "run_exit_code": Int(report.exitCode), "verification": verification,
                                         "elapsed_ms": elapsed.milliseconds, "instances": report.instances.map(\.json), "surprises": surprises]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            return (String(decoding: data, as: UTF8.self), code)
        }
        var text = report.renderTable()
        text += "\n\n" + verification
        text += surprises.isEmpty ? "\nEvery instance reached the level the demo expects; `quiesce backup --fleet` would exit \(report.exitCode) (some downgraded)."
            : "\nUNEXPECTED:\n  " + surprises.joined(separator: "\n  ")
        text += "\nThe demo took \(String(format: "%.1f", elapsed.timeInterval)) s."
        return (text, code)
    }

    func fleetFile(pool: String, mounts: [String: String], directory: String) -> String {
        var text = """
            providers:
              pool: { kind: local, pool: \(pool), burst: 20, per_second: 50 }
            policies:
              app: { plugin: linux-freeze, wanted: application, minimum: crash, freeze_budget_ms: 10000 }
              baseline: { plugin: crash, wanted: crash }
              win: { plugin: windows-vss, wanted: application, minimum: crash, freeze_budget_ms: 10000 }
            instances:

            """
        for instance in Self.instances {
            let hooks = directory + "/hooks-\(instance.id)"
            // Every instance here shares this machine's mount table: each freezes only its own disk.
            let options = instance.policy == "app"
                ? ", options: { only_mounts: [\(mounts[instance.id]!)], prescript_path: \(hooks)/prescript.sh, postscript_path: \(hooks)/postscript.sh }"
                : ""
            text += "  - { id: \(instance.id), policy: \(instance.policy), disks: [\(instance.id)-data]\(options) }\n"
        }
        // The two web servers are one application: snapshotted at one point in time (a consistency group).
        text += "groups:\n  web: { members: [web-1, web-2] }\n"
        // Two frozen at a time (the group's two together): every instance and its agent share this
        // machine's cores, and windows that overlap stretch each other; a real fleet's agents do not.
        text += "run: { max_frozen: 2 }\n"
        return text
    }
}

/// Undo actions, run last-in first-out (agents before the engine they talk to).
final class Teardown: @unchecked Sendable {
    private let lock = NSLock()
    private var actions: [@Sendable () async -> Void] = []
    func push(_ action: @escaping @Sendable () async -> Void) { self.lock.withLock { self.actions.append(action) } }
    func run() async {
        while let action = self.lock.withLock({ self.actions.popLast() }) { await action() }
    }
}

/// Loop devices and mounts the demo made, undone in the reverse order of making
/// them (a disk's mount, then its loop device, then the pool that holds its image),
/// thawing first, even when the demo fails.
public final class System: @unchecked Sendable {
    public init() {}
    private enum Made { case device(String), mount(String) }
    private let lock = NSLock()
    private var made: [Made] = []

    public func blocking<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await DedicatedThread.run(name: "quiesce-demo") { try work() }
    }

    @discardableResult
    public func run(_ arguments: String...) throws -> String { try self.run(arguments) }

    @discardableResult
    public func run(_ arguments: [String]) throws -> String {
        let finished = try ChildProcess.run(arguments)
        guard finished.status == 0 else {
            throw CommandError(text: "\(arguments.joined(separator: " ")) failed (\(finished.status)): \(finished.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return finished.output
    }

    /// - Parameter directIO: the loop device reads and writes the image with O_DIRECT,
    ///   as a hypervisor with cache=none does: no second page cache under the guest's.
    public func attach(_ image: String, directIO: Bool = false) throws -> String {
        let device = try self.run("losetup", "--find", "--show", directIO ? "--direct-io=on" : "--direct-io=off", image)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        self.lock.withLock { self.made.append(.device(device)) }
        return device
    }

    public func mount(_ device: String, at path: String) throws -> String {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try self.run("mount", device, path)
        self.lock.withLock { self.made.append(.mount(path)) }
        return path
    }

    /// Undoes everything; returns what could not be undone (empty when clean).
    @discardableResult
    public func cleanUp() -> [String] {
        let made = self.lock.withLock { () -> [Made] in
            defer { self.made = [] }
            return self.made
        }
        for case .mount(let path) in made { _ = try? self.run("fsfreeze", "--unfreeze", path) }
        var left: [String] = []
        for item in made.reversed() {
            switch item {
            case .mount(let path):
                if (try? self.run("umount", path)) == nil {
                    usleep(200_000)
                    if (try? self.run("umount", path)) == nil { left.append("mount \(path)") }
                }
            case .device(let device):
                if (try? self.run("losetup", "-d", device)) == nil { left.append("loop device \(device)") }
            }
        }
        return left
    }
}

struct CommandError: Error, CustomStringConvertible {
    var text: String
    var description: String { self.text }
}
