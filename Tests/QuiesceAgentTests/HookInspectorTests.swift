import Foundation
import QuiesceAgent
import QuiesceProto
import QuiesceTestSupport
import Testing

@Suite("Hook checks", .enabled(if: getuid() == 0, "needs root to own files as root and as another user"))
struct HookInspectorTests {
    let directory: String

    init() throws {
        self.directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-hooks-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
    }

    func script(_ name: String, mode: Int, owner: uid_t = 0, body: String = "#!/bin/sh\necho ready\n") throws -> String {
        try writeScript("\(self.directory)/\(name)", mode: mode, owner: owner, body: body)
    }

    @Test("a root-owned 0700 script passes; its hash is read from the open descriptor")
    func good() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let path = try self.script("freeze.sh", mode: 0o700)
        let checked = HookInspector.check(name: "freeze.sh", path: path, hashAlways: true)
        #expect(checked.fact.refusal == .none)
        #expect(checked.descriptor >= 0)
        #expect(checked.fact.regularFile && checked.fact.ownerUid == 0 && checked.fact.mode == 0o700)
        await #expect(checked.fact.sha256 == (try sha256sum(path)))
        await #expect(HookInspector.check(name: "x", path: path, pinnedSHA256: try sha256sum(path)).fact.refusal == .none)
        #expect(HookInspector.check(name: "x", path: try self.script("strict.sh", mode: 0o500)).fact.refusal == .none)
    }

    @Test("wrong mode, wrong owner, not regular, missing and a changed hash are refused with the reason")
    func refusals() throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let good = try self.script("good.sh", mode: 0o700)
        let cases: [(String, Quiesce_Agent_V1_HookRefusal)] = [
            (try self.script("open.sh", mode: 0o755), .wrongMode),
            (try self.script("group.sh", mode: 0o710), .wrongMode),
            (try self.script("noexec.sh", mode: 0o600), .wrongMode),
            (try self.script("setuid.sh", mode: 0o4700), .wrongMode),
            (try self.script("nobody.sh", mode: 0o700, owner: 65534), .wrongOwner),
            ("\(self.directory)/missing.sh", .missing),
            ("\(self.directory)/not-a-dir/x.sh", .missing),
        ]
        for (path, refusal) in cases {
            let checked = HookInspector.check(name: "h", path: path)
            #expect(checked.fact.refusal == refusal, "\(path): \(HookInspector.explain(checked.fact))")
            #expect(checked.descriptor == -1)
        }
        try FileManager.default.createSymbolicLink(atPath: "\(self.directory)/link.sh", withDestinationPath: good)
        #expect(HookInspector.check(name: "h", path: "\(self.directory)/link.sh").fact.refusal == .notRegular)
        try FileManager.default.createDirectory(atPath: "\(self.directory)/dir.sh", withIntermediateDirectories: false)
        #expect(HookInspector.check(name: "h", path: "\(self.directory)/dir.sh").fact.refusal == .notRegular)
        mkfifo("\(self.directory)/fifo.sh", 0o700)
        #expect(HookInspector.check(name: "h", path: "\(self.directory)/fifo.sh").fact.refusal == .notRegular)
        let pinned = HookInspector.check(name: "h", path: good, pinnedSHA256: String(repeating: "0", count: 64))
        #expect(pinned.fact.refusal == .hashMismatch)
        #expect(HookInspector.explain(pinned.fact).contains("not the one the plan pinned"))
        #expect(HookInspector.explain(HookInspector.check(name: "h", path: "\(self.directory)/open.sh").fact).contains("mode 755"))
    }

    @Test("swapping the file after the check does not change what the descriptor holds")
    func swapAfterCheck() async throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let path = try self.script("hook.sh", mode: 0o700, body: "#!/bin/sh\necho original\n")
        let original = try await sha256sum(path)
        let checked = HookInspector.check(name: "hook.sh", path: path, pinnedSHA256: original)
        #expect(checked.fact.refusal == .none)
        let evil = try self.script("evil.sh", mode: 0o700, body: "#!/bin/sh\necho replaced\n")
        #expect(rename(evil, path) == 0)
        await #expect(try sha256sum(path) != original)
        let read = try FileHandle(fileDescriptor: checked.descriptor, closeOnDealloc: false).readToEnd()
        let content = try #require(read)
        #expect(String(decoding: content, as: UTF8.self).contains("original"))
    }

    @Test("facts list the seed scripts and every hook in the hook directory")
    func facts() throws {
        defer { try? FileManager.default.removeItem(atPath: self.directory) }
        let hooks = "\(self.directory)/hooks.d"
        try FileManager.default.createDirectory(atPath: hooks, withIntermediateDirectories: true)
        let pre = try self.script("prescript.sh", mode: 0o700)
        _ = try self.script("hooks.d/mysql-hold", mode: 0o700)
        _ = try self.script("hooks.d/loose", mode: 0o777)
        let facts = HookInspector.facts(
            HookLocations(prescript: pre, postscript: "\(self.directory)/postscript.sh", hookDirectory: hooks), hashes: true)
        #expect(facts.map(\.name) == ["prescript", "postscript", "loose", "mysql-hold"])
        #expect(facts.map(\.refusal) == [.none, .missing, .wrongMode, .none])
        #expect(facts[0].sha256.count == 64)
    }
}
