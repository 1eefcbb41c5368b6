import Foundation
import GRPCCore
import Logging
import QuiesceCatalog
import QuiesceCore
import QuiesceEngine
import QuiesceFleet
import QuiescePlugins
import QuiesceProto
import Synchronization

/// `quiesce.admin.v1.Runs`: fleet runs inside a running engine (`quiesce serve`).
///
/// A run belongs to the engine, not to the client that asked for it: the
/// coordinator runs in its own task, the client's stream only watches it, and a
/// client that goes away stops nothing. Two runs may not share an instance (two
/// freezes of one guest at once would fight over its filesystems).
public final class FleetRunService: Quiesce_Admin_V1_Runs.SimpleServiceProtocol, Sendable {
    let engine: Engine
    let plugins: PluginRegistry
    let catalog: (any CatalogStore)?
    let providers: ProviderSet
    let logger: Logger
    /// Hears every run's report, when it is recorded (the metrics).
    let finished: @Sendable (RunReport) -> Void
    private let state = Mutex<State>(State())

    private struct State {
        var runs: [String: Active] = [:]
        var stopping: String?
    }

    private struct Active {
        var instances: Set<String>
        var coordinator: Coordinator
        var task: Task<RunReport, Never>
    }

    public init(engine: Engine, plugins: PluginRegistry, catalog: (any CatalogStore)?, providers: ProviderSet = ProviderSet(),
                logger: Logger = Logger(label: "quiesce.runs"), finished: @escaping @Sendable (RunReport) -> Void = { _ in }) {
        self.finished = finished
        self.engine = engine
        self.plugins = plugins
        self.catalog = catalog
        self.providers = providers
        self.logger = logger
    }

    public func runFleet(request: Quiesce_Admin_V1_RunFleetRequest, response: RPCWriter<Quiesce_Admin_V1_RunFleetEvent>,
                         context: ServerContext) async throws {
        var path = request.fleetPath.isEmpty ? "(fleet)" : request.fleetPath
        var yaml = request.fleetYaml
        if request.resume {
            do {
                let run = try await Coordinator.resumable(request.runID, catalog: self.catalog)
                if yaml.isEmpty {
                    guard let data = FileManager.default.contents(atPath: run.source) else {
                        throw RPCError(code: .invalidArgument, message: "\(run.source): (file): cannot read the fleet file run \(request.runID) was started with; give it (--fleet)")
                    }
                    (yaml, path) = (String(decoding: data, as: UTF8.self), run.source)
                }
            } catch let refusal as Coordinator.ResumeRefusal {
                switch refusal {
                case .running: throw RPCError(code: .failedPrecondition, message: refusal.description)
                case .finished: throw RPCError(code: .alreadyExists, message: refusal.description)
                default: throw RPCError(code: .notFound, message: refusal.description)
                }
            }
        }
        let fleet: FleetFile
        let providers: [String: Coordinator.Provider]
        do {
            fleet = try FleetFile.parse(yaml, path: path, plugins: self.plugins)
            providers = try self.providers.providers(for: fleet)
        } catch let error as FleetFileError {
            throw RPCError(code: .invalidArgument, message: error.description)
        }
        let runID = request.runID.isEmpty ? Coordinator.newRunID() : request.runID
        if let problem = Coordinator.runIDProblem(runID) {
            throw RPCError(code: .invalidArgument, message: "run_id: \(problem)")
        }
        let coordinator = Coordinator(engine: self.engine, plugins: self.plugins, providers: providers, catalog: self.catalog, fleet: fleet)
        let (events, sink) = AsyncStream<Quiesce_Admin_V1_RunFleetEvent>.makeStream()
        let agentWait: Duration? = request.agentWaitS == 0 ? nil : .seconds(Int64(request.agentWaitS))
        try self.reserve(runID, instances: Set(fleet.instances.map(\.id)), coordinator: coordinator) {
            // Not a child of this handler: the run goes on when the client goes away.
            Task {
                let report = await coordinator.run(runID: runID, agentWait: agentWait, resume: request.resume) { sink.yield($0.proto) }
                sink.yield(.with { $0.report = report.proto })
                sink.finish()
                self.finished(report)
                self.logger.info("run finished", metadata: [
                    "run": "\(runID)", "exit_code": "\(report.exitCode)", "makespan_ms": "\(report.makespan.milliseconds)",
                ])
                _ = self.state.withLock { $0.runs.removeValue(forKey: runID) }
                return report
            }
        }
        self.logger.info("run started", metadata: ["run": "\(runID)", "fleet": "\(path)", "instances": "\(fleet.instances.count)"])

        let address = (try? await self.engine.listeningAddress().description) ?? ""
        try await response.write(.with {
            $0.accepted = .with {
                $0.runID = runID
                $0.instances = UInt32(fleet.instances.count)
                $0.agentListenAddress = address
            }
        })
        for await event in events {
            // A client that went away ends this loop with an error; the run goes on.
            try await response.write(event)
        }
    }

