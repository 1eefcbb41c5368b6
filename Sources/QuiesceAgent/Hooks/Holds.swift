import Foundation
import GRPCCore
import QuiesceWire
import QuiesceCore
import QuiesceProto
import Synchronization

/// Hooks whose lifetime spans a freeze: a database client holding
/// FLUSH TABLES WITH READ LOCK is the classic one. A hold is ready when it
/// prints its ready line; it runs until released, until its maximum time, or
/// until it dies by itself — which the thaw reply then reports.
public final class Holds: Sendable {
    public static let defaultReadyTimeout: Duration = .seconds(30)
    public static let defaultMaxHold: Duration = .seconds(60)
    /// SIGTERM first on release; SIGKILL after this.
    public static let terminateGrace: Duration = .seconds(2)

    private final class Hold: Sendable {
        let id: String
        let process: ChildProcess
        let readyAt: ContinuousClock.Instant
        /// Ends the hold at its maximum time and collects output meanwhile.
        let pumpTask: Mutex<Task<Void, Never>?> = Mutex(nil)
        init(id: String, process: ChildProcess, readyAt: ContinuousClock.Instant) {
            self.id = id
            self.process = process
            self.readyAt = readyAt
        }
    }

    private let holds = Mutex<[String: Hold]>([:])
    private let runner: HookRunner
    /// Told when a hold dies before its release.
    private let onDeath: @Sendable (String, String) -> Void

    public init(runner: HookRunner, onDeath: @escaping @Sendable (String, String) -> Void = { _, _ in }) {
        self.runner = runner
        self.onDeath = onDeath
    }

    /// Starts a hold and waits until it prints its ready line.
    public func start(_ request: Quiesce_Agent_V1_HoldRequest) async -> (AgentStatus, Quiesce_Agent_V1_HoldResult) {
        var result = Quiesce_Agent_V1_HoldResult()
        result.holdID = request.holdID
        guard !request.holdID.isEmpty else {
            return (.init(code: .invalidArgument, message: "expected a hold id, found an empty one", reason: "bad-request"), result)
        }
        guard !request.readyLine.isEmpty else {
            return (.init(code: .invalidArgument, message: "expected a ready line for hold \(request.holdID), found an empty one", reason: "bad-request"), result)
        }
        if self.holds.withLock({ $0[request.holdID] != nil }) {
            return (.init(code: .alreadyExists, message: "hold \(request.holdID) is already running", reason: "hold-exists"), result)
        }
        let (box, fact) = self.runner.check(request.hook)
        guard let box else {
            result.refusal = fact.refusal
            result.detail = HookInspector.explain(fact)
            return (.init(code: .failedPrecondition, message: result.detail, reason: "hook-" + fact.refusal.reasonCode), result)
        }
        let process: ChildProcess
        do {
            process = try ChildProcess(
                descriptor: box.descriptor, name: fact.name, arguments: request.args,
                environment: HookRunner.environment(hook: fact.name), outputCap: 16 * 1024)
        } catch {
            result.detail = "\(error)"
            return (.init(code: .internalError, message: result.detail, reason: "hold-spawn-failed"), result)
        }
        box.close()
        let readyTimeout: Duration = request.readyTimeoutMs > 0 ? .milliseconds(Int64(request.readyTimeoutMs)) : Self.defaultReadyTimeout
        let readyLine = request.readyLine
        let end = await withTaskCancellationHandler {
            (try? await DedicatedThread.run(name: "quiesce-hold") { process.pump(until: .now + readyTimeout, readyLine: readyLine) }) ?? .interrupted
        } onCancel: {
            process.interrupt()
        }
        guard end == .readyLine else {
            _ = try? await DedicatedThread.run { process.killGroupAndReap() }
            let output = String(decoding: (process.stdout.bytes + process.stderr.bytes).suffix(512), as: UTF8.self)
            switch end {
            case .exited:
                let how = process.exit.map { $0.exited ? "exit code \($0.code)" : "signal \($0.signal)" } ?? "unknown status"
                result.detail = "\(fact.name) ended (\(how)) before printing \"\(readyLine)\"; output: \(output)"
                return (.init(code: .aborted, message: result.detail, reason: "hold-died"), result)
            case .deadline:
                result.detail = "\(fact.name) did not print \"\(readyLine)\" within \(readyTimeout); killed. Output: \(output)"
                return (.init(code: .deadlineExceeded, message: result.detail, reason: "hold-not-ready"), result)
            default:
                result.detail = "hold \(request.holdID) was cancelled before it was ready; killed"
                return (.init(code: .cancelled, message: result.detail, reason: "cancelled"), result)
            }
        }
        result.ready = true
        result.readyAfterUs = process.elapsedMicros
        let hold = Hold(id: request.holdID, process: process, readyAt: .now)
        let maxHold: Duration = request.maxHoldMs > 0 ? .milliseconds(Int64(request.maxHoldMs)) : Self.defaultMaxHold
        self.holds.withLock { $0[request.holdID] = hold }
        // Keep draining its output (a full pipe would block it) until it exits or its time is up.
        let onDeath = self.onDeath
        hold.pumpTask.withLock { $0 = Task.detached {
            let end = (try? await DedicatedThread.run(name: "quiesce-hold") { process.pump(until: hold.readyAt + maxHold) }) ?? .interrupted
            switch end {
            case .exited:
                let how = process.exit.map { $0.exited ? "exit code \($0.code)" : "signal \($0.signal)" } ?? "unknown status"
                onDeath(hold.id, "hold \(hold.id) ended by itself (\(how))")
            case .deadline:
                _ = try? await DedicatedThread.run { process.killGroupAndReap() }
                onDeath(hold.id, "hold \(hold.id) reached its maximum of \(maxHold) and was killed")
            default: break  // released
            }
        } }
        return (.ok, result)
    }

