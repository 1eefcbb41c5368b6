import Foundation
import QuiesceCore
import QuiescePluginProto
import QuiescePlugins
import Testing

/// The windows-vss plugin through the host, against Windows facts for every branch of the seed's
/// Windows rules; and the validator's rules for VSS steps, read from the action-kind table.
@Suite("windows-vss and the action-kind table", .serialized)
struct WindowsVssPluginTests {
    static func windows(
        volumes: [(String, String)] = [("C:\\", "NTFS"), ("D:\\", "ReFS")], writers: [String] = ["SqlServerWriter", "Registry Writer"],
        service: String = "running", guardReady: Bool = true, capabilities: [String] = ["facts", "vss"]
    ) -> InstanceFacts {
        .with {
            $0.instanceID = "win-test"
            $0.osFamily = "windows"
            $0.osName = "Microsoft Windows Server 2022 Datacenter"
            $0.guardReady = guardReady
            $0.capabilities = capabilities
            $0.vssService = service
            $0.mounts = volumes.map { name, fs in
                .with {
                    $0.mountPoint = name
                    $0.fsType = fs
                    $0.freezable = ["NTFS", "ReFS"].contains(fs)
                    if !$0.freezable { $0.notFreezableReason = "fs-not-eligible:\(fs)" }
                }
            }
            $0.vssWriters = writers.map { name in .with { $0.name = name; $0.writerID = "id-" + name; $0.state = "STABLE" } }
        }
    }

    func with(_ body: (Plugin) async throws -> Void) async throws {
        let registry = await PluginFixtures.registry()
        let plugin = try #require(registry.plugin(named: "windows-vss"), "\(registry.failures)")
        try await body(plugin)
        await registry.shutdown()
    }

    func plan(_ plugin: Plugin, _ facts: InstanceFacts = Self.windows(), wanted: ConsistencyLevel = .application,
              minimum: ConsistencyLevel = .crash, options: [String: OptionInput] = [:]) async throws -> Plan {
        let policy = try PluginFixtures.policy(plugin, wanted: wanted, minimum: minimum, options: options)
        let plan = try await plugin.plan(facts: facts, policy: policy)
        #expect(PlanValidator.problems(in: plan, policy: policy).isEmpty, "the host validated it; so does this")
        return plan
    }

