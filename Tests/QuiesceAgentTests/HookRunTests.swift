import Foundation
import QuiesceAgent
import QuiesceProto
import QuiesceTestSupport
import Testing

@Suite("Running hooks", .enabled(if: getuid() == 0, "needs root: hooks must be root-owned"), .serialized)
struct HookRunTests {
    let directory: String

    init() throws {
        self.directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-hookrun-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: self.directory + "/hooks.d", withIntermediateDirectories: true)
    }

    var runner: HookRunner {
        HookRunner(locations: HookLocations(prescript: directory + "/prescript.sh", postscript: directory + "/postscript.sh", hookDirectory: directory + "/hooks.d"))
    }

    func request(_ name: String, args: [String] = [], timeoutMs: UInt32 = 5000, pin: String = "", cap: UInt32 = 0) -> Quiesce_Agent_V1_RunHookRequest {
        var request = Quiesce_Agent_V1_RunHookRequest()
        switch name {
        case "prescript": request.hook.seed = .prescript
        case "postscript": request.hook.seed = .postscript
        default: request.hook.name = name
        }
        request.hook.sha256 = pin
        request.args = args
        request.timeoutMs = timeoutMs
        request.outputCapBytes = cap
        return request
    }

    @Test("a valid prescript runs from its descriptor: exit code, arguments, both output tails, hash")
    func runs() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let path = try writeScript(self.directory + "/prescript.sh", mode: 0o700, body: """
            #!/bin/sh
            echo "args: $*"
            echo "hook=$QUIESCE_HOOK" >&2
            exit 7
            """)
        let result = await self.runner.run(self.request("prescript", args: ["a b", "c"], pin: try sha256sum(path)))
        #expect(result.ran && result.refusal == .none)
        #expect(result.exited && result.exitCode == 7 && result.signal == 0 && !result.timedOut)
        #expect(String(decoding: result.stdoutTail, as: UTF8.self) == "args: a b c\n")
        #expect(String(decoding: result.stderrTail, as: UTF8.self) == "hook=prescript\n")
        await #expect(result.sha256 == (try sha256sum(path)))
        #expect(result.durationUs > 0)
    }

    @Test("output beyond the cap keeps the tail and says it was truncated")
    func outputCap() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        try writeScript(self.directory + "/hooks.d/chatty", mode: 0o700, body: "#!/bin/sh\nseq 1 20000\n")
        let result = await self.runner.run(self.request("chatty", cap: 100))
        #expect(result.exited && result.exitCode == 0)
        #expect(result.stdoutTail.count == 100)
        #expect(result.outputTruncated)
        #expect(String(decoding: result.stdoutTail, as: UTF8.self).hasSuffix("19999\n20000\n"))
    }

    @Test("mode 0755, a non-root owner, a symlink, changed content after pinning, a missing file and a path-like name do not run, with the reason")
    func refusals() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let marker = self.directory + "/ran"
        let body = "#!/bin/sh\ntouch '\(marker)'\n"
        let good = try writeScript(self.directory + "/hooks.d/good", mode: 0o700, body: body)
        let pinned = try await sha256sum(good)
        try writeScript(self.directory + "/hooks.d/open", mode: 0o755, body: body)
        try writeScript(self.directory + "/hooks.d/nobody", mode: 0o700, owner: 65534, body: body)
        try FileManager.default.createSymbolicLink(atPath: self.directory + "/hooks.d/link", withDestinationPath: good)
        let cases: [(Quiesce_Agent_V1_RunHookRequest, Quiesce_Agent_V1_HookRefusal, String)] = [
            (self.request("open"), .wrongMode, "has mode 755"),
            (self.request("nobody"), .wrongOwner, "owned by uid 65534"),
            (self.request("link"), .notRegular, "not a regular file"),
            (self.request("absent"), .missing, "does not exist"),
            (self.request("../good"), .unknownHook, "found \"../good\""),
            (self.request("prescript"), .missing, "does not exist"),
        ]
        for (request, refusal, words) in cases {
            let result = await self.runner.run(request)
            #expect(!result.ran, "\(request.hook)")
            #expect(result.refusal == refusal, "\(request.hook): \(result.refusalDetail)")
            #expect(result.refusalDetail.contains(words), "\(result.refusalDetail)")
        }
        // Pinned, then changed: refused, and the hash it found is reported.
        try writeScript(good, mode: 0o700, body: body + "echo changed\n")
        let changed = await self.runner.run(self.request("good", pin: pinned))
        #expect(!changed.ran && changed.refusal == .hashMismatch)
        await #expect(changed.sha256 == (try sha256sum(good)) && changed.sha256 != pinned)
        #expect(!FileManager.default.fileExists(atPath: marker), "a refused hook ran")
        // Positive control: the same script with its current hash runs.
        let ok = await self.runner.run(self.request("good", pin: try sha256sum(good)))
        #expect(ok.ran && ok.exitCode == 0)
        #expect(FileManager.default.fileExists(atPath: marker))
    }

    @Test("a hanging hook is killed at its timeout, children included")
    func timeout() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let pids = self.directory + "/pids"
        // A background child, a grandchild that outlives its parent (re-parented to the agent), and the hook itself.
        try writeScript(self.directory + "/hooks.d/hang", mode: 0o700, body: """
            #!/bin/sh
            sleep 600 &
            echo $! >> '\(pids)'
            sh -c 'sleep 600 & echo $! >> "\(pids)"; exit 0'
            echo $$ >> '\(pids)'
            echo waiting
            sleep 600
            """)
        let began = ContinuousClock.now
        let result = await self.runner.run(self.request("hang", timeoutMs: 400))
        let took = ContinuousClock.now - began
        #expect(result.ran && result.timedOut)
        #expect(!result.exited && result.signal == SIGKILL)
        #expect(String(decoding: result.stdoutTail, as: UTF8.self) == "waiting\n")
        #expect(took >= .milliseconds(400) && took < .seconds(3), "took \(took)")
        let listed = try String(contentsOfFile: pids, encoding: .utf8).split(separator: "\n").compactMap { Int32($0) }
        #expect(listed.count == 3)
        for pid in listed { #expect(!processExists(pid), "process \(pid) of the hook survived its timeout") }
    }

    @Test("a hook ended by a signal reports the signal")
    func signalled() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        try writeScript(self.directory + "/hooks.d/term", mode: 0o700, body: "#!/bin/sh\nkill -TERM $$\nsleep 5\n")
        let result = await self.runner.run(self.request("term"))
        #expect(result.ran && !result.exited && result.signal == SIGTERM && !result.timedOut)
    }

    @Test("cancelling the command kills the hook")
    func cancelled() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        try writeScript(self.directory + "/hooks.d/slow", mode: 0o700, body: "#!/bin/sh\necho $$ > '\(self.directory)/pid'\nsleep 600\n")
        let runner = self.runner
        let request = self.request("slow", timeoutMs: 60_000)
        let task = Task { await runner.run(request) }
        try await Task.sleep(for: .milliseconds(300))
        task.cancel()
        let result = await task.value
        #expect(result.ran && !result.timedOut && result.signal == SIGKILL)
        let pid = Int32(try String(contentsOfFile: self.directory + "/pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        #expect(!processExists(pid))
    }
}
