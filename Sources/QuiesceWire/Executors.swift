import Foundation
import NIOCore
import NIOPosix
import QuiesceCore

/// Where Swift concurrency's jobs run.
public enum ConcurrencyExecutor {
    /// Runs every task on NIO's event loop threads (the ones that do the
    /// network I/O) instead of a separate cooperative pool, so a message that
    /// arrives, the task it resumes and the reply it sends stay on one thread:
    /// no hand-over between pools per hop. Call first thing in `main`.
    /// `QUIESCE_EXECUTOR=pool` keeps Swift's own pool (to compare).
    ///
    /// Blocking calls stay forbidden there, as on the cooperative pool
    /// (ARCHITECTURE.md invariant 9): they go to ``DedicatedThread``.
    ///
    /// - Parameter threads: How many event loop threads (nil: one per core). The
    ///   agent uses one: it serves one session, and a single loop means a reply
    ///   never waits for a wake-up of another thread to reach its connection.
    ///   `QUIESCE_EVENT_LOOPS=N` in the environment overrides it.
    @discardableResult
    public static func useEventLoops(threads: Int? = nil) -> Bool {
        let override = getenv("QUIESCE_EVENT_LOOPS").flatMap { Int(String(cString: $0)) }.flatMap { $0 > 0 ? $0 : nil }
        if let threads = override ?? threads { NIOSingletons.groupLoopCountSuggestion = threads }
        if getenv("QUIESCE_EXECUTOR").map({ String(cString: $0) }) == "pool" { return false }
        return NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
    }
}

/// A task executor on NIO's event loops: tasks that prefer it run on the
/// threads that do the network I/O whatever Swift's global executor is. The
/// engine serves on it, so its sessions (the heartbeats to frozen agents
/// among them) never wait for a cooperative pool that other code in the same
/// process may keep busy: with `useEventLoops` (the shipped binaries) nothing
/// changes; in a process that keeps Swift's own pool (the test suite, an
/// embedding program) the engine behaves as it does in `quiesce serve`.
/// The same rule holds as on any executor here: no blocking calls (invariant 9).
public final class EventLoopTaskExecutor: TaskExecutor {
    public static let shared = EventLoopTaskExecutor(group: MultiThreadedEventLoopGroup.singleton)

    private let group: any EventLoopGroup

    public init(group: any EventLoopGroup) { self.group = group }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = self.asUnownedTaskExecutor()
        // any(): the current loop when called from one, so a task stays on its thread.
        self.group.any().execute { job.runSynchronously(on: executor) }
    }
}

/// A deadline that fires a closure unless it is cancelled first: an entry in
/// an event loop's timer heap instead of a task sleeping on a dispatch timer
/// (`Task.sleep` goes through dispatch even with the event loops as the global
/// executor: arming and cancelling one wakes dispatch's manager thread and a
/// worker, on the path of every freeze and thaw).
///
/// The timer goes on the event loop the caller runs on, when it runs on one:
/// arming it on another loop costs a wake-up of that loop's thread, and
/// cancelling it another (bench-freeze's trace showed both in every window).
public struct DeadlineTimer: Sendable {
    private let scheduled: Scheduled<Void>

    /// Calls `action` (on an event loop thread: it must not block) after `delay`.
    public init(after delay: Duration, _ action: @escaping @Sendable () -> Void) {
        self.scheduled = MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: .nanoseconds(max(delay.nanoseconds, 0)), action)
    }

    public func cancel() { self.scheduled.cancel() }
}

/// A closure run every `interval` on an event loop (the caller's, when it runs
/// on one) until it returns false or the timer is cancelled. The event-loop
/// counterpart of a task looping on `Task.sleep`, for the same reasons as
/// ``DeadlineTimer``.
public struct RepeatingTimer: Sendable {
    private let task: RepeatedTask

    /// - Parameter action: Runs on an event loop thread (it must not block); false stops the timer.
    public init(every interval: Duration, _ action: @escaping @Sendable () -> Bool) {
        let amount = TimeAmount.nanoseconds(max(interval.nanoseconds, 1))
        self.task = MultiThreadedEventLoopGroup.singleton.any().scheduleRepeatedTask(initialDelay: amount, delay: amount) { task in
            if !action() { task.cancel() }
        }
    }

    public func cancel() { self.task.cancel() }
}
