import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceFleet

/// A run in a catalog several engines share (PostgreSQL).
///
/// Every engine that runs the fleet under the same run id enters the run and adds its units
/// (an instance, or a consistency group's members together). Each then claims units whose
/// agents are connected to it, one at a time, with `FOR UPDATE SKIP LOCKED`: no unit is done by
/// two engines. A claim is a lease the engine renews every third of its length; when an engine
/// dies, its units open up again once its lease runs out and another engine takes them over —
/// with the run's idempotency tokens, so a group the dead engine had already made is adopted,
/// never made twice (invariant 7). Units no engine has agents for are given up as agentless
/// (crash-consistent or failed, as their policy says) once the agent wait is over and no engine
/// in the run is still working. The run is finished by whichever engine sees the last unit done,
/// with a state computed from every engine's outcomes.
extension Coordinator {
    enum SharedEvent: Sendable {
        case finished(InstanceOutcome, unit: String)
        case tick
    }

    func runShared(_ shared: any SharedCatalog, runID: String, units: [[FleetFile.Instance]], done: [String: InstanceOutcome],
                   wait: Duration, started: ContinuousClock.Instant, events: @escaping @Sendable (RunEvent) -> Void) async -> RunReport {
        let workUnits = units.enumerated().map { position, unit in
            WorkUnit(key: self.fleet.group(of: unit[0].id).map { "group:\($0.name)" } ?? unit[0].id, members: unit.map(\.id), position: position)
        }
        do {
            let entry = try await shared.enterRun(RunRecord(id: runID, source: self.fleet.path))
            var reopen = true
            if case .joined(let engines) = entry {
                events(.joinedRun(engines: engines))
                reopen = false
            }
            // A run taken up again (a rerun of its id, a resume) goes over its units again, as on SQLite:
            // what was made is found by the run's tokens and not made twice. Joining takes them as they are.
            try await shared.enqueue(runID: runID, units: workUnits, reopen: reopen)
        } catch {
            // Without the shared catalog, nothing says which engine does what: nothing is frozen.
            let outcomes = units.joined().map { instance in
                var outcome = self.emptyOutcome(instance)
                outcome.reasons = ["catalog-unavailable: the shared catalog could not be reached (\(error)); nothing was frozen"]
                return outcome
            }
            return RunReport(runID: runID, instances: outcomes, makespan: .now - started)
        }
        let renewer = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: shared.lease / 3)
                try? await shared.renewLeases()
            }
        }
        await self.checkProviders(runID: runID, events: events)
        let meanwhile = Task { await self.settleMeanwhile() }
        let rendezvous = self.rendezvous()
        let byID = Dictionary(uniqueKeysWithValues: self.fleet.instances.map { ($0.id, $0) })
        let limit = max(1, self.fleet.concurrency)
        let largest = units.map(\.count).max() ?? 1
        let wanted = Set(self.fleet.instances.map(\.id))
        let outcomes = await withTaskGroup(of: SharedEvent.self) { group in
            var results: [InstanceOutcome] = []
            var running = 0
            var left: [String: Int] = [:]
            var ticking = false
            var working = true
            var unitWarnings: [String: [String]] = [:]
            while true {
                // Claim while there is room: first what this engine's agents can do, then (the agent
                // wait over, nobody else working) what no engine can.
                var claimed = false
                while self.stopping.withLock({ $0 == nil }), running == 0 || running + largest <= limit {
                    let serving = wanted.subtracting(await self.engine.registry.waitFor(wanted, timeout: .zero))
                    var claim = try? await shared.claim(runID: runID, serving: serving)
                    if claim == nil, ContinuousClock.now - started >= wait, (try? await shared.progress(runID: runID))?.othersWorking == 0 {
                        claim = try? await shared.claim(runID: runID, serving: nil)
                    }
                    guard let claim else { break }
                    claimed = true
                    let members = claim.unit.members.compactMap { byID[$0] }
                    left[claim.unit.key] = members.count
                    running += members.count
                    var warnings: [String] = []
                    if let engine = claim.takenOverFrom {
                        warnings.append("taken-over: engine \(engine) held this unit and stopped renewing its lease; this engine did it")
                        // What this engine's batched prepare saw at the start is stale: the other engine may
                        // have made a group since. Each member looks again, and adopts it (invariant 7).
                        self.firstPrepared.withLock { prepared in
                            for member in members { prepared.removeValue(forKey: "\(runID)/\(member.id)") }
                        }
                    }
                    unitWarnings[claim.unit.key] = warnings
                    if let (member, other) = claim.busy.first {
                        for instance in members {
                            group.addTask {
                                var outcome = self.emptyOutcome(instance)
                                outcome.reasons = ["instance-busy: \(member) is in run \(other) (another engine's); nothing was frozen"]
                                await self.record(&outcome, runID: runID, started: .now)
                                events(.instanceFinished(outcome))
                                return .finished(outcome, unit: claim.unit.key)
                            }
                        }
                        continue
                    }
                    for instance in members {
                        group.addTask {
                            .finished(await self.start(instance, runID: runID, wait: wait, rendezvous: rendezvous, events: events), unit: claim.unit.key)
                        }
                    }
                }
                let busy = claimed || running > 0
                if busy != working {
                    working = busy
                    try? await shared.setWorking(runID: runID, busy)
                }
                if running == 0 {
                    let progress = try? await shared.progress(runID: runID)
                    if progress?.finished ?? true || self.stopping.withLock({ $0 != nil }) { break }
                }
                if !ticking {
                    ticking = true
                    group.addTask {
                        try? await Task.sleep(for: .milliseconds(250))
                        return .tick
                    }
                }
                guard let event = await group.next() else { break }
                switch event {
                case .tick:
                    ticking = false
                case .finished(var outcome, let unit):
                    running -= 1
                    outcome.warnings += unitWarnings[unit] ?? []
                    left[unit, default: 1] -= 1
                    if left[unit] == 0 {
                        do {
                            try await shared.complete(runID: runID, unit: unit)
                        } catch {
                            outcome.warnings.append("catalog-write-failed: unit \(unit) could not be marked done: \(error)")
                        }
                    }
                    results.append(outcome)
                }
            }
            group.cancelAll()
            for await event in group {
                if case .finished(let outcome, _) = event { results.append(outcome) }
            }
            return results
        }
        let concluded = await self.conclude(outcomes, done: done, meanwhile: meanwhile, only: Set(outcomes.map { $0.instanceID }), events: events)
        renewer.cancel()
        await renewer.value
        // The last engine out finishes the run from every engine's outcomes; the others leave it.
        var runError: (any Error)?
        do {
            if (try await shared.progress(runID: runID)).finished {
                let all = try await shared.instances(ofRun: runID)
                try await shared.finishRun(runID, state: RunState(outcomes: all.map(\.state)), at: Date())
            } else {
                try await shared.leaveRun(runID)
            }
        } catch {
            runError = error
        }
        var report = RunReport(runID: runID, instances: concluded, makespan: .now - started)
        report.otherEngines = wanted.count - concluded.count
        if let runError {
            for index in report.instances.indices {
                report.instances[index].warnings.append("catalog-write-failed: run \(runID) could not be recorded as finished: \(runError)")
            }
        }
        return report
    }
}
