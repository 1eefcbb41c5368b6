import Foundation
import QuiesceCore
import QuiescePluginProto
import QuiescePlugins
import Testing

/// The built-in plugins, loaded from their built .so files through the plugin
/// host, planning against facts that cover every branch of the seed's rules.
@Suite("Built-in plugins through the host", .serialized)
struct BuiltinPluginTests {
    let registry: PluginRegistry
    let linux: Plugin
    let crash: Plugin

    init() async throws {
        self.registry = await PluginFixtures.registry()
        #expect(self.registry.failures.isEmpty, "\(self.registry.failures)")
        self.linux = try #require(self.registry.plugin(named: "linux-freeze"), "libquiesce-plugin-linux-freeze.so not found in \(PluginFixtures.buildDirectory)")
        self.crash = try #require(self.registry.plugin(named: "crash"))
    }

    func plan(
        _ facts: InstanceFacts = PluginFixtures.facts(), wanted: ConsistencyLevel = .application, minimum: ConsistencyLevel = .crash,
        options: [String: OptionInput] = [:]
    ) async throws -> Plan {
        try await self.linux.plan(facts: facts, policy: try PluginFixtures.policy(self.linux, wanted: wanted, minimum: minimum, options: options))
    }

    @Test("each built-in describes itself: name, version, platforms, levels, typed options; the ABI is 1.0")
    func describe() async throws {
        #expect(self.linux.info.platforms == ["linux"])
        #expect(self.linux.info.levels == [.crash, .filesystem, .application])
        #expect(self.linux.abi == "1.0")
        #expect(self.linux.path.hasSuffix("/libquiesce-plugin-linux-freeze.so"))
        let options = Dictionary(uniqueKeysWithValues: self.linux.info.options.map { ($0.name, $0) })
        #expect(options["fs_freeze"]?.type == .bool && options["fs_freeze"]?.defaultValue.boolValue == true)
        #expect(options["prescript_path"]?.defaultValue.stringValue == "/tmp/prescript.sh")
        #expect(options["postscript_path"]?.defaultValue.stringValue == "/tmp/postscript.sh")
        #expect(options["skip_mounts"]?.type == .stringList)
        #expect(options["prescript_timeout_ms"]?.type == .durationMs)
        #expect(Set(options.keys).isSuperset(of: ["application_consistent", "retries", "freeze_timeout_ms", "thaw_timeout_ms"]))
        #expect(self.crash.info.levels == [.crash] && self.crash.info.options.isEmpty)
        await self.registry.shutdown()
    }

    @Test("valid scripts: prescript, freeze the eligible mounts, thaw, postscript → application-consistent, hashes pinned")
    func applicationConsistent() async throws {
        let plan = try await self.plan()
        #expect(plan.expected == .application && plan.reasons.isEmpty, "\(plan.reasons)")
        #expect(plan.stepIDs == [[], ["prescript", "freeze"], ["thaw", "postscript"], []])
        let freeze = try #require(plan.step("freeze"))
        // tmpfs and the read-only mount are left out without lowering the level.
        #expect(freeze.action.freeze.mountPoints == ["/", "/data"])
        #expect(plan.step("prescript")?.action.runHook.hook.seed.which == "prescript")
        #expect(plan.step("prescript")?.action.runHook.hook.sha256 == PluginFixtures.goodHash)
        #expect(plan.step("postscript")?.action.runHook.hook.seed.which == "postscript")
        #expect(plan.step("prescript")?.undo == "postscript" && freeze.undo == "thaw")
        #expect((plan.quiesce + plan.thaw).allSatisfy { $0.blocking && $0.timeoutMs > 0 })
        await self.registry.shutdown()
    }

