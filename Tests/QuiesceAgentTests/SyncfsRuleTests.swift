import Foundation
import QuiesceAgent
import QuiesceProto
import Testing

@Suite("syncfs before FIFREEZE: the agent's rule and the request's policy")
struct SyncfsRuleTests {
    static let meminfo = """
        MemTotal:       24570268 kB
        MemFree:        20361044 kB
        Buffers:          200912 kB
        Dirty:             40960 kB
        Writeback:          8192 kB
        AnonPages:        611468 kB
        HugePages_Total:       0

        """

    @Test("Dirty + Writeback are read from meminfo's text (/proc or a node's); anything malformed is nil, not zero")
    func parse() {
        #expect(SyncfsRule.dirtyKiB(meminfo: Self.meminfo) == 49_152)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Dirty: 7 kB\nWriteback: 0 kB") == 7)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Dirty: 7 kB\n") == nil)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Dirty: seven kB\nWriteback: 0 kB\n") == nil)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Dirty: 7 MB\nWriteback: 0 kB\n") == nil)
        #expect(SyncfsRule.dirtyKiB(meminfo: "") == nil)
        // A NUMA node's file in sysfs: the same lines after "Node N ".
        #expect(SyncfsRule.dirtyKiB(meminfo: "Node 0 MemTotal: 24570268 kB\nNode 0 Dirty:  40 kB\nNode 0 Writeback:  2 kB\n") == 42)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Node 12 Dirty: 5 kB\nNode 12 Writeback: 1 kB") == 6)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Node x Dirty: 5 kB\nNode x Writeback: 1 kB") == nil)
        #expect(SyncfsRule.dirtyKiB(meminfo: "Node 0 Dirty: 5 kB\nNode 0 Writeback: one kB") == nil)
        // This machine's own /proc/meminfo parses.
        #expect(DirtyPageGauge.readProcMeminfo() != nil)
    }

    @Test("the gauge re-reads its kept-open files: 64 MiB written and not synced show up at once")
    func gaugeIsFresh() throws {
        let gauge = DirtyPageGauge()
        print("dirty page gauge reads \(gauge.source)")
        let before = try #require(gauge.read())
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-gauge-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let chunk = Data(repeating: 0x5a, count: 1 << 20)
        let handle = try #require(FileHandle(forWritingAtPath: { FileManager.default.createFile(atPath: directory.path + "/dirty", contents: nil); return directory.path + "/dirty" }()))
        for _ in 0..<64 { handle.write(chunk) }
        try handle.close()
        let after = try #require(gauge.read())
        // Dirty + Writeback: pages being written back still count, so only a
        // completed flush of the whole file could hide it (none is asked for).
        #expect(after >= before + (32 << 10), "before \(before) KiB, after 64 MiB written \(after) KiB")
    }

    @Test("auto flushes at the threshold and above, skips below it, and flushes when it cannot tell")
    func auto() {
        let rule = SyncfsRule(mode: .auto, minDirtyBytes: 16 << 20)
        let request = Quiesce_Agent_V1_FreezeRequest()
        let above = rule.decide(request, dirtyKiB: { 16 << 10 })
        #expect(above.sync && above.reason == "auto: 16 MiB dirty >= 16 MiB" && above.dirtyKiB == 16 << 10)
        let below = rule.decide(request, dirtyKiB: { 4 << 10 })
        #expect(!below.sync && below.reason == "auto: 4 MiB dirty < 16 MiB; FIFREEZE flushes it")
        let small = rule.decide(request, dirtyKiB: { 1536 })
        #expect(!small.sync && small.reason.hasPrefix("auto: 1.5 MiB dirty"))
        // Tenths to the nearest below 10 MiB (integer arithmetic: no Foundation on the freeze path).
        #expect(rule.decide(request, dirtyKiB: { 300 }).reason.hasPrefix("auto: 0.3 MiB dirty"))
        #expect(rule.decide(request, dirtyKiB: { 10239 }).reason.hasPrefix("auto: 10.0 MiB dirty"))
        #expect(rule.decide(request, dirtyKiB: { 51 }).reason.hasPrefix("auto: 0.0 MiB dirty"))
        let unknown = rule.decide(request, dirtyKiB: { nil })
        #expect(unknown.sync && unknown.reason.contains("unreadable") && unknown.dirtyKiB == nil)
    }

    @Test("the request's policy wins over the agent's rule; skip_syncfs wins over both; always and never read nothing")
    func precedence() {
        var reads = 0
        let count: () -> UInt64? = { reads += 1; return 1 << 30 }
        let auto = SyncfsRule.default
        var request = Quiesce_Agent_V1_FreezeRequest()
        request.syncfs = .never
        #expect(auto.decide(request, dirtyKiB: count) == .init(sync: false, reason: "never (the engine asked)", dirtyKiB: nil))
        request.syncfs = .always
        #expect(SyncfsRule(mode: .never).decide(request, dirtyKiB: count).sync)
        request.skipSyncfs = true
        #expect(auto.decide(request, dirtyKiB: count).reason == "never (the engine asked: skip_syncfs)")
        #expect(reads == 0)
        #expect(SyncfsRule(mode: .always).decide(Quiesce_Agent_V1_FreezeRequest(), dirtyKiB: count).reason == "always (the agent's setting)")
        request = Quiesce_Agent_V1_FreezeRequest()
        request.syncfs = .auto
        #expect(SyncfsRule(mode: .never, minDirtyBytes: 1 << 20).decide(request, dirtyKiB: count).sync)
        #expect(reads == 1)
    }
}
