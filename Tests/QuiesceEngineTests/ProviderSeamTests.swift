import Foundation
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceFleet
import QuiesceProviders
import Synchronization
import Testing

/// The coordinator's provider paths — check before anything, throttles, lost
/// replies, adoption — driven through the in-memory provider with scripted
/// faults and a manual clock. No root: crash-consistent instances without agents.
@Suite("Provider seam: check, retry, throttle, adopt", .serialized)
struct ProviderSeamTests {
    /// The waits the coordinator asked for, in order: the manual clock.
    final class Clock: Sendable {
        let waits = Mutex<[Duration]>([])
        let provider: MemoryProvider
        init(_ provider: MemoryProvider) { self.provider = provider }
        func sleep(_ duration: Duration) async {
            self.waits.withLock { $0.append(duration) }
            self.provider.advance(duration)
        }
    }

    struct Setup {
        let fleet: Fleet
        let provider: MemoryProvider
        let clock: Clock
        let catalog: SQLiteCatalog
        let coordinator: Coordinator
        let bucket: TokenBucket
    }

    func withSetup(instances: [String] = ["m-1"], disks: Set<String>? = nil, retries: Int = 2, extra: String = "",
                   _ body: (Setup) async throws -> Void) async throws {
        let provider = MemoryProvider(disks: disks ?? Set(instances.flatMap { ["\($0)-a", "\($0)-b"] }), pendingPolls: 2)
        let registry = await PluginPlanRunTests.registry()
        defer { Task { await registry.shutdown() } }
        let text = """
            providers:
              mem: { kind: local, pool: /nonexistent-not-opened }
            policies:
              baseline: { plugin: crash, wanted: crash, retries: \(retries) }
            instances:

            """ + instances.map { "  - { id: \($0), policy: baseline, disks: [\($0)-a, \($0)-b] }\n" }.joined() + extra
            + "run: { agent_wait_s: 0 }\n"
        let file = try FleetFile.parse(text, path: "mem.yaml", plugins: registry)
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let catalog = try SQLiteCatalog(path: fleet.directory + "/catalog.db")
        let clock = Clock(provider)
        let bucket = TokenBucket(burst: 5, perSecond: 100)
        let coordinator = Coordinator(engine: fleet.engine, plugins: registry, providers: ["mem": .init(provider: provider, bucket: bucket)],
                                      catalog: catalog, fleet: file, sleep: { await clock.sleep($0) })
        try await body(Setup(fleet: fleet, provider: provider, clock: clock, catalog: catalog, coordinator: coordinator, bucket: bucket))
    }

    @Test("throttled creates: thawed, waited at least Retry-After on the manual clock, the rate cut, one group in the end; throttles do not use up retries")
    func throttles() async throws {
        try await self.withSetup(retries: 0) { s in
            s.provider.script(.create, [.throttle(retryAfter: .seconds(2)), .throttle(retryAfter: .seconds(3)), .throttle(retryAfter: nil)])
            let report = await s.coordinator.run(runID: "thr", agentWait: .zero)
            let outcome = try #require(report.instances.first)
            #expect(outcome.state == .succeeded && outcome.achieved == .crash, "\(outcome.reasons) \(outcome.warnings)")
            #expect(outcome.attempts == 4 && outcome.warnings.filter { $0.contains("throttled") }.count == 3, "\(outcome.warnings)")
            let waits = s.clock.waits.withLock { $0 }
            #expect(waits.count == 3 && waits[0] >= .seconds(2) && waits[1] >= .seconds(3), "\(waits)")
            #expect(s.provider.now >= .seconds(5))
            #expect(s.provider.calls(.create) == 4 && s.provider.createsDone == 1 && s.provider.groups.count == 1)
            let (throttles, lowest) = (await s.bucket.throttles, await s.bucket.lowestPerSecond)
            // Three throttles within a second: the first alone is noise, the second cuts to 85 %, the third is the same signal.
            #expect(throttles == 3 && abs(lowest - 85) < 0.01, "\(throttles) \(lowest)")
            // Pending for two polls, then ready: waited outside the window.
            let group = try #require(try await s.catalog.groups(GroupFilter(runID: "thr")).first)
            #expect(group.state == .ready && group.provider == "mem" && group.providerKind == "memory")
            #expect(group.tags["quiesce:level"] == "crash" && group.tags["AppConsistent"] == "false" && group.tags["quiesce:token"] == "thr/m-1")
        }
    }