    @Test("scripts with the wrong mode, the wrong owner, missing, not a file, or not offered → filesystem-consistent with the reason")
    func brokenScripts() async throws {
        let cases: [(String, [PluginFixtures.HookFactBuilder], String)] = [
            ("mode 0755", [PluginFixtures.hook("prescript", "/tmp/prescript.sh", refusal: "wrong-mode", mode: 0o755),
                           PluginFixtures.hook("postscript", "/tmp/postscript.sh")],
             "prescript-wrong-mode: /tmp/prescript.sh has mode 0755"),
            ("owner 1000", [PluginFixtures.hook("prescript", "/tmp/prescript.sh"),
                            PluginFixtures.hook("postscript", "/tmp/postscript.sh", refusal: "wrong-owner", owner: 1000)],
             "postscript-wrong-owner: /tmp/postscript.sh is owned by uid 1000"),
            ("missing", [PluginFixtures.hook("prescript", "/tmp/prescript.sh", refusal: "missing"),
                         PluginFixtures.hook("postscript", "/tmp/postscript.sh", refusal: "missing")],
             "prescript-missing: /tmp/prescript.sh does not exist"),
            ("a directory", [PluginFixtures.hook("prescript", "/tmp/prescript.sh", refusal: "not-regular"),
                             PluginFixtures.hook("postscript", "/tmp/postscript.sh")],
             "prescript-not-regular"),
            ("other paths", [PluginFixtures.hook("prescript", "/opt/pre.sh"), PluginFixtures.hook("postscript", "/opt/post.sh")],
             "prescript-not-offered: the agent offers no hook at /tmp/prescript.sh"),
        ]
        for (label, hooks, reason) in cases {
            let plan = try await self.plan(PluginFixtures.facts(hooks: hooks))
            #expect(plan.expected == .filesystem, "\(label)")
            #expect(plan.reasons.contains { $0.hasPrefix(reason) }, "\(label): \(plan.reasons)")
            #expect(plan.stepIDs == [[], ["freeze"], ["thaw"], []], "\(label): no script runs")
        }
        // The paths are policy options: scripts elsewhere are fine when the policy names them.
        let moved = try await self.plan(
            PluginFixtures.facts(hooks: [PluginFixtures.hook("prescript", "/opt/pre.sh"), PluginFixtures.hook("postscript", "/opt/post.sh")]),
            options: ["prescript_path": .text("/opt/pre.sh"), "postscript_path": .string("/opt/post.sh")])
        #expect(moved.expected == .application, "\(moved.reasons)")
        await self.registry.shutdown()
    }

    @Test("application consistency off → filesystem; freeze off → crash; wanted filesystem → no scripts; wanted crash → nothing")
    func switches() async throws {
        let noApp = try await self.plan(options: ["application_consistent": .bool(false)])
        #expect(noApp.expected == .filesystem && noApp.reasons.first?.hasPrefix("application-consistency-off") == true)
        #expect(noApp.stepIDs == [[], ["freeze"], ["thaw"], []])

        let noFreeze = try await self.plan(options: ["fs_freeze": .text("off")])
        #expect(noFreeze.expected == .crash && noFreeze.reasons.first?.hasPrefix("fs-freeze-off") == true)
        #expect(noFreeze.quiesce.isEmpty && noFreeze.thaw.isEmpty, "no guest action at all, the scripts included")

        let fsOnly = try await self.plan(wanted: .filesystem)
        #expect(fsOnly.expected == .filesystem && fsOnly.reasons.isEmpty && fsOnly.stepIDs == [[], ["freeze"], ["thaw"], []])

        let crashOnly = try await self.plan(wanted: .crash)
        #expect(crashOnly.expected == .crash && crashOnly.reasons.isEmpty && crashOnly.quiesce.isEmpty)

        let skipSync = try await self.plan(options: ["skip_syncfs": .bool(true), "retries": .int(2)])
        #expect(skipSync.step("freeze")?.action.freeze.skipSyncfs == true && skipSync.quiesceRetries == 2)
        await self.registry.shutdown()
    }

