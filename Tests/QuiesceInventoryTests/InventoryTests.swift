import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceInventory
import QuiesceLocalProvider
import QuiesceTestSupport
import Testing

func record(_ group: SnapshotGroup, instance: String, level: ConsistencyLevel, at date: Date? = nil) -> GroupRecord {
    GroupRecord(
        id: "g-" + group.id.dropFirst(3), runID: nil, instanceID: instance, provider: group.provider, providerGroupID: group.id,
        idempotencyToken: group.idempotencyToken, wantedLevel: .application, achievedLevel: level,
        reasons: level == .crash ? [Reason(code: "not-frozen", message: "taken without a freeze")] : [],
        state: group.state, createdAt: date ?? group.createdAt, frozenUs: level == .crash ? nil : 900, tags: group.tags, disks: group.disks)
}

@Suite("Prune policy")
struct PrunePolicyTests {
    func group(_ id: String, _ instance: String, hoursAgo: Double, now: Date) -> GroupRecord {
        GroupRecord(id: id, runID: nil, instanceID: instance, provider: "local", providerGroupID: id, idempotencyToken: id,
                    wantedLevel: .crash, achievedLevel: .crash, reasons: [], state: .ready,
                    createdAt: now.addingTimeInterval(-hoursAgo * 3600), disks: [])
    }

    @Test("keeps the newest N per instance and everything within the window")
    func plan() {
        let now = Date()
        let groups = [
            self.group("a1", "a", hoursAgo: 1, now: now), self.group("a2", "a", hoursAgo: 30, now: now),
            self.group("a3", "a", hoursAgo: 50, now: now), self.group("a4", "a", hoursAgo: 100, now: now),
            self.group("b1", "b", hoursAgo: 200, now: now),
        ]
        let plan = PrunePolicy(keepLast: 1, keepWithin: .seconds(48 * 3600)).plan(groups, now: now)
        #expect(plan.keep.map(\.id).sorted() == ["a1", "a2", "b1"])
        #expect(plan.delete.map(\.id).sorted() == ["a3", "a4"])
        #expect(PrunePolicy(keepLast: 0, keepWithin: nil).plan(groups, now: now).keep.isEmpty)
        #expect(parseDuration("7d") == .seconds(604_800) && parseDuration("90s") == .seconds(90) && parseDuration("7x") == nil)
    }

    @Test("daily, weekly, monthly: the newest group of each of the last N periods; the newest application-consistent group and pending ones always kept")
    func periods() {
        // Two groups a day at 01:00 and 13:00 UTC for 70 days back from 2026-03-31 (a Tuesday).
        let end = Date(timeIntervalSince1970: 1_774_915_200)  // 2026-03-31T00:00:00Z
        var items: [RetentionRules.Item] = []
        for day in 0..<70 {
            for hour in [1.0, 13.0] {
                let at = end.addingTimeInterval(Double(-day) * 86_400 + hour * 3600)
                items.append(.init(id: String(format: "d%02d-%02.0f", day, hour), instanceID: "i", createdAt: at, level: .filesystem))
            }
        }
        let now = end.addingTimeInterval(86_400)
        let daily = RetentionRules(daily: 3).plan(items, now: now).keep
        #expect(daily == ["d00-13", "d01-13", "d02-13"], "the newest of each of the last three days")
        let weekly = RetentionRules(weekly: 2).plan(items, now: now).keep
        // 2026-03-31 is a Tuesday: this ISO week's newest (Tue 13:00) and last week's (Sun 03-29 13:00).
        #expect(weekly == ["d00-13", "d02-13"], "\(weekly.sorted())")
        let monthly = RetentionRules(monthly: 3).plan(items, now: now).keep
        // March's newest, February's (the 28th), January's (the 31st): d00, d31, d59.
        #expect(monthly == ["d00-13", "d31-13", "d59-13"], "\(monthly.sorted())")
        let both = RetentionRules(keepLast: 1, daily: 2, monthly: 2).plan(items, now: now)
        #expect(both.keep == ["d00-13", "d01-13", "d31-13"] && both.delete.count == items.count - 3)
        // Protected whatever the rules: the newest application-consistent group, and groups still pending.
        var protected = items
        protected[40].level = .application  // day 20 (a higher index is older)
        protected[60].level = .application  // day 30
        protected[90].pending = true
        let kept = RetentionRules(keepLast: 1).plan(protected, now: now).keep
        #expect(kept == [items[1].id, items[40].id, items[90].id], "\(kept.sorted())")
        #expect(!RetentionRules().keepsSomething && RetentionRules(weekly: 1).keepsSomething)
    }
}

