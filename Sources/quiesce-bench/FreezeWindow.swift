import ArgumentParser
import CQuiesceLinux
import Foundation
import Logging
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceWire

/// The freeze window, side by side: the raw floor (FIFREEZE + FICLONE +
/// FITHAW in this process), qemu-guest-agent over its unix socket, and
/// Quiesce (engine here, the real quiesce-agent and its guard as processes,
/// mutual TLS on loopback). Each run: freeze the guest mount, fdatasync and
/// reflink-clone its disk image (which lives on another, unfrozen filesystem,
/// as a provider's disk would), thaw. Prints one JSON line per (load, method).
struct FreezeWindow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "freeze",
        abstract: "Time freeze → clone → thaw windows: raw floor, qemu-guest-agent, Quiesce; idle and with a writer.")

    @Option(help: ArgumentHelp("The guest filesystem's mount point (a loop device on --image). Only it is frozen.", valueName: "dir"))
    var mount: String
    @Option(help: ArgumentHelp("The disk image behind --mount, on a reflink-capable filesystem that is not frozen.", valueName: "path"))
    var image: String
    @Option(help: "Runs per method and load.")
    var runs = 200
    @Option(help: ArgumentHelp("Scratch directory (CA, sockets, logs, clones go next to the image).", valueName: "dir"))
    var work: String
    @Option(help: ArgumentHelp("quiesce-agent to start (its quiesce-thaw-guard next to it).", valueName: "path"))
    var agent: String
    @Option(help: ArgumentHelp("qemu-ga binary; empty skips qemu-guest-agent.", valueName: "path"))
    var qemuGA = "/usr/sbin/qemu-ga"
    @Option(help: ArgumentHelp(
        "A second quiesce-agent (another build, its guard next to it) to time in the same runs, as the row 'quiesce (mTLS) [compare]': an A/B test that this VM's drift between bench runs cannot blur.",
        valueName: "path"))
    var compareAgent: String?
    @Option(help: ArgumentHelp(
        "quiesce-reference-agent (a one-byte freeze agent in C; its quiesce-thaw-guard next to it); empty skips the reference rows. They show what the process hops alone cost here: Quiesce's window minus the 'C agent + guard' row is the price of the engine link (mTLS, HTTP/2, gRPC, protobuf, Swift).",
        valueName: "path"))
    var referenceAgent = ""
    @Option(help: "Loads to measure: idle, busy (a background writer on the guest filesystem), both, or none (only the command round trip).")
    var load = "both"

    struct Sample {
        var windowMs: Double
        var frozenMs: Double
        /// Quiesce only: the agent's syncfs time, for the runs that flushed.
        var syncfsMs: Double = .nan
        var synced = false
        /// Dirty + Writeback (MiB) the agent saw before freezing, when its policy read it (auto).
        var dirtyMiB: Double = .nan
        /// Engine-side round trips and the agent's own time for each command.
        var freezeCallMs: Double = .nan
        var freezeAgentMs: Double = .nan
        var cloneMs: Double = .nan
        var thawCallMs: Double = .nan
        var thawAgentMs: Double = .nan
        /// The FIFREEZE call itself, timed by the thaw guard.
        var fifreezeMs: Double = .nan
    }

    func run() async throws {
        let loads = self.load == "both" ? ["idle", "busy"] : self.load == "none" ? [] : [self.load]
        let clone = (self.image as NSString).deletingLastPathComponent + "/bench-clone.img"
        let mount = self.mount
        let image = self.image
        // The unfrozen pool's image, as a provider would clone it.
        let snapshot: @Sendable () throws -> Void = {
            let source = open(image, O_RDONLY | O_CLOEXEC)
            guard source >= 0 else { throw ValidationError("cannot open \(image): \(String(cString: strerror(errno)))") }
            defer { close(source) }
            fdatasync(source)
            let target = open(clone, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard target >= 0 else { throw ValidationError("cannot create \(clone)") }
            defer { close(target) }
            guard quiesce_ficlone(target, source) == 0 else {
                throw ValidationError("FICLONE \(image) failed: \(String(cString: strerror(errno))) (the pool must support reflink)")
            }
        }

        // Quiesce: an engine here, the agent as its own process.
        var silent = Logger(label: "bench")
        silent.logLevel = .critical
        let ca = CADirectory(path: self.work + "/ca")
        if !ca.exists { try ca.initialize(names: ["localhost"], ipAddresses: ["127.0.0.1"]) }
        let engine = try Engine(
            configuration: EngineConfiguration(
                listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: ca.engineFiles,
                adminSocketPath: self.work + "/admin.sock", limits: .defaults),
            logger: silent)
        let engineTask = Task { try await engine.run() }
        defer { engine.shutdown(); engineTask.cancel() }
        let address = try await engine.listeningAddress()
        // The agent under test, and the one to compare with (if any): the same engine, one session each.
        var agents: [(instance: String, path: String, process: Process)] = []
        defer {
            for agent in agents { kill(agent.process.processIdentifier, SIGTERM); agent.process.waitUntilExit() }  // the agent unblocks SIGTERM itself
        }
        for (instance, path) in [("bench-guest", self.agent)] + (self.compareAgent.map { [("bench-guest-compare", $0)] } ?? []) {
            try ca.issue(.agent(instanceID: instance))
            let files = ca.agentFiles(instanceID: instance)
            let process = try Self.start(path, [
                "run", "--engine", "\(address)", "--cert", files.certificatePath, "--key", files.keyPath, "--ca", files.trustRootsPath,
                "--hook-dir", self.work + "/hooks.d", "--log-level", "warning",
            ], log: self.work + "/\(instance).log")
            agents.append((instance, path, process))
        }
        // A Windows instance on the same filesystem, played by the VSS simulator: its C:\\ is the guest mount.
        do {
            let scenario = self.work + "/vss-scenario.json"
            let volume = #"{"name": "C:\\", "fs_type": "NTFS", "path": "\#(self.mount)"}"#
            try #"{"hostname": "bench-win", "volumes": [\#(volume)], "writers": [{"name": "SqlServerWriter"}, {"name": "Registry Writer"}]}"#
                .write(toFile: scenario, atomically: true, encoding: .utf8)
            try ca.issue(.agent(instanceID: "bench-guest-vss"))
            let files = ca.agentFiles(instanceID: "bench-guest-vss")
            let process = try Self.start(self.agent, [
                "run", "--engine", "\(address)", "--cert", files.certificatePath, "--key", files.keyPath, "--ca", files.trustRootsPath,
                "--vss-simulator", scenario, "--log-level", "warning",
            ], log: self.work + "/bench-guest-vss.log")
            agents.append(("bench-guest-vss", self.agent, process))
        }
        let missing = await engine.registry.waitFor(Set(agents.map(\.instance)), timeout: .seconds(30))
        guard missing.isEmpty else {
            throw ValidationError("\(missing.sorted().joined(separator: ", ")) did not connect; see \(self.work)/<instance>.log")
        }

        // qemu-guest-agent on a unix socket, its state in the scratch directory.
        var qga: QGAClient?
        var qgaProcess: Process?
        // SIGKILL: a child started from here may inherit a blocked SIGTERM.
        defer { if let process = qgaProcess { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() } }
        if !self.qemuGA.isEmpty && FileManager.default.isExecutableFile(atPath: self.qemuGA) {
            try FileManager.default.createDirectory(atPath: self.work + "/qga-state", withIntermediateDirectories: true)
            let socketPath = self.work + "/qga.sock"
            let process = try Self.start(self.qemuGA, [
                "-m", "unix-listen", "-p", socketPath, "-t", self.work + "/qga-state", "-f", self.work + "/qga.pid",
                "-l", self.work + "/qga.log",
            ], log: self.work + "/qga.out")
            qgaProcess = process
            guard let client = try await Self.connect(within: .seconds(5), { try QGAClient(path: socketPath) }) else {
                throw ValidationError("qemu-ga did not open \(socketPath); see \(self.work)/qga.log")
            }
            try client.sync()
            qga = client
        }

        // The reference rows: the same window through a minimal C agent over a
        // unix socket, once freezing in-process, once through the real guard.
        var references: [(name: String, client: ByteClient)] = []
        var referenceProcesses: [Process] = []
        defer { for process in referenceProcesses { kill(process.processIdentifier, SIGTERM); process.waitUntilExit() } }
        if !self.referenceAgent.isEmpty {
            let guardPath = (self.referenceAgent as NSString).deletingLastPathComponent + "/quiesce-thaw-guard"
            for (name, suffix, extra) in [("reference: C agent", "ref", [String]()), ("reference: C agent + guard", "ref-guard", ["--guard", guardPath])] {
                let socketPath = self.work + "/\(suffix).sock"
                let process = try Self.start(self.referenceAgent, ["--socket", socketPath, "--mount", self.mount] + extra,
                                             log: self.work + "/\(suffix).log")
                referenceProcesses.append(process)
                guard let client = try await Self.connect(within: .seconds(5), { try ByteClient(path: socketPath) }) else {
                    throw ValidationError("\(self.referenceAgent) did not open \(socketPath); see \(self.work)/\(suffix).log")
                }
                references.append((name, client))
            }
        }

        // The bare stack's round trip: the same transports and session RPC with
        // none of Quiesce's code on either end (see StackRoundTrip).
        // Then the same probe against the real agent: the agent's share of a command's round trip.
        let peers: [(label: String, instance: String, peer: StackRoundTrip.Peer)] = [
            ("stack round trip", "bench-stack-echo", .init(
                executable: Bundle.main.executablePath ?? CommandLine.arguments[0], arguments: ["stack-echo"],
                environment: ["QUIESCE_EVENT_LOOPS": "1"])),  // one event loop, as quiesce-agent runs
            ("stack round trip, real agent", "bench-stack-agent", .init(
                executable: self.agent, arguments: ["run", "--hook-dir", self.work + "/hooks.d", "--log-level", "warning"], gentle: true)),
        ]
        for (label, instance, peer) in peers {
            let stack = try await StackRoundTrip.measure(
                ca: ca, peer: peer, instance: instance, work: self.work, runs: max(self.runs, 20), idle: .milliseconds(3))
            Self.report(load: "idle", method: label, samples: stack.warm.map { Sample(windowMs: $0.ms, frozenMs: .nan) })
            Self.report(load: "idle", method: label + " after 3 ms idle", samples: stack.afterIdle.map { Sample(windowMs: $0.ms, frozenMs: .nan) })
        }

        // The bare command round trip (no filesystem work): freeze status, back to
        // back, and after 3 ms of quiet (as a thaw follows a freeze: both ends asleep).
        for (method, pause) in [("command round trip", Duration.zero), ("command round trip after 3 ms idle", .milliseconds(3))] {
            var statusSamples: [Sample] = []
            for _ in 0..<max(self.runs, 20) {
                if pause > .zero { try await Task.sleep(for: pause) }
                let t0 = ContinuousClock.now
                let reply = try await engine.freezeStatus(of: "bench-guest")
                statusSamples.append(Sample(windowMs: (ContinuousClock.now - t0).ms, frozenMs: .nan, freezeAgentMs: reply.elapsed.ms))
            }
            Self.report(load: "idle", method: method, samples: statusSamples)
        }

        for load in loads {
            let writer = load == "busy" ? try Self.start("/bin/bash", ["-c", """
                i=0; while :; do dd if=/dev/zero of='\(mount)/bench-writer.dat' bs=1M count=4 seek=$(( (i % 64) * 4 )) conv=notrunc status=none; i=$((i+1)); sleep 0.005; done
                """], log: "/dev/null") : nil
            defer { if let writer { kill(writer.processIdentifier, SIGKILL); writer.waitUntilExit() } }
            if writer != nil { try await Task.sleep(for: .milliseconds(500)) }

            // The methods take turns run by run, in a new random order each run
            // (fixed seed: the same order every time the bench runs), so whatever
            // drifts over a row (the writer's file, the pool's extents after hundreds
            // of clones, page cache) and whatever a method inherits from the one
            // before it (a process that just ran, caches it left) weigh on all
            // alike. One descriptor for the floor, opened before anything is frozen.
            let fd = open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw ValidationError("cannot open \(mount)") }
            defer { close(fd) }
            // One untimed freeze and thaw first: the writer has written alone for
            // 0.5 s (100+ MiB dirty), and whichever method ran first would flush it
            // all — a transient that lands on one row only (on the floor it read
            // 640 ms, on Quiesce's auto row 1.1-1.6 s). Every timed run then starts
            // from the same steady state. (The burst case is measured on its own;
            // see SyncfsRule.)
            try await DedicatedThread.run(name: "bench-settle") {
                guard quiesce_fifreeze(fd) == 0 else { throw ValidationError("FIFREEZE \(mount): \(String(cString: strerror(errno)))") }
                quiesce_fithaw(fd)
            }
            var methods: [(name: String, sample: (Int) async throws -> Sample)] = []
            methods.append(("raw floor", { _ in
                try await DedicatedThread.run(name: "bench-floor") {
                    let window = try Self.timeWindow(
                        freeze: { guard quiesce_fifreeze(fd) == 0 else { throw ValidationError("FIFREEZE \(mount): \(String(cString: strerror(errno)))") } },
                        snapshot: snapshot, thaw: { quiesce_fithaw(fd) })
                    // Frozen from the FIFREEZE call on, as the guard counts it.
                    return Sample(windowMs: window.ms, frozenMs: window.ms)
                }
            }))
            if let client = qga {
                methods.append(("qemu-guest-agent", { _ in
                    try await DedicatedThread.run(name: "bench-qga") {
                        let window = try Self.timeWindow(
                            freeze: {
                                let frozen = try client.call(#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["\#(mount)"]}}"#)
                                guard frozen == "1" else {
                                    _ = try? client.call(#"{"execute":"guest-fsfreeze-thaw"}"#)
                                    throw ValidationError("qemu-ga froze \(frozen) filesystems, expected 1")
                                }
                            },
                            snapshot: snapshot,
                            thaw: {
                                let thawed = try client.call(#"{"execute":"guest-fsfreeze-thaw"}"#)
                                guard thawed == "1" else { throw ValidationError("qemu-ga thawed \(thawed) filesystems, expected 1") }
                            })
                        return Sample(windowMs: window.ms, frozenMs: .nan)
                    }
                }))
            }
            let work = self.work
            for (name, client) in references {
                methods.append((name, { _ in
                    try await DedicatedThread.run(name: "bench-reference") {
                        let window = try Self.timeWindow(
                            freeze: {
                                guard try client.call(UInt8(ascii: "F")) == UInt8(ascii: "F") else {
                                    throw ValidationError("\(name) could not freeze \(mount); see its log in \(work)")
                                }
                            },
                            snapshot: snapshot,
                            thaw: { guard try client.call(UInt8(ascii: "T")) == UInt8(ascii: "T") else { throw ValidationError("\(name) could not thaw \(mount)") } })
                        return Sample(windowMs: window.ms, frozenMs: .nan)
                    }
                }))
            }
            // The agent's default (syncfs when much is dirty), the two fixed policies, and the agent to compare with.
            var quiesceRows: [(name: String, instance: String, policy: Quiesce_Agent_V1_SyncfsPolicy)] = [
                ("quiesce (mTLS)", "bench-guest", .unspecified), ("quiesce, syncfs always", "bench-guest", .always),
                ("quiesce, no syncfs", "bench-guest", .never),
            ]
            if self.compareAgent != nil { quiesceRows.append(("quiesce (mTLS) [compare]", "bench-guest-compare", .unspecified)) }
            for (name, instance, policy) in quiesceRows {
                methods.append((name, { run in
                    var request = Quiesce_Agent_V1_FreezeRequest()
                    request.freezeID = "bench-\(load)-\(instance)-\(policy.rawValue)-\(run)"
                    request.mountPoints = [mount]
                    request.syncfs = policy
                    let t0 = ContinuousClock.now
                    let frozen = try await engine.freeze(request, on: instance)
                    let tFrozen = ContinuousClock.now
                    guard frozen.isOK, let result = frozen.payload else { throw ValidationError("freeze failed (\(instance)): \(frozen.status.message)") }
                    let cloned = Result { try snapshot() }
                    let tCloned = ContinuousClock.now
                    let thawed = try await engine.thaw(request.freezeID, on: instance)
                    let t1 = ContinuousClock.now
                    try cloned.get()
                    guard thawed.isOK, let proof = thawed.payload, proof.cause == .command else {
                        throw ValidationError("thaw did not prove the freeze: \(thawed.status.message) \(String(describing: thawed.payload?.cause))")
                    }
                    return Sample(
                        windowMs: (t1 - t0).ms, frozenMs: Double(proof.frozenUs) / 1000,
                        syncfsMs: result.synced ? Double(result.mounts.first?.syncfsUs ?? 0) / 1000 : .nan, synced: result.synced,
                        // Read only under auto: the agent's default (unspecified; the bench's agent runs with it) or asked for.
                        dirtyMiB: policy == .unspecified || policy == .auto ? Double(result.dirtyKib) / 1024 : .nan,
                        freezeCallMs: (tFrozen - t0).ms, freezeAgentMs: frozen.elapsed.ms, cloneMs: (tCloned - tFrozen).ms,
                        thawCallMs: (t1 - tCloned).ms, thawAgentMs: thawed.elapsed.ms,
                        fifreezeMs: Double(result.mounts.first?.freezeUs ?? 0) / 1000)
                }))
            }
            // Windows, simulated: a VSS set with two writers; its hold is the same FIFREEZE through the same kind of guard.
            methods.append(("quiesce VSS (simulated)", { run in
                var request = Quiesce_Agent_V1_VssFreezeRequest()
                request.freezeID = "bench-vss-\(load)-\(run)"
                request.volumes = ["C:\\"]
                request.includeWriters = true
                let t0 = ContinuousClock.now
                let held = try await engine.vssFreeze(request, on: "bench-guest-vss")
                let tFrozen = ContinuousClock.now
                guard held.isOK, let result = held.payload, result.allHeld else { throw ValidationError("vss-freeze failed: \(held.status.message)") }
                let cloned = Result { try snapshot() }
                let tCloned = ContinuousClock.now
                let thawed = try await engine.vssThaw(request.freezeID, on: "bench-guest-vss")
                let t1 = ContinuousClock.now
                try cloned.get()
                guard thawed.isOK, let proof = thawed.payload, proof.writesHeld, proof.writers.allSatisfy({ $0.state == "STABLE" }) else {
                    throw ValidationError("the VSS thaw did not prove the set: \(thawed.status.message) \(String(describing: thawed.payload?.error))")
                }
                return Sample(
                    windowMs: (t1 - t0).ms, frozenMs: Double(proof.thaw.frozenUs) / 1000,
                    freezeCallMs: (tFrozen - t0).ms, freezeAgentMs: held.elapsed.ms, cloneMs: (tCloned - tFrozen).ms,
                    thawCallMs: (t1 - tCloned).ms, thawAgentMs: thawed.elapsed.ms,
                    fifreezeMs: Double(result.volumes.first?.freezeUs ?? 0) / 1000)
            }))
            var samples = Array(repeating: [Sample](), count: methods.count)
            var order = SeededGenerator(seed: load == "idle" ? 1 : 2)
            for run in 0..<self.runs {
                for index in methods.indices.shuffled(using: &order) {
                    samples[index].append(try await methods[index].sample(run))
                    unlink(clone)
                    try await Task.sleep(for: .milliseconds(2))
                }
            }
            for (method, samples) in zip(methods, samples) { Self.report(load: load, method: method.name, samples: samples) }
        }
    }

    /// One window, timed from the freeze call to the thaw's answer: the thaw
    /// runs even when the snapshot failed, whose error is thrown after it.
    static func timeWindow(freeze: () throws -> Void, snapshot: () throws -> Void, thaw: () throws -> Void) throws -> Duration {
        let t0 = ContinuousClock.now
        try freeze()
        let cloned = Result { try snapshot() }
        try thaw()
        let window = ContinuousClock.now - t0
        try cloned.get()
        return window
    }

    /// Connects to a socket a process just started will open: nil if it has not within `limit`.
    static func connect<Client>(within limit: Duration, _ make: () throws -> Client) async throws -> Client? {
        let deadline = ContinuousClock.now + limit
        while true {
            if let client = try? make() { return client }
            if ContinuousClock.now >= deadline { return nil }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Starts `path` with its output in `log`; `environment` is added to this process's.
    static func start(_ path: String, _ arguments: [String], log: String, environment: [String: String] = [:]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        // open(2), not FileManager.createFile: that one writes a new file and renames it over the
        // path, which for "/dev/null" replaced the device with a regular file (root, 0644) — and
        // every non-root program on the machine then failed to write to it.
        let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        return process
    }

    static func report(load: String, method: String, samples: [Sample]) {
        func stats(_ values: [Double]) -> [String: Double] {
            let sorted = values.filter { !$0.isNaN }.sorted()
            guard !sorted.isEmpty else { return [:] }
            func at(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int((Double(sorted.count - 1) * p).rounded()))] }
            return ["p50": at(0.5), "p99": at(0.99), "max": sorted.last!]
        }
        let line: [String: Any] = [
            "load": load, "method": method, "runs": samples.count,
            "window_ms": stats(samples.map(\.windowMs)), "frozen_ms": stats(samples.map(\.frozenMs)),
            "syncfs_ms": stats(samples.map(\.syncfsMs)),
            "synced_runs": samples.filter(\.synced).count,
            "dirty_mib": stats(samples.map(\.dirtyMiB)),
            "breakdown_p50_ms": [
                "freeze_call": stats(samples.map(\.freezeCallMs))["p50"] ?? .nan, "freeze_agent": stats(samples.map(\.freezeAgentMs))["p50"] ?? .nan,
                "clone": stats(samples.map(\.cloneMs))["p50"] ?? .nan, "thaw_call": stats(samples.map(\.thawCallMs))["p50"] ?? .nan,
                "thaw_agent": stats(samples.map(\.thawAgentMs))["p50"] ?? .nan,
                "fifreeze": stats(samples.map(\.fifreezeMs))["p50"] ?? .nan,
            ].filter { !$0.value.isNaN },
            // Where the tail comes from: the slowest 2% of runs (by window), each part averaged over them.
            "breakdown_slowest_ms": { () -> [String: Double] in
                let slowest = samples.sorted { $0.windowMs > $1.windowMs }.prefix(max(1, samples.count / 50))
                func mean(_ part: KeyPath<Sample, Double>) -> Double { slowest.map { $0[keyPath: part] }.reduce(0, +) / Double(slowest.count) }
                return [
                    "runs": Double(slowest.count), "window": mean(\.windowMs), "freeze_call": mean(\.freezeCallMs),
                    "freeze_agent": mean(\.freezeAgentMs), "fifreeze": mean(\.fifreezeMs), "clone": mean(\.cloneMs),
                    "thaw_call": mean(\.thawCallMs), "thaw_agent": mean(\.thawAgentMs),
                ].filter { !$0.value.isNaN }
            }(),
        ]
        if let data = try? JSONSerialization.data(withJSONObject: line, options: [.sortedKeys]) {
            FileHandle.standardOutput.write(data + Data("\n".utf8))
        }
    }
}

extension Duration {
    var ms: Double { Double(self.nanoseconds) / 1_000_000 }
}

/// A connected unix stream socket (blocking), or an error naming the path.
private func connectUnix(_ path: String) throws -> Int32 {
    let fd = UnixSocket.connect(path)
    guard fd >= 0 else { throw ValidationError("cannot connect to \(path)") }
    return fd
}

/// quiesce-reference-agent's protocol: one byte each way.
final class ByteClient: @unchecked Sendable {
    private let fd: Int32

    init(path: String) throws { self.fd = try connectUnix(path) }

    deinit { close(self.fd) }

    func call(_ request: UInt8) throws -> UInt8 {
        var byte = request
        guard write(self.fd, &byte, 1) == 1 else { throw ValidationError("the reference agent closed its socket") }
        guard read(self.fd, &byte, 1) == 1 else { throw ValidationError("the reference agent closed its socket") }
        return byte
    }
}

/// A minimal QMP-style client for qemu-ga: one JSON command per line, one reply per line.
final class QGAClient: @unchecked Sendable {
    private let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String) throws { self.fd = try connectUnix(path) }

    deinit { close(self.fd) }

    /// Sends a command and returns the JSON text of its "return" value.
    func call(_ json: String) throws -> String {
        let bytes = Array((json + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(self.fd, $0.baseAddress, $0.count) }
        let line = try self.readLine()
        guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw ValidationError("qemu-ga sent \(line)")
        }
        if let error = object["error"] { throw ValidationError("qemu-ga error: \(error)") }
        guard let value = object["return"] else { throw ValidationError("qemu-ga sent \(line)") }
        return "\(value)"
    }

    /// guest-sync-delimited: the reply comes after a 0xFF byte, which ends anything stale.
    func sync() throws {
        let id = Int.random(in: 1...1_000_000)
        let got = try self.call(#"{"execute":"guest-sync-delimited","arguments":{"id":\#(id)}}"#)
        guard got == "\(id)" else { throw ValidationError("qemu-ga guest-sync answered \(got), expected \(id)") }
    }

    private func readLine() throws -> String {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let newline = self.buffer.firstIndex(of: UInt8(ascii: "\n")) {
                var line = Array(self.buffer[..<newline])
                self.buffer.removeFirst(newline + 1)
                line.removeAll { $0 == 0xFF }
                if line.isEmpty { continue }
                return String(decoding: line, as: UTF8.self)
            }
            let n = chunk.withUnsafeMutableBytes { read(self.fd, $0.baseAddress, $0.count) }
            guard n > 0 else { throw ValidationError("qemu-ga closed the connection") }
            self.buffer.append(contentsOf: chunk[0..<n])
        }
    }
}