    @Test("a create whose reply is lost: the group made is found by its token, deleted (no proven level) and taken again — never two")
    func lostReply() async throws {
        try await self.withSetup { s in
            s.provider.script(.create, [.lostReply])
            let report = await s.coordinator.run(runID: "lost", agentWait: .zero)
            let outcome = try #require(report.instances.first)
            #expect(outcome.state == .succeeded, "\(outcome.reasons) \(outcome.warnings)")
            #expect(outcome.warnings.contains { $0.hasPrefix("discarded:") }, "\(outcome.warnings)")
            #expect(s.provider.groups.count == 1 && s.provider.createsDone == 2)
            #expect(try await s.catalog.groups(GroupFilter(runID: "lost")).count == 1)
        }
    }

    @Test("rerun and resume: a recorded group is not taken again; one made by a process that died before recording is adopted at its tagged level")
    func adoption() async throws {
        try await self.withSetup(instances: ["m-1", "m-2"]) { s in
            let first = await s.coordinator.run(runID: "again", agentWait: .zero)
            #expect(first.exitCode == 0)
            #expect(s.provider.createsDone == 2)
            // The same run again: nothing new.
            let second = await s.coordinator.run(runID: "again", agentWait: .zero)
            #expect(second.exitCode == 0 && second.instances.allSatisfy { $0.warnings.contains { $0.hasPrefix("already-done") } }, "\(second.instances.map(\.warnings))")
            #expect(s.provider.createsDone == 2)
            // A group at the provider that the catalog never recorded (the engine died after create and tag).
            let orphan = try await s.provider.createGroup(CreateGroupRequest(disks: ["m-1-a", "m-1-b"], tags: ["quiesce:run": "resume"], idempotencyToken: "resume/m-1"))
            _ = try await s.provider.tag(orphan.id, ["quiesce:level": "crash"])
            // And one that died before it was even tagged with a level.
            _ = try await s.provider.createGroup(CreateGroupRequest(disks: ["m-2-a", "m-2-b"], idempotencyToken: "resume/m-2"))
            let resumed = await s.coordinator.run(runID: "resume", agentWait: .zero)
            let by = Dictionary(uniqueKeysWithValues: resumed.instances.map { ($0.instanceID, $0) })
            #expect(by["m-1"]?.reasons.first?.hasPrefix("adopted:") == true && by["m-1"]?.groupID == orphan.id, "\(by["m-1"]!.reasons)")
            #expect(by["m-2"]?.reasons.first?.hasPrefix("adopted-unproven:") == true && by["m-2"]?.achieved == .crash, "\(by["m-2"]!.reasons)")
            #expect(s.provider.createsDone == 4 && s.provider.groups.count == 4)
            #expect(try await s.catalog.groups(GroupFilter(runID: "resume")).count == 2)
        }
    }

    @Test("the check runs before anything: an unknown disk fails its instance, a missing permission fails them all, and nothing is created")
    func check() async throws {
        try await self.withSetup(instances: ["m-1", "m-2"], disks: ["m-1-a", "m-1-b", "m-2-a"]) { s in
            let report = await s.coordinator.run(runID: "chk", agentWait: .zero)
            let by = Dictionary(uniqueKeysWithValues: report.instances.map { ($0.instanceID, $0) })
            #expect(by["m-1"]?.state == .succeeded)
            #expect(by["m-2"]?.state == .failed && by["m-2"]?.reasons == ["provider-check: mem disks: no such disk: m-2-b; nothing was frozen"], "\(by["m-2"]!.reasons)")
            #expect(s.provider.calls(.create) == 1)
            s.provider.script(.check, [.denied])
            let denied = await s.coordinator.run(runID: "chk-2", agentWait: .zero)
            #expect(denied.exitCode == 3 && denied.instances.allSatisfy { $0.reasons.contains { $0.contains("permission memory:create: missing") } })
            #expect(s.provider.calls(.create) == 1)
        }
    }

    @Test("transient errors past the policy's retries fail the instance with the provider's words; prepare's throttles are retried too")
    func transient() async throws {
        try await self.withSetup(retries: 1) { s in
            // The first throttle meets the run's one batched prepare (the instance then prepares on its own), the second that.
            s.provider.script(.prepare, [.throttle(retryAfter: .milliseconds(500)), .throttle(retryAfter: .milliseconds(500))])
            s.provider.script(.create, [.transient, .transient])
            let report = await s.coordinator.run(runID: "tr", agentWait: .zero)
            let outcome = try #require(report.instances.first)
            #expect(outcome.state == .failed && outcome.attempts == 3, "\(outcome.attempts) \(outcome.reasons)")
            #expect(outcome.reasons.contains { $0.contains("memory: create failed (scripted)") }, "\(outcome.reasons)")
            #expect(s.provider.createsDone == 0 && s.provider.calls(.prepare) == 4, "\(s.provider.calls(.prepare))")
            #expect(outcome.warnings.contains { $0.contains("throttled at prepare") }, "\(outcome.warnings)")
        }
    }
}