    /// Ends a hold: SIGTERM to its group, SIGKILL after a grace period.
    public func release(_ id: String) async -> (AgentStatus, Quiesce_Agent_V1_ReleaseResult) {
        var result = Quiesce_Agent_V1_ReleaseResult()
        result.holdID = id
        guard let hold = self.holds.withLock({ $0.removeValue(forKey: id) }) else {
            return (.init(code: .notFound, message: "no hold named \"\(id)\" is running", reason: "unknown-hold"), result)
        }
        let process = hold.process
        result.aliveAtRelease = !process.hasExited
        process.interrupt()
        await hold.pumpTask.withLock { $0 }?.value
        _ = try? await DedicatedThread.run(name: "quiesce-release") {
            if !process.hasExited {
                process.signalGroup(SIGTERM)
                _ = process.pump(until: .now + Self.terminateGrace)
            }
            process.killGroupAndReap()
        }
        if let exit = process.exit {
            result.exited = exit.exited
            result.exitCode = exit.code
            result.signal = exit.signal
        }
        result.heldUs = UInt64(max((ContinuousClock.now - hold.readyAt).nanoseconds / 1000, 0))
        result.outputTail = Data((process.stdout.bytes + process.stderr.bytes).suffix(4096))
        return (.ok, result)
    }

    /// Whether each running hold is alive now (for the thaw reply).
    public func states() -> [Quiesce_Agent_V1_HoldState] {
        self.holds.withLock { holds in
            holds.values.sorted { $0.id < $1.id }.map { hold in
                var state = Quiesce_Agent_V1_HoldState()
                state.holdID = hold.id
                state.aliveAtThaw = !hold.process.hasExited && hold.process.groupAlive
                return state
            }
        }
    }

    /// Ends every hold (agent shutdown).
    public func releaseAll() async {
        for id in self.holds.withLock({ Array($0.keys) }) { _ = await self.release(id) }
    }
}
