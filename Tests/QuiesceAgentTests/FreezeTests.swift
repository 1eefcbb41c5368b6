import Foundation
import QuiesceAgent
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Synchronization
import Testing

/// Freezes real ext4 and XFS filesystems on loop devices made by the test,
/// through the agent's real thaw guard process. `LoopDevices.cleanUp` thaws
/// and unmounts everything, also when an expectation fails.
@Suite("Freeze and thaw", .enabled(if: getuid() == 0, "needs root for loop devices and FIFREEZE"), .serialized)
struct FreezeTests {
    @Test("ext4 and XFS: a write from another process blocks while frozen and completes after the thaw; the thaw reply proves it")
    func freezeBlocksWrites() async throws {
        try await withLoopDevices { loops in
            let ext4 = try await blocking { try loops.mount("ext4", fsType: "ext4", sizeMiB: 64).mountPoint }
            let xfs = try await blocking { try loops.mount("xfs", fsType: "xfs", sizeMiB: 300).mountPoint }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            #expect(agent.handler.freezer.guardReady)
            agent.startHeartbeats()

            let frozen = await agent.freeze("f1", [xfs, ext4])
            #expect(frozen.status.isOK, "\(frozen.status.message)")
            #expect(frozen.freeze.allFrozen && frozen.freeze.mounts.map(\.mountPoint) == [xfs, ext4])
            #expect(frozen.freeze.mounts.allSatisfy { $0.frozen })
            #expect(frozen.freeze.budgetMs == 10_000)

            let writers = try [Writer(ext4 + "/a"), Writer(xfs + "/b")]
            try await Task.sleep(for: .milliseconds(300))
            for writer in writers { #expect(writer.isRunning, "a write completed on a frozen filesystem") }
            let status = await agent.perform(.freezeStatus(.init()))
            #expect(status.freezeStatus.frozen && status.freezeStatus.freezeID == "f1")

            let thawed = await agent.thaw("f1")
            #expect(thawed.status.isOK)
            #expect(thawed.thaw.cause == .command && thawed.thaw.freezeID == "f1" && thawed.thaw.withinBudget)
            #expect(thawed.thaw.frozenUs >= 300_000 && thawed.thaw.frozenUs < 5_000_000)
            #expect(thawed.thaw.mounts.allSatisfy { $0.thawed })
            for writer in writers { #expect(await writer.finished(within: .seconds(5)) != nil, "the write did not complete after the thaw") }
            #expect(try String(contentsOfFile: ext4 + "/a", encoding: .utf8) == "written\n")
            // A thaw of a finished freeze says how it ended; an unknown one is NOT_FOUND.
            let again = await agent.thaw("f1")
            #expect(again.status.isOK && again.thaw.cause == .command)
            let unknown = await agent.thaw("nope")
            #expect(unknown.status.reason == "unknown-freeze")
            #expect(agent.events.all.isEmpty)
        }
    }

    @Test("EBUSY from a second freezer downgrades the attempt and never thaws the first owner's freeze")
    func ebusy() async throws {
        try await withLoopDevices { loops in
            let mine = try await blocking { try loops.mount("mine", fsType: "ext4", sizeMiB: 64).mountPoint }
            let theirs = try await blocking { try loops.mount("theirs", fsType: "xfs", sizeMiB: 300).mountPoint }
            // Another owner (util-linux fsfreeze) holds a freeze on `theirs`.
            try await run("fsfreeze", "--freeze", theirs)
            defer { _ = try? run("fsfreeze", "--unfreeze", theirs) }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()

            let result = await agent.freeze("f2", [mine, theirs])
            #expect(!result.status.isOK)
            #expect(result.status.reason == "freeze-ebusy")
            #expect(result.status.message.contains(theirs) && result.status.message.contains("another owner"))
            #expect(!result.freeze.allFrozen)
            #expect(result.freeze.mounts.first { $0.mountPoint == theirs }?.reason == "freeze-ebusy")
            // Ours was thawed again (all or nothing) ...
            #expect(try await Writer(mine + "/x").finished(within: .seconds(3)) != nil)
            // ... and theirs is still frozen: nothing of the other owner's was thawed.
            let blocked = try Writer(theirs + "/y")
            #expect(await blocked.finished(within: .milliseconds(300)) == nil)
            try await run("fsfreeze", "--unfreeze", theirs)
            #expect(await blocked.finished(within: .seconds(3)) != nil)
            #expect(!agent.handler.freezer.isFrozen)
        }
    }

    @Test("syncfs: auto flushes first when much is dirty and says why; below its threshold FIFREEZE flushes alone; the request can fix it")
    func syncfsPolicy() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 128).mountPoint }
            let agent = await AgentHarness(directory: loops.directory, syncfs: SyncfsRule(mode: .auto, minDirtyBytes: 32 << 20))
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            // The agent's facts carry its rule.
            let facts = await agent.perform(.facts(.init())).facts
            #expect(facts.syncfs == .auto && facts.syncfsMinDirtyBytes == 32 << 20)
            #expect(facts.freezeSummary == "thaw guard ready; syncfs before FIFREEZE: auto (when 32 MiB or more of the page cache is dirty)")
            // 48 MiB written and not synced: at least that much of the page cache is dirty (writeback waits 30 s).
            try await blocking {
                let chunk = Data(repeating: 0x5a, count: 1 << 20)
                guard FileManager.default.createFile(atPath: mount + "/dirty.bin", contents: nil) else { throw CocoaError(.fileWriteUnknown) }
                let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: mount + "/dirty.bin"))
                for _ in 0..<48 { try handle.write(contentsOf: chunk) }
                try handle.close()
            }
            let flushed = await agent.freeze("s1", [mount])
            #expect(flushed.status.isOK, "\(flushed.status.message)")
            #expect(flushed.freeze.synced && flushed.freeze.dirtyKib >= 48 << 10, "\(flushed.freeze.syncfsReason)")
            #expect(flushed.freeze.syncfsReason.hasPrefix("auto: ") && flushed.freeze.syncfsReason.hasSuffix(" dirty >= 32 MiB"))
            #expect(flushed.freeze.mounts.first?.syncfsUs ?? 0 > 0)
            #expect(await agent.thaw("s1").thaw.cause == .command)

            // The same rule with a threshold nothing reaches: no syncfs, and the reply says what it saw.
            let lax = await AgentHarness(directory: loops.directory + "/lax", syncfs: SyncfsRule(mode: .auto, minDirtyBytes: 1 << 50))
            defer { Task { await lax.close() } }
            lax.startHeartbeats()
            let skipped = await lax.freeze("s2", [mount])
            #expect(skipped.status.isOK && !skipped.freeze.synced && skipped.freeze.mounts.first?.syncfsUs == 0)
            #expect(skipped.freeze.syncfsReason.hasSuffix("dirty < 1073741824 MiB; FIFREEZE flushes it"), "\(skipped.freeze.syncfsReason)")
            #expect(await lax.thaw("s2").thaw.cause == .command)

            // The engine's choice wins over the agent's rule.
            let always = await lax.freeze("s3", [mount], syncfs: .always)
            #expect(always.freeze.synced && always.freeze.syncfsReason == "always (the engine asked)" && always.freeze.dirtyKib == 0)
            #expect(await lax.thaw("s3").status.isOK)
            let never = await agent.freeze("s4", [mount], syncfs: .never)
            #expect(!never.freeze.synced && never.freeze.syncfsReason == "never (the engine asked)")
            #expect(await agent.thaw("s4").status.isOK)
        }
    }

    @Test("the budget runs out: the guard thaws, the agent reports an event, and the thaw reply says budget")
    func budget() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 64).mountPoint }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            let began = ContinuousClock.now
            let frozen = await agent.freeze("f3", [mount], budgetMs: 400)
            #expect(frozen.status.isOK && frozen.freeze.budgetMs == 400)
            let writer = try Writer(mount + "/x")
            let done = await writer.finished(within: .seconds(3))
            #expect(done != nil)
            // Not before the budget; the upper bound only tells "thawed by the budget" from "never" on a loaded machine.
            if let done { #expect(done - began >= .milliseconds(400) && done - began < .seconds(2), "thawed \(done - began) after the freeze began") }
            #expect(try await !agent.statusOnceThawed().freezeStatus.frozen, "still recorded as frozen 1 s after the write went through")
            let thawed = await agent.thaw("f3")
            #expect(thawed.status.isOK)
            #expect(thawed.thaw.cause == .budget)
            #expect(thawed.thaw.frozenUs >= 400_000 && thawed.thaw.frozenUs < 600_000, "\(thawed.thaw.frozenUs)")
            #expect(await agent.event { $0.kind == .thawed && $0.freezeID == "f3" && $0.thaw.cause == .budget })
        }
    }

    @Test("without engine heartbeats the agent thaws after 1 s and says the engine fell silent")
    func engineSilent() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "xfs", sizeMiB: 300).mountPoint }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.handler.engineHeard()
            let began = ContinuousClock.now
            let frozen = await agent.freeze("f4", [mount])
            #expect(frozen.status.isOK)
            let writer = try Writer(mount + "/x")
            let done = await writer.finished(within: .seconds(4))
            #expect(done != nil)
            if let done {
                // Silence is counted from the freeze; the write cannot finish before the thaw.
                let after = done - began
                #expect(after > .milliseconds(900) && after < .milliseconds(2000), "thawed \(after) after the freeze began")
            }
            let status = try await agent.statusOnceThawed()
            #expect(!status.freezeStatus.frozen, "still recorded as frozen 1 s after the write went through")
            #expect(status.freezeStatus.lastThaw.cause == .engineSilent)
            #expect(await agent.event { $0.kind == .thawed && $0.thaw.cause == .engineSilent })
        }
    }

    @Test("stacked filesystems: an ext4 image on another frozen ext4 is frozen first (no deadlock) and thawed last")
    func stacked() async throws {
        try await withLoopDevices { loops in
            let lower = try await blocking { try loops.mount("lower", fsType: "ext4", sizeMiB: 96).mountPoint }
            let upper = try await blocking { () -> String in
                try run("truncate", "-s", "32M", lower + "/upper.img")
                try run("mkfs.ext4", "-q", "-F", lower + "/upper.img")
                return try loops.mountDevice(try loops.attach(lower + "/upper.img"), at: "upper")
            }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            // If the order were wrong the guard would block in FIFREEZE(upper) behind the frozen
            // lower filesystem; the watchdog thaws it so a failure cannot hang the suite.
            let done = Mutex(false)
            let watchdog = Task.detached {
                try await Task.sleep(for: .seconds(15))
                if !done.withLock({ $0 }) { _ = try? await run("fsfreeze", "--unfreeze", lower) }
            }
            defer { watchdog.cancel() }
            let began = ContinuousClock.now
            // Requested bottom-up on purpose.
            let frozen = await agent.freeze("s1", [lower, upper])
            done.withLock { $0 = true }
            #expect(frozen.status.isOK, "\(frozen.status.message)")
            #expect(ContinuousClock.now - began < .seconds(10))
            #expect(frozen.freeze.mounts.map(\.mountPoint) == [upper, lower])
            let writers = try [Writer(upper + "/a"), Writer(lower + "/b")]
            try await Task.sleep(for: .milliseconds(200))
            for writer in writers { #expect(writer.isRunning, "a write completed on a frozen filesystem") }
            let thawed = await agent.thaw("s1")
            #expect(thawed.status.isOK && thawed.thaw.cause == .command)
            #expect(thawed.thaw.mounts.allSatisfy { $0.thawed })
            for writer in writers { #expect(await writer.finished(within: .seconds(5)) != nil, "the write did not complete after the thaw") }
        }
    }

    @Test("the agent refuses to freeze without its guard, a second freeze, a non-mount and the same filesystem twice")
    func refusals() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 64).mountPoint }
            let bind = try await blocking { try loops.bind(mount, at: "bind") }
            let unguarded = await AgentHarness(directory: loops.directory, guardExecutable: loops.directory + "/no-such-guard")
            let noGuard = await unguarded.freeze("g", [mount])
            #expect(noGuard.status.reason == "guard-missing")
            #expect(noGuard.status.message.contains("no-such-guard"))
            await unguarded.close()

            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            #expect(await agent.freeze("g", [loops.directory]).status.reason == "not-a-mount")
            #expect(await agent.freeze("g", [mount, bind]).status.reason == "same-filesystem")
            #expect(await agent.freeze("bad id", [mount]).status.reason == "bad-request")
            #expect(await agent.freeze("g1", [mount]).status.isOK)
            let second = await agent.freeze("g2", [mount])
            #expect(second.status.reason == "already-frozen" && second.status.message.contains("g1"))
            // Nothing starts from disk while frozen.
            var hook = Quiesce_Agent_V1_RunHookRequest()
            hook.hook.seed = .prescript
            #expect(await agent.perform(.runHook(hook)).status.reason == "frozen")
            #expect(await agent.thaw("g1").thaw.cause == .command)
        }
    }

    @Test("a guard whose answer is unreadable: the freeze fails at once, quoting it, and the agent is not left busy")
    func unreadableGuard() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 64).mountPoint }
            // A guard of "another version": READY as it should, then an answer to
            // FREEZE that is not the protocol (it freezes nothing). It logs what it
            // was asked, so the test can see the agent's request to release the id.
            let fake = loops.directory + "/garbled-guard"
            let asked = loops.directory + "/garbled-guard.log"
            try writeExecutable(fake, """
                #!/usr/bin/env python3
                import os, socket, sys
                s = socket.socket(fileno=int(sys.argv[1]))
                s.send(f"READY {os.getpid()} 1 1".encode())
                with open("\(asked)", "a", buffering=1) as log:
                    while True:
                        data, fds, _, _ = socket.recv_fds(s, 16384, 8)
                        for fd in fds: os.close(fd)
                        if not data: break
                        log.write(data.decode().split()[0] + " " + data.decode().split()[1] + "\\n")
                        if data.startswith(b"FREEZE"): s.send(b"FROZEN as you like it")
                """, mode: 0o755)
            let agent = await AgentHarness(directory: loops.directory, guardExecutable: fake)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            let answer = await within(.seconds(10)) { await agent.freeze("u1", [mount]) }
            let first = try #require(answer, "the freeze waited for an answer that never comes")
            #expect(first.status.reason == "guard-protocol")
            #expect(first.status.message.contains("FROZEN as you like it"), "\(first.status.message)")
            #expect(!first.freeze.allFrozen)
            // Not stuck: the next freeze is handled (and fails the same way), not refused as busy.
            let second = await agent.freeze("u2", [mount])
            #expect(second.status.reason == "guard-protocol")
            // Nothing was frozen: a write goes through.
            let writer = try Writer(mount + "/x")
            #expect(await writer.finished(within: .seconds(5)) != nil)
            // The agent asked the guard to release whatever it froze for each id.
            var log = ""
            for _ in 0..<100 where !log.contains("THAW u2") {
                log = (try? String(contentsOfFile: asked, encoding: .utf8)) ?? ""
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(log == "FREEZE u1\nTHAW u1\nFREEZE u2\nTHAW u2\n", "\(log)")
        }
    }

    @Test("the guard killed while frozen: the agent thaws with its own descriptors and starts a new guard")
    func guardLost() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 64).mountPoint }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            #expect(await agent.freeze("h1", [mount]).status.isOK)
            let guardPID = try #require(agent.handler.freezer.guardPID)
            let writer = try Writer(mount + "/x")
            kill(guardPID, SIGKILL)
            #expect(await writer.finished(within: .seconds(3)) != nil)
            let status = try await agent.statusOnceThawed()
            #expect(status.freezeStatus.lastThaw.cause == .guard)
            #expect(await agent.event { $0.kind == .guardLost })
            for _ in 0..<100 where agent.handler.freezer.guardPID == nil || agent.handler.freezer.guardPID == guardPID {
                try await Task.sleep(for: .milliseconds(20))
            }
            let replacement = try #require(agent.handler.freezer.guardPID)
            #expect(replacement != guardPID)
            #expect(await agent.freeze("h2", [mount]).status.isOK)
            #expect(await agent.thaw("h2").thaw.cause == .command)
        }
    }

    @Test("holds: ready on their line, alive at thaw, released with their children; one that dies early is reported")
    func holds() async throws {
        try await withLoopDevices { loops in
            let mount = try await blocking { try loops.mount("fs", fsType: "ext4", sizeMiB: 64).mountPoint }
            let agent = await AgentHarness(directory: loops.directory)
            defer { Task { await agent.close() } }
            agent.startHeartbeats()
            let hooks = loops.directory + "/hooks.d"
            try writeScript(hooks + "/lock", mode: 0o700, body: """
                #!/bin/sh
                sleep 600 &
                echo $! > '\(loops.directory)/lock-child'
                echo "locking tables"
                echo LOCKED
                wait
                """)
            try writeScript(hooks + "/fragile", mode: 0o700, body: "#!/bin/sh\necho LOCKED\nsleep 0.2\nexit 3\n")
            func hold(_ id: String, _ name: String) -> Quiesce_Agent_V1_HoldRequest {
                var request = Quiesce_Agent_V1_HoldRequest()
                request.holdID = id
                request.hook.name = name
                request.readyLine = "LOCKED"
                request.readyTimeoutMs = 5000
                return request
            }
            let lock = await agent.perform(.hold(hold("db", "lock")))
            #expect(lock.status.isOK && lock.hold.ready, "\(lock.status.message)")
            let fragile = await agent.perform(.hold(hold("weak", "fragile")))
            #expect(fragile.status.isOK && fragile.hold.ready)
            #expect(await agent.perform(.hold(hold("db", "lock"))).status.reason == "hold-exists")

            #expect(await agent.freeze("k1", [mount]).status.isOK)
            // The fragile hold exits 0.2 s after its ready line, while frozen: reported at once.
            #expect(await agent.event(within: .seconds(3)) { $0.kind == .holdDied && $0.message.contains("weak") && $0.message.contains("exit code 3") })
            let thawed = await agent.thaw("k1")
            #expect(thawed.thaw.cause == .command)
            let states = Dictionary(uniqueKeysWithValues: thawed.thaw.holds.map { ($0.holdID, $0.aliveAtThaw) })
            #expect(states == ["db": true, "weak": false])

            var release = Quiesce_Agent_V1_ReleaseRequest()
            release.holdID = "db"
            let released = await agent.perform(.release(release))
            #expect(released.status.isOK && released.release.aliveAtRelease)
            #expect(String(decoding: released.release.outputTail, as: UTF8.self).contains("locking tables"))
            let child = Int32(try String(contentsOfFile: loops.directory + "/lock-child", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
            #expect(!processExists(child), "the hold's child survived its release")
            release.holdID = "weak"
            let weak = await agent.perform(.release(release))
            #expect(weak.status.isOK && !weak.release.aliveAtRelease && weak.release.exited && weak.release.exitCode == 3)

            // A hold that never prints its line is killed at its ready timeout; a refused hook says why.
            try writeScript(hooks + "/mute", mode: 0o700, body: "#!/bin/sh\nsleep 600\n")
            var mute = hold("mute", "mute")
            mute.readyTimeoutMs = 300
            #expect(await agent.perform(.hold(mute)).status.reason == "hold-not-ready")
            try writeScript(hooks + "/open", mode: 0o755, body: "#!/bin/sh\necho LOCKED\n")
            let refused = await agent.perform(.hold(hold("open", "open")))
            #expect(refused.status.reason == "hook-wrong-mode" && refused.hold.refusal == .wrongMode)
        }
    }
}