    /// A run a schedule fired (`quiesce serve --fleet FILE`): admitted like any other (refused
    /// while one of its instances is in another run), recorded in the catalog, its audit entries
    /// naming the schedule. `finished` hears its report.
    public func startScheduled(fleet: FleetFile, runID: String, schedule: String,
                               finished: @escaping @Sendable (RunReport) -> Void = { _ in }) throws -> Task<RunReport, Never> {
        let providers = try self.providers.providers(for: fleet)
        let coordinator = Coordinator(engine: self.engine, plugins: self.plugins, providers: providers, catalog: self.catalog, fleet: fleet)
        var started: Task<RunReport, Never>?
        try self.reserve(runID, instances: Set(fleet.instances.map(\.id)), coordinator: coordinator) {
            let task = Task {
                let report = await AuditContext.$actor.withValue("schedule:\(schedule)") {
                    await coordinator.run(runID: runID) { _ in }
                }
                self.logger.info("scheduled run finished", metadata: [
                    "schedule": "\(schedule)", "run": "\(runID)", "exit_code": "\(report.exitCode)", "makespan_ms": "\(report.makespan.milliseconds)",
                ])
                self.finished(report)
                _ = self.state.withLock { $0.runs.removeValue(forKey: runID) }
                finished(report)
                return report
            }
            started = task
            return task
        }
        return started!
    }

    /// Admits the run (or throws why not) and starts it, in one step: a run is never
    /// reserved without its task, so ``drain(reason:)`` always has it to wait for.
    private func reserve(_ runID: String, instances: Set<String>, coordinator: Coordinator,
                         start: () -> Task<RunReport, Never>) throws {
        try self.state.withLock { state in
            if let reason = state.stopping {
                throw RPCError(code: .failedPrecondition, message: "the engine is not starting runs: \(reason)")
            }
            if state.runs[runID] != nil {
                throw RPCError(code: .alreadyExists, message: "run \(runID) is already running in this engine")
            }
            for (other, active) in state.runs.sorted(by: { $0.key < $1.key }) {
                let shared = active.instances.intersection(instances)
                if !shared.isEmpty {
                    let names = shared.sorted()
                    throw RPCError(code: .failedPrecondition, message:
                        "\(names.prefix(5).joined(separator: ", "))\(names.count > 5 ? " and \(names.count - 5) more" : "") "
                        + "\(names.count == 1 ? "is" : "are") already being backed up by run \(other); two freezes of one instance at once are refused")
                }
            }
            state.runs[runID] = Active(instances: instances, coordinator: coordinator, task: start())
        }
    }

    /// The runs in progress, by id.
    public var running: [String] { self.state.withLock { $0.runs.keys.sorted() } }

    /// For a graceful stop: refuses new runs, lets running instances finish (their
    /// freezes are never cut short), reports the rest as not started, and returns
    /// when every run has recorded its report.
    public func drain(reason: String) async {
        // Once `stopping` is set no run is admitted, so the runs taken here are all there will be.
        let tasks = self.state.withLock { state -> [Task<RunReport, Never>] in
            if state.stopping == nil { state.stopping = reason }
            for active in state.runs.values { active.coordinator.stopStarting(reason: reason) }
            return state.runs.values.map(\.task)
        }
        for task in tasks { _ = await task.value }
    }
}
