import Foundation
import QuiesceCatalog
import QuiesceCoordinator
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiesceLocalProvider
import QuiescePlugins
import QuiesceTestSupport
import Synchronization
import Testing

/// A clock the test moves.
final class TestClock: Sendable {
    let time: Mutex<Date>
    init(_ start: Date) { self.time = Mutex(start) }
    var now: Date { self.time.withLock { $0 } }
    func advance(_ seconds: TimeInterval) { self.time.withLock { $0 = $0.addingTimeInterval(seconds) } }
}

final class Firings: Sendable {
    let list = Mutex<[Scheduler.Firing]>([])
    func append(_ firing: Scheduler.Firing) { self.list.withLock { $0.append(firing) } }
    var all: [Scheduler.Firing] { self.list.withLock { $0 } }
    func wait(for count: Int, timeout: Duration = .seconds(10)) async -> [Scheduler.Firing] {
        let until = ContinuousClock.now + timeout
        while self.all.count < count, ContinuousClock.now < until { try? await Task.sleep(for: .milliseconds(10)) }
        return self.all
    }
}

/// `quiesce serve`'s unattended side without root: schedules on a clock the test moves, runs of
/// an instance with no agent (a crash-consistent snapshot, its policy allows it) into a local
/// pool in a plain directory, the catalog, and retention after each run.
@Suite("Schedules and retention", .serialized)
struct ScheduleTests {
    struct Setup {
        var fleet: Fleet
        var provider: LocalProvider
        var catalog: SQLiteCatalog
        var runs: FleetRunService
        var file: FleetFile
        var registry: PluginRegistry
    }

    static func setUp(agentWait: Int = 0, retention: String = "") async throws -> Setup {
        let fleet = try await Fleet.start()
        let provider = try LocalProvider(pool: fleet.directory + "/pool")
        #expect(FileManager.default.createFile(atPath: try provider.diskPath("lone-data"), contents: Data(count: 65_536)))
        let registry = await PluginPlanRunTests.registry()
        let text = """
            providers:
              pool: { kind: local, pool: \(provider.pool) }
            policies:
              base: { plugin: crash, wanted: crash\(retention) }
            instances:
              - { id: lone, policy: base, disks: [lone-data] }
            schedules:
              every-minute: { cron: "* * * * *" }
            run: { agent_wait_s: \(agentWait) }
            """
        let file = try FleetFile.parse(text, path: fleet.directory + "/fleet.yaml", plugins: registry)
        let catalog = try SQLiteCatalog(path: fleet.directory + "/catalog.db")
        let runs = FleetRunService(engine: fleet.engine, plugins: registry, catalog: catalog)
        return Setup(fleet: fleet, provider: provider, catalog: catalog, runs: runs, file: file, registry: registry)
    }

    @Test("first start does not catch up; a firing starts a run; one that comes while its previous run goes on is skipped; a restart after missed firings runs once")
    func firings() async throws {
        // Each run waits 2 s for the agent that never comes: long enough to overlap the next firing.
        let s = try await Self.setUp(agentWait: 2)
        defer { s.fleet.discard() }
        defer { Task { await s.registry.shutdown() } }
        let clock = TestClock(Date(timeIntervalSince1970: 1_796_000_000))  // a minute boundary plus 20 s
        let statePath = s.fleet.directory + "/schedules.json"
        let firings = Firings()
        let scheduler = Scheduler(fleets: [s.file], runs: s.runs, statePath: statePath, now: { clock.now }, tick: .milliseconds(20),
                                  observe: firings.append)
        let task = Task { await scheduler.run() }
        try await Task.sleep(for: .milliseconds(200))
        #expect(firings.all.isEmpty, "no catch-up the first time a schedule is seen")
        #expect(FileManager.default.fileExists(atPath: statePath))

        clock.advance(60)  // past the next minute
        var seen = await firings.wait(for: 1)
        guard case .started(let name, let firstRun, let missed)? = seen.first else { Issue.record("\(seen)"); return }
        #expect(name == "every-minute" && !missed && firstRun.hasPrefix("every-minute-2026"))
        // The next minute comes while that run still waits for its agent: skipped, not queued.
        clock.advance(60)
        seen = await firings.wait(for: 2)
        #expect(seen.count == 2 && seen[1] == .skippedOverlap(schedule: "every-minute", runningRun: firstRun), "\(seen)")
        // The run finishes and is recorded.
        for _ in 0..<200 where scheduler.running.count > 0 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(scheduler.running.isEmpty)
        #expect(try await s.catalog.run(firstRun)?.state == .succeeded)
        #expect(try await s.catalog.groups(GroupFilter(runID: firstRun)).count == 1)

        // The engine goes down for ten minutes: ten firings missed, one run when it comes back.
        task.cancel()
        await task.value
        clock.advance(600)
        let before = firings.all.count
        let again = Scheduler(fleets: [s.file], runs: s.runs, statePath: statePath, now: { clock.now }, tick: .milliseconds(20), observe: firings.append)
        let second = Task { await again.run() }
        seen = await firings.wait(for: before + 1)
        try await Task.sleep(for: .milliseconds(300))
        seen = firings.all
        #expect(seen.count == before + 1, "missed firings run once, not ten times: \(seen)")
        guard case .started(_, let caughtUp, true)? = seen.last else { Issue.record("\(seen)"); return }
        for _ in 0..<200 where again.running.count > 0 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(try await s.catalog.run(caughtUp)?.state == .succeeded)
        second.cancel()
        await second.value
    }

    @Test("retention after each run: keep_last 2 leaves the two newest groups at the provider and in the catalog; the report names what went")
    func retention() async throws {
        let s = try await Self.setUp(retention: ", retention: { keep_last: 2 }")
        defer { s.fleet.discard() }
        defer { Task { await s.registry.shutdown() } }
        let providers = try ProviderSet().providers(for: s.file)
        let coordinator = Coordinator(engine: s.fleet.engine, plugins: s.registry, providers: providers, catalog: s.catalog, fleet: s.file)
        var made: [String] = []
        var pruned: [String] = []
        for index in 1...4 {
            let report = await coordinator.run(runID: "keep-\(index)", agentWait: .zero)
            let outcome = try #require(report.instances.first)
            #expect(outcome.state == .succeeded, "\(outcome.reasons)")
            made.append(try #require(outcome.groupID))
            pruned += outcome.pruned
            #expect(outcome.pruned.count == (index > 2 ? 1 : 0), "run \(index): \(outcome.pruned)")
            if index > 2 { #expect(report.renderTable().contains("Retention deleted 1 older group(s): lone \(made[index - 3])")) }
        }
        #expect(pruned == Array(made.prefix(2)))
        #expect(Set(try await s.catalog.groups(GroupFilter(instanceID: "lone")).map(\.id)) == Set(made.suffix(2)))
        #expect(Set(try await s.provider.list(tags: [:]).map(\.id)) == Set(made.suffix(2)))
    }
}