    @Test("writers healthy → one VSS set with writers (copy, hold ≤ 10 s, retry on retryable errors) → application")
    func application() async throws {
        try await self.with { plugin in
            #expect(plugin.info.platforms == ["windows"] && plugin.info.levels == [.crash, .filesystem, .application])
            let names = Set(plugin.info.options.map(\.name))
            #expect(names == ["vss_writers", "include_writers", "exclude_writers", "backup_type", "volumes", "skip_volumes", "retries",
                              "freeze_timeout_ms", "thaw_timeout_ms", "hold_limit_ms"])
            let plan = try await self.plan(plugin)
            #expect(plan.expected == .application && plan.reasons.isEmpty, "\(plan.reasons)")
            #expect(plan.quiesce.map(\.id) == ["vss-freeze"] && plan.thaw.map(\.id) == ["vss-thaw"] && plan.quiesceRetries == 1)
            let vss = plan.quiesce[0].action.vssFreeze
            #expect(vss.volumes == ["C:\\", "D:\\"] && vss.includeWriters && vss.backupType == "copy" && vss.holdLimitMs == 10_000)
            #expect(vss.retryOn == ["VSS_E_WRITERERROR_RETRYABLE", "VSS_E_WRITERERROR_TIMEOUT", "VSS_E_WRITERERROR_OUTOFRESOURCES"])
            #expect(plan.quiesce[0].undo == "vss-thaw" && plan.quiesce[0].blocking && plan.quiesce[0].onFailure.reason == "vss-freeze-failed")
            let full = try await self.plan(plugin, options: ["backup_type": .string("full"), "include_writers": .list(["SqlServerWriter"]),
                                                             "exclude_writers": .list(["Registry Writer"]), "hold_limit_ms": .int(4000)])
            #expect(full.quiesce[0].action.vssFreeze.backupType == "full" && full.quiesce[0].action.vssFreeze.holdLimitMs == 4000)
            #expect(full.quiesce[0].action.vssFreeze.includeWritersNamed == ["SqlServerWriter"])
            #expect(full.quiesce[0].action.vssFreeze.excludeWritersNamed == ["Registry Writer"])
        }
    }

    @Test("the seed's rules: writers off → filesystem; a named writer missing, or none taking part → filesystem; each with its reason")
    func filesystem() async throws {
        try await self.with { plugin in
            let off = try await self.plan(plugin, options: ["vss_writers": .bool(false)])
            #expect(off.expected == .filesystem && off.reasons == ["vss-writers-off: policy test-policy turns VSS writers off"])
            #expect(!off.quiesce[0].action.vssFreeze.includeWriters)
            let missing = try await self.plan(plugin, options: ["include_writers": .list(["ExchangeWriter"])])
            #expect(missing.expected == .filesystem)
            #expect(missing.reasons == ["vss-writer-missing: ExchangeWriter not on this instance (its writers: SqlServerWriter, Registry Writer)"])
            let none = try await self.plan(plugin, options: ["exclude_writers": .list(["SqlServerWriter", "id-Registry Writer"])])
            #expect(none.expected == .filesystem && none.reasons.first?.hasPrefix("vss-no-writers: ") == true, "\(none.reasons)")
            let wantedFS = try await self.plan(plugin, wanted: .filesystem)
            #expect(wantedFS.expected == .filesystem && wantedFS.reasons.isEmpty && !wantedFS.quiesce[0].action.vssFreeze.includeWriters)
            let crash = try await self.plan(plugin, wanted: .crash)
            #expect(crash.expected == .crash && crash.quiesce.isEmpty)
        }
    }

    @Test("crash-consistent, with the reason: no VSS capability, no guard, the service stopped, no eligible volume, a FAT volume unless skipped")
    func crash() async throws {
        try await self.with { plugin in
            let cases: [(InstanceFacts, [String: OptionInput], String)] = [
                (Self.windows(capabilities: ["facts"]), [:], "vss-not-offered: the agent does not drive VSS (it offers facts)"),
                (Self.windows(guardReady: false), [:], "guard-missing: "),
                (Self.windows(service: "stopped"), [:], "vss-service-not-running: the Volume Shadow Copy service is stopped"),
                (Self.windows(volumes: [("E:\\", "FAT32")]), [:], "no-eligible-volume: E:\\ is FAT32 (VSS snapshots NTFS and ReFS)"),
                (Self.windows(volumes: [("C:\\", "NTFS"), ("E:\\", "FAT32")]), [:], "fs-not-eligible: E:\\ is FAT32"),
                (Self.windows(), ["volumes": .list(["Z:\\"])], "volume-not-found: volumes names Z:\\, which the instance does not have"),
            ]
            for (facts, options, reason) in cases {
                let plan = try await self.plan(plugin, facts, options: options)
                #expect(plan.expected == .crash && plan.quiesce.isEmpty, "\(reason): \(plan.reasons)")
                #expect(plan.reasons.first?.hasPrefix(reason) == true, "\(plan.reasons) should start with \(reason)")
            }
            let skipped = try await self.plan(plugin, Self.windows(volumes: [("C:\\", "NTFS"), ("E:\\", "FAT32")]), options: ["skip_volumes": .list(["e:\\"])])
            #expect(skipped.expected == .application && skipped.quiesce[0].action.vssFreeze.volumes == ["C:\\"])
            let strict = try await self.plan(plugin, minimum: .application)
            #expect(strict.quiesce[0].onFailure.fail, "below the minimum a failed set fails the instance")
            // A Linux instance is refused before the plugin runs (its platforms), with the reason.
            await #expect(throws: (any Error).self) { try await plugin.plan(facts: PluginFixtures.facts(), policy: try PluginFixtures.policy(plugin)) }
        }
    }

    static func vssPlan(_ change: (inout Plan) -> Void) -> Plan {
        var plan = Plan()
        plan.plugin = "t"
        plan.expected = .application
        plan.quiesce = [.with {
            $0.id = "vss-freeze"
            $0.action.vssFreeze = .with { $0.volumes = ["C:\\"]; $0.includeWriters = true; $0.backupType = "copy"; $0.holdLimitMs = 10_000 }
            $0.timeoutMs = 5000
            $0.undo = "vss-thaw"
            $0.onFailure = .with { $0.downgradeTo = .crash; $0.reason = "vss-freeze-failed" }
            $0.blocking = true
        }]
        plan.thaw = [.with { $0.id = "vss-thaw"; $0.action.vssThaw = .init(); $0.timeoutMs = 3000; $0.blocking = true }]
        change(&plan)
        return plan
    }

    @Test("the validator reads the action-kind table: VSS steps' phases, undo, limits, names; one write-holding step; application needs a step that can prove it")
    func validator() throws {
        let policy = PlanPolicy.with { $0.name = "p"; $0.wanted = .application; $0.freezeBudgetMs = 10_000 }
        func problems(_ change: (inout Plan) -> Void) -> [String] { PlanValidator.problems(in: Self.vssPlan(change), policy: policy) }
        #expect(problems { _ in }.isEmpty)
        #expect(problems { $0.quiesce[0].action.vssFreeze.holdLimitMs = 20_000 } == ["step vss-freeze: hold_limit_ms 20000 is above VSS's limit of 10000 ms"])
        #expect(problems { $0.quiesce[0].action.vssFreeze.backupType = "incremental" } == ["step vss-freeze: backup_type \"incremental\" is not copy or full"])
        #expect(problems { $0.quiesce[0].action.vssFreeze.volumes = [] } == ["step vss-freeze adds no volume to the snapshot set"])
        #expect(problems { $0.quiesce[0].action.vssFreeze.retryOn = ["E_FAIL"] } == ["step vss-freeze: retry_on names \"E_FAIL\", not a VSS error this engine knows"])
        #expect(problems {
            $0.expected = .filesystem
            $0.quiesce[0].action.vssFreeze.includeWriters = false
            $0.quiesce[0].action.vssFreeze.excludeWritersNamed = ["X"]
        } == ["step vss-freeze names writers but leaves writers out (include_writers is false)"])
        #expect(problems { $0.quiesce[0].action.vssFreeze.includeWriters = false }
            == ["expects application but no quiesce step can prove more than filesystem (a freeze script, a hold, or VSS with writers)"])
        #expect(problems { $0.thaw[0].action.thaw = .init() } == ["step vss-freeze (vss-freeze) cannot be undone by vss-thaw (thaw)"])
        #expect(problems { $0.prepare = [$0.quiesce[0]]; $0.prepare[0].id = "early"; $0.prepare[0].undo = "" }.contains(
            "step early: vss-freeze steps belong in the quiesce phase, not prepare"))
        let two = problems {
            $0.quiesce.append(.with {
                $0.id = "freeze"
                $0.action.freeze = .with { $0.mountPoints = ["/data"] }
                $0.timeoutMs = 1000
                $0.undo = "thaw"
                $0.onFailure = .with { $0.downgradeTo = .crash; $0.reason = "freeze-failed" }
            })
            $0.thaw.insert(.with { $0.id = "thaw"; $0.action.thaw = .init(); $0.timeoutMs = 1000 }, at: 0)
        }
        #expect(two == ["the plan holds writes in 2 steps (vss-freeze, freeze); at most one: list every mount or volume in one step"], "\(two)")
        // A Linux plan claiming application with nothing but a freeze cannot prove it.
        let bare = problems { plan in
            plan.quiesce = [.with {
                $0.id = "freeze"
                $0.action.freeze = .with { $0.mountPoints = ["/"] }
                $0.timeoutMs = 1000
                $0.undo = "thaw"
                $0.onFailure = .with { $0.downgradeTo = .crash; $0.reason = "freeze-failed" }
            }]
            plan.thaw = [.with { $0.id = "thaw"; $0.action.thaw = .init(); $0.timeoutMs = 1000 }]
        }
        #expect(bare == ["expects application but no quiesce step can prove more than filesystem (a freeze script, a hold, or VSS with writers)"])
    }

    @Test("the action-kind table: every kind once, undo kinds that exist, write-holders in quiesce only, a proof for each level it claims")
    func table() {
        #expect(ActionKind.all.map(\.name) == ["run-hook", "freeze", "thaw", "hold", "release", "vss-freeze", "vss-thaw"])
        let names = Set(ActionKind.all.map(\.name))
        for kind in ActionKind.all {
            #expect(kind.undoneBy.isSubset(of: names), "\(kind.name)")
            if kind.holdsWrites { #expect(kind.phases == ["quiesce"], "\(kind.name)") }
            #expect(!kind.proof.isEmpty && !kind.blocks.isEmpty)
        }
        #expect(ActionKind.of(.with { $0.vssFreeze = .with { $0.includeWriters = false } })?.proves(.with { $0.vssFreeze = .init() }) == .filesystem)
        #expect(ActionKind.vssFreeze.proves(.with { $0.vssFreeze = .with { $0.includeWriters = true } }) == .application)
        #expect(ActionKind.of(PlanAction()) == nil)
        #expect(VssErrors.describe("VSS_E_WRITERERROR_NONRETRYABLE") == "VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)")
        #expect(VssErrors.describe("VSS_E_HOLD_WRITES_TIMEOUT") == "VSS_E_HOLD_WRITES_TIMEOUT (0x80042314)")
        #expect(VssErrors.states[9] == "FAILED_AT_FREEZE" && VssErrors.states[1] == "STABLE" && VssErrors.states[12] == "FAILED_AT_BACKUP_COMPLETE")
    }

    @Test("each kind's proof as code: the same evidence judged by freeze, hold and vss-freeze, every contradiction named, the rest proving nothing by themselves")
    func verdicts() {
        let good = ThawEvidence.Thaw(freezeID: "run-1", cause: "command", frozenMs: 4, withinBudget: true, holds: ["db": true])
        let freeze: PlanAction = .with { $0.freeze = .with { $0.mountPoints = ["/data"] } }
        let hold: PlanAction = .with { $0.hold = .with { $0.holdID = "db" } }
        let vssAction: PlanAction = .with { $0.vssFreeze = .with { $0.includeWriters = true } }
        func codes(_ kind: ActionKind, _ action: PlanAction, _ evidence: ThawEvidence) -> [String] {
            kind.verdict(action, evidence).map { "\($0.ceiling.name) \($0.reason.prefix { $0 != ":" })" }
        }
        func with(_ change: (inout ThawEvidence.Thaw) -> Void) -> ThawEvidence {
            var thaw = good
            change(&thaw)
            return ThawEvidence(freezeID: "run-1", thaw: thaw)
        }
        // freeze
        #expect(codes(.freeze, freeze, ThawEvidence(freezeID: "run-1", thaw: good)) == [])
        #expect(codes(.freeze, freeze, ThawEvidence(freezeID: "run-1")) == ["crash thaw-unproven"])
        #expect(codes(.freeze, freeze, with { $0.freezeID = "run-0" }) == ["crash thaw-mismatch"])
        #expect(codes(.freeze, freeze, with { $0.cause = "budget" }) == ["crash thawed-by-budget"])
        #expect(codes(.freeze, freeze, with { $0.cause = "engine-silent" }) == ["crash thawed-by-engine-silent"])
        #expect(codes(.freeze, freeze, with { $0.withinBudget = false }) == ["crash over-budget"])
        // hold
        #expect(codes(.hold, hold, ThawEvidence(freezeID: "run-1", thaw: good)) == [])
        #expect(codes(.hold, hold, with { $0.holds["db"] = false }) == ["crash hold-died"])
        #expect(codes(.hold, hold, with { $0.holds = [:] }) == ["crash hold-died"])
        #expect(codes(.hold, hold, ThawEvidence(freezeID: "run-1", thaw: good, brokenReleases: ["db": "hold-failed-at-release: exit 3"]))
            == ["filesystem hold-failed-at-release"])
        #expect(codes(.hold, hold, ThawEvidence(freezeID: "run-1", thaw: good, brokenReleases: ["other": "x: y"])) == [])
        // vss-freeze
        let set = "1f0e-set"
        func vss(_ change: (inout ThawEvidence.Vss) -> Void, thaw: ThawEvidence.Thaw? = good) -> ThawEvidence {
            var vss = ThawEvidence.Vss(setID: set, thawSetID: set, writesHeld: true,
                                       writersAfter: [.init(name: "SqlServerWriter", state: "STABLE"), .init(name: "Registry Writer", state: "STABLE")])
            change(&vss)
            return ThawEvidence(freezeID: "run-1", thaw: thaw, vss: vss)
        }
        #expect(codes(.vssFreeze, vssAction, vss { _ in }) == [])
        #expect(codes(.vssFreeze, vssAction, ThawEvidence(freezeID: "run-1", thaw: good)) == ["crash thaw-unproven"])
        #expect(codes(.vssFreeze, vssAction, vss { $0.thawSetID = nil }) == ["crash thaw-unproven"])
        #expect(codes(.vssFreeze, vssAction, vss { $0.thawSetID = "another" }) == ["crash vss-set-mismatch"])
        #expect(codes(.vssFreeze, vssAction, vss { $0.writesHeld = false; $0.error = "VSS_E_HOLD_WRITES_TIMEOUT" }) == ["crash vss-hold-timeout"])
        #expect(codes(.vssFreeze, vssAction, vss({ $0.writesHeld = false }, thaw: with { $0.cause = "guard" }.thaw)) == ["crash vss-hold-lost"])
        #expect(codes(.vssFreeze, vssAction, vss({ _ in }, thaw: with { $0.freezeID = "x" }.thaw)) == ["crash thaw-mismatch"])
        let failed = vss {
            $0.writersAfter[0] = .init(name: "SqlServerWriter", state: "FAILED_AT_FREEZE", lastError: "VSS_E_WRITERERROR_NONRETRYABLE", lastErrorCode: 0x8004_23F4)
            $0.writersAfter.append(.init(name: "Excluded Writer", state: "FAILED_AT_THAW", excluded: true))
            $0.failuresBeforeHold = ["vss-writer-failed: Registry Writer FAILED_AT_PREPARE_SNAPSHOT"]
        }
        #expect(ActionKind.vssFreeze.verdict(vssAction, failed).map(\.description) == [
            "filesystem vss-writer-failed: Registry Writer FAILED_AT_PREPARE_SNAPSHOT",
            "filesystem vss-writer-failed: SqlServerWriter FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)",
        ])
        // The kinds that prove nothing by themselves find nothing, whatever the evidence.
        for kind in [ActionKind.runHook, .thaw, .release, .vssThaw] {
            #expect(kind.verdict(PlanAction(), ThawEvidence(freezeID: "run-1")).isEmpty, "\(kind.name)")
        }
    }
}
