import Foundation
import QuiesceTestSupport
import QuiesceAgent
import QuiesceProto
import Testing

@Suite("Facts from this machine")
struct FactsTests {
    @Test("OS, kernel and the root mount match what the system tools say")
    func system() async throws {
        let facts = try await FactsCollector().collect()
        #expect(facts.osFamily == "linux")
        await #expect(facts.kernelRelease == (try run("uname", "-r").trimmingCharacters(in: .whitespacesAndNewlines)))
        await #expect(facts.architecture == (try run("uname", "-m").trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(facts.cpuCount == UInt32(ProcessInfo.processInfo.activeProcessorCount))
        #expect(facts.bootTimeUnix > 1_000_000_000)
        let root = try #require(facts.mounts.first { $0.mountPoint == "/" })
        await #expect(root.fsType == (try run("findmnt", "-n", "-o", "FSTYPE", "/").trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(root.sizeBytes > 0)
        #expect(!facts.mounts.contains { $0.fsType == "proc" || $0.fsType == "sysfs" }, "kernel interfaces are left out")
    }

    @Test("every mount is reported, also when /proc/self/mountinfo is far longer than 4 KiB", .enabled(if: getuid() == 0, "needs root to mount"))
    func manyMounts() async throws {
        try await withLoopDevices { loops in
            let made = try await blocking { try (1...60).map { try loops.tmpfs(at: String(format: "many-mounts-with-a-long-name-%02d", $0)) } }
            let text = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
            let facts = try await FactsCollector().collect()
            let reported = Set(facts.mounts.map(\.mountPoint))
            let missing = made.filter { !reported.contains($0) }
            #expect(missing.isEmpty, "\(missing.count) of \(made.count) mounts missing; Foundation read \(text.utf8.count) bytes of mountinfo")
        }
    }

    @Test("loop-mounted ext4 and XFS are eligible; bind, read-only and tmpfs mounts say why not",
          .enabled(if: LoopDevices.available, "needs root for loop devices"))
    func loopMounts() async throws {
        try await withLoopDevices { loops in
            let ext4 = try await loops.mount("data ext4", fsType: "ext4", sizeMiB: 64)
            let xfs = try await loops.mount("xfs", fsType: "xfs", sizeMiB: 320)
            let readOnly = try await loops.mount("ro", fsType: "ext4", sizeMiB: 32, options: ["ro"])
            let bind = try await loops.bind(ext4.mountPoint, at: "bind")
            let tmpfs = try await loops.tmpfs(at: "tmp")

            let mounts = Dictionary(try await FactsCollector().collect().mounts.map { ($0.mountPoint, $0) }) { a, _ in a }
            let e = try #require(mounts[ext4.mountPoint], "a mount point with a space must be unescaped")
            #expect(e.fsType == "ext4" && e.freezable && e.device == ext4.device)
            #expect(e.sizeBytes > 50 << 20 && e.sizeBytes <= 64 << 20)
            #expect(!e.readOnly)
            let x = try #require(mounts[xfs.mountPoint])
            #expect(x.fsType == "xfs" && x.freezable)
            #expect(mounts[readOnly.mountPoint]?.notFreezableReason == "read-only")
            #expect(mounts[bind]?.notFreezableReason == "same-filesystem-as:\(ext4.mountPoint)")
            #expect(mounts[tmpfs]?.notFreezableReason == "fs-not-eligible:tmpfs")
        }
    }
}