    @Test("ineligible filesystems: nothing eligible → crash; an ineligible disk → crash unless skipped; no guard → crash")
    func eligibility() async throws {
        let none = try await self.plan(PluginFixtures.facts(mounts: [
            PluginFixtures.mount("/", "btrfs", device: "/dev/vda1"), PluginFixtures.mount("/tmp", "tmpfs", device: "tmpfs"),
        ]))
        #expect(none.expected == .crash && none.quiesce.isEmpty)
        #expect(none.reasons.first?.hasPrefix("no-eligible-filesystem: / is btrfs") == true, "\(none.reasons)")

        let mixed = PluginFixtures.facts(mounts: [
            PluginFixtures.mount("/", "ext4", device: "/dev/vda1"), PluginFixtures.mount("/boot/efi", "vfat", device: "/dev/vda15"),
        ])
        let partial = try await self.plan(mixed)
        #expect(partial.expected == .crash && partial.reasons.first?.hasPrefix("fs-not-eligible: /boot/efi is vfat") == true, "\(partial.reasons)")
        let skipped = try await self.plan(mixed, options: ["skip_mounts": .list(["/boot/efi"])])
        #expect(skipped.expected == .application && skipped.step("freeze")?.action.freeze.mountPoints == ["/"])

        let only = try await self.plan(options: ["only_mounts": .text("/data")])
        #expect(only.step("freeze")?.action.freeze.mountPoints == ["/data"])
        let absent = try await self.plan(options: ["only_mounts": .list(["/nope"])])
        #expect(absent.expected == .crash && absent.reasons.first?.hasPrefix("mount-not-found: only_mounts names /nope") == true)

        let noGuard = try await self.plan(PluginFixtures.facts(guardReady: false))
        #expect(noGuard.expected == .crash && noGuard.reasons.first?.hasPrefix("guard-missing") == true && noGuard.quiesce.isEmpty)
        await self.registry.shutdown()
    }

    @Test("the minimum level decides what a failing step means: downgrade, or fail the instance")
    func minimumLevel() async throws {
        let lenient = try await self.plan(minimum: .crash)
        #expect(lenient.step("prescript")?.onFailure.downgradeTo == .filesystem)
        #expect(lenient.step("prescript")?.onFailure.reason == "prescript-failed")
        #expect(lenient.step("freeze")?.onFailure.downgradeTo == .crash)

        let middle = try await self.plan(minimum: .filesystem)
        #expect(middle.step("prescript")?.onFailure.downgradeTo == .filesystem)
        #expect(middle.step("freeze")?.onFailure.fail == true && middle.step("freeze")?.onFailure.reason == "freeze-failed")

        let strict = try await self.plan(minimum: .application)
        #expect(strict.step("prescript")?.onFailure.fail == true)
        #expect(strict.step("freeze")?.onFailure.fail == true)

        // Below the minimum at plan time: the plan says what it can reach; the engine fails the instance.
        let short = try await self.plan(PluginFixtures.facts(guardReady: false), minimum: .filesystem)
        #expect(short.expected == .crash)
        await self.registry.shutdown()
    }

    @Test("a Windows instance is refused with a reason; bad options are errors naming the option, expected and found")
    func refusals() async throws {
        await #expect {
            try await self.plan(PluginFixtures.facts(os: "windows"))
        } throws: { error in
            let error = error as? PluginError
            return error?.code == .refused && error?.plugin == "linux-freeze" && error?.detail.contains("windows") == true
        }
        #expect {
            try PluginFixtures.policy(self.linux, options: ["fs_frezee": .bool(true), "retries": .text("many"), "prescript_timeout_ms": .int(5)])
        } throws: { error in
            let text = "\(error)"
            return text.contains("unknown option fs_frezee (linux-freeze accepts application_consistent, ")
                && text.contains("option retries: expected integer, found \"many\"")
                && text.contains("option prescript_timeout_ms: expected milliseconds between 100 and 600000, found 5")
        }
        // Timeouts that cannot fit in the freeze budget make an invalid plan, said with the sum.
        await #expect {
            try await self.plan(options: ["prescript_timeout_ms": .int(9000)])
        } throws: { error in
            let error = error as? PluginError
            return error?.code == .invalidPlan
                && error?.detail.contains("may take 15000 ms (prescript 9000 + freeze 2000 + thaw 2000 + postscript 2000), more than the freeze budget of 10000 ms") == true
        }
        await self.registry.shutdown()
    }

    @Test("crash: no guest action, and it says why when more was wanted")
    func crashPlugin() async throws {
        let plan = try await self.crash.plan(facts: PluginFixtures.facts(), policy: try PluginFixtures.policy(self.crash))
        #expect(plan.expected == .crash && plan.quiesce.isEmpty && plan.thaw.isEmpty)
        #expect(plan.reasons.first?.hasPrefix("crash-plugin:") == true)
        let asked = try await self.crash.plan(facts: PluginFixtures.facts(os: "windows"), policy: try PluginFixtures.policy(self.crash, wanted: .crash))
        #expect(asked.reasons.isEmpty, "crash plans any OS")
        await self.registry.shutdown()
    }
}