@Suite("Inventory and CLI", .enabled(if: LoopDevices.available, "needs root for loop devices"), .serialized)
struct InventoryTests {
    /// The built `quiesce` binary, beside the test bundle.
    func quiesce(_ arguments: [String]) async throws -> (status: Int32, output: String) {
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("quiesce").path
        let finished = try await blocking { try ChildProcess.run(arguments, executable: binary) }
        return (finished.status, finished.output)
    }

    @Test("deep verify tells a frozen ext4/XFS snapshot from a crash-consistent one; the CLI lists, shows, verifies, restores and prunes")
    func endToEnd() async throws {
        try await withLoopDevices { loops in
            let pool = try await loops.mount("pool", fsType: "xfs", sizeMiB: 1024, mkfsOptions: ["-m", "reflink=1"])
            let provider = try LocalProvider(pool: pool.mountPoint + "/pool")
            let catalogPath = pool.mountPoint + "/catalog.db"
            let inventory = await Inventory(catalog: try SQLiteCatalog(path: catalogPath), provider: provider)

            // Two guest disks: ext4 and XFS, mounted from the pool like an instance's disks.
            var mounts: [String: String] = [:]
            for (disk, fs, size) in [("root", "ext4", "96M"), ("data", "xfs", "320M")] {
                let image = try provider.diskPath(disk)
                FileManager.default.createFile(atPath: image, contents: nil)
                try await run("truncate", "-s", size, image)
                try await run(fs == "xfs" ? "mkfs.xfs" : "mkfs.ext4", "-q", fs == "xfs" ? "-f" : "-F", image)
                mounts[disk] = try await loops.mountDevice(try loops.attach(image), at: "guest-\(disk)")
                try await run("dd", "if=/dev/urandom", "of=\(mounts[disk]!)/file", "bs=1M", "count=4", "status=none")
            }

            // Crash-consistent: taken while mounted and unfrozen.
            let crash = try await provider.createGroup(CreateGroupRequest(disks: ["root", "data"], tags: ["instance": "i-1"], idempotencyToken: "crash"))
            _ = try await provider.waitUntilReady(crash.id, timeout: .seconds(60))
            // Filesystem-consistent: both frozen across the create.
            for disk in ["data", "root"] { try await run("fsfreeze", "--freeze", mounts[disk]!) }
            let frozen: SnapshotGroup
            do {
                frozen = try await provider.createGroup(CreateGroupRequest(disks: ["root", "data"], tags: ["instance": "i-1"], idempotencyToken: "frozen"))
            } catch {
                for disk in ["root", "data"] { try? await run("fsfreeze", "--unfreeze", mounts[disk]!) }
                throw error
            }
            for disk in ["root", "data"] { try await run("fsfreeze", "--unfreeze", mounts[disk]!) }
            _ = try await provider.waitUntilReady(frozen.id, timeout: .seconds(60))

            let crashRecord = record(try await provider.describe(crash.id), instance: "i-1", level: .crash, at: Date().addingTimeInterval(-3 * 86_400))
            let frozenRecord = record(try await provider.describe(frozen.id), instance: "i-1", level: .filesystem)
            try await inventory.catalog.record(crashRecord)
            try await inventory.catalog.record(frozenRecord)

            let clean = try await inventory.verify(frozenRecord.id, deep: true)
            // ext4: a frozen snapshot has a clean journal. XFS keeps its log dirty across a
            // freeze (xfs_repair -n asks for a replay even then), so for XFS only "checks
            // clean, with or without a replay" is asserted.
            #expect(clean[0].outcome == .ok, "\(clean)")
            #expect([.ok, .okAfterRecovery].contains(clean[1].outcome), "\(clean)")
            #expect(clean.map(\.filesystem) == ["ext4", "xfs"])
            let recovered = try await inventory.verify(crashRecord.id, deep: true)
            #expect(recovered[0].outcome == .okAfterRecovery, "\(recovered)")
            #expect([.ok, .okAfterRecovery].contains(recovered[1].outcome), "\(recovered)")
            // The snapshots themselves were not touched by the checks.
            #expect(try await inventory.verify(crashRecord.id, deep: false).allSatisfy { $0.outcome == .ok })

            let store = ["--catalog", catalogPath, "--pool", provider.pool]
            let listed = try await self.quiesce(["snapshots"] + store)
            #expect(listed.status == 0)
            #expect(listed.output.contains(frozenRecord.id) && listed.output.contains("filesystem") && listed.output.contains("not-frozen"))
            #expect(try await self.quiesce(["snapshots", "--level", "crash", "--output", "json"] + store).output.contains(crashRecord.id))
            #expect(!(try await self.quiesce(["snapshots", "--newer-than", "1d"] + store).output.contains(crashRecord.id)))
            let shown = try await self.quiesce(["show", frozenRecord.id] + store)
            #expect(shown.status == 0 && shown.output.contains("level       filesystem (wanted application)") && shown.output.contains("reflink"))
            #expect(try await self.quiesce(["show", "g-nope"] + store).status == 1)
            let verified = try await self.quiesce(["verify", frozenRecord.id] + store)
            #expect(verified.status == 0 && verified.output.contains("ok"))

            // Restore as new, then refuse in place while the disk is mounted.
            let restored = try await self.quiesce(["restore", frozenRecord.id, "--disk", "root", "--as-new"] + store)
            #expect(restored.status == 0, "\(restored.output)")
            #expect(FileManager.default.fileExists(atPath: try provider.diskPath("root-restored-\(frozenRecord.id)")))
            let refused = try await self.quiesce(["restore", frozenRecord.id, "--disk", "root", "--in-place"] + store)
            #expect(refused.status == 1 && refused.output.contains("attached to /dev/loop"), "\(refused.output)")

            // A tampered snapshot fails verify with exit 1.
            let tampered = provider.snapshotPath(group: crash.id, disk: "data")
            try await run("dd", "if=/dev/urandom", "of=\(tampered)", "bs=512", "count=1", "seek=4096", "conv=notrunc", "status=none")
            let bad = try await self.quiesce(["verify", crashRecord.id] + store)
            #expect(bad.status == 1 && bad.output.contains("checksum-mismatch"))

            // Prune: keep the newest one; the 3-day-old crash group goes, from the pool and the catalog.
            let dry = try await self.quiesce(["prune", "--keep-last", "1", "--dry-run"] + store)
            #expect(dry.output.contains("would delete \(crashRecord.id)"))
            #expect(try await inventory.catalog.group(crashRecord.id) != nil)
            let pruned = try await self.quiesce(["prune", "--keep-last", "1", "--keep-within", "1d"] + store)
            #expect(pruned.status == 0 && pruned.output.contains("deleted \(crashRecord.id)"))
            #expect(try await inventory.catalog.group(crashRecord.id) == nil)
            await #expect(throws: ProviderError.self) { try await provider.describe(crash.id) }
            #expect(try await inventory.catalog.group(frozenRecord.id) != nil)
        }
    }
}
