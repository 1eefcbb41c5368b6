import Foundation
import QuiesceCore
import QuiesceProto

/// Runs hooks the engine names (never a path or a command it supplies):
/// checked on an O_NOFOLLOW descriptor, executed from that descriptor in a
/// process group of their own, bounded by a timeout that kills the group.
public struct HookRunner: Sendable {
    public var locations: HookLocations
    /// Root's uid; tests on a user-owned tree may not change it, but the
    /// checks themselves are exercised with real root-owned files.
    public var rootUID: uid_t
    public static let defaultTimeout: Duration = .seconds(60)
    public static let defaultOutputCap = 64 * 1024
    /// Both tails must fit in one message (SessionLimits caps messages at 1 MiB).
    public static let maxOutputCap = 256 * 1024

    public init(locations: HookLocations = .defaults, rootUID: uid_t = 0) {
        self.locations = locations
        self.rootUID = rootUID
    }

    /// The hook a reference names, or why none: a name with a slash or a
    /// leading dot could leave the hook directory.
    public func resolve(_ ref: Quiesce_Agent_V1_HookRef) -> (name: String, path: String)? {
        switch ref.hook {
        case .seed(.prescript): return ("prescript", self.locations.prescript)
        case .seed(.postscript): return ("postscript", self.locations.postscript)
        case .name(let name) where !name.isEmpty && !name.contains("/") && !name.hasPrefix(".") && !name.contains("\0"):
            return (name, self.locations.hookDirectory + "/" + name)
        default: return nil
        }
    }

    /// Opens and checks a referenced hook; on refusal, the result says why.
    func check(_ ref: Quiesce_Agent_V1_HookRef) -> (CheckedHookBox?, Quiesce_Agent_V1_HookFact) {
        guard let (name, path) = self.resolve(ref) else {
            var fact = Quiesce_Agent_V1_HookFact()
            fact.name = ref.name
            fact.refusal = .unknownHook
            return (nil, fact)
        }
        let pinned = ref.sha256.isEmpty ? nil : ref.sha256
        let checked = HookInspector.check(name: name, path: path, pinnedSHA256: pinned, hashAlways: true, rootUID: self.rootUID)
        let fact = checked.fact
        guard checked.descriptor >= 0 else { return (nil, fact) }
        return (CheckedHookBox(checked), fact)
    }

    static func environment(hook: String) -> [String] {
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root", "QUIESCE_HOOK=\(hook)"]
    }

    /// Runs a hook to completion or to its timeout. Cancelling the calling task kills the hook's group.
    public func run(_ request: Quiesce_Agent_V1_RunHookRequest) async -> Quiesce_Agent_V1_HookResult {
        var result = Quiesce_Agent_V1_HookResult()
        let (box, fact) = self.check(request.hook)
        result.sha256 = fact.sha256
        guard let box else {
            result.refusal = fact.refusal
            result.refusalDetail = fact.refusal == .unknownHook
                ? "expected the seed's prescript/postscript or a file name in \(self.locations.hookDirectory), found \"\(request.hook.name)\""
                : HookInspector.explain(fact)
            return result
        }
        let timeout: Duration = request.timeoutMs > 0 ? .milliseconds(Int64(request.timeoutMs)) : Self.defaultTimeout
        let cap = request.outputCapBytes > 0 ? min(Int(request.outputCapBytes), Self.maxOutputCap) : Self.defaultOutputCap
        let process: ChildProcess
        do {
            process = try ChildProcess(
                descriptor: box.descriptor, name: fact.name, arguments: request.args,
                environment: Self.environment(hook: fact.name), outputCap: cap)
        } catch {
            result.refusalDetail = "\(error)"
            return result
        }
        box.close()
        result.ran = true
        let deadline = ContinuousClock.now + timeout
        let end = await withTaskCancellationHandler {
            (try? await DedicatedThread.run(name: "quiesce-hook") { () -> ChildProcess.PumpEnd in
                let end = process.pump(until: deadline)
                if end != .exited { process.killGroupAndReap() } else if process.groupAlive {
                    // Normal exit with background children left: reap them as they end.
                    Thread.detachNewThread { process.reapGroup(wait: .seconds(3600)) }
                }
                return end
            }) ?? .interrupted
        } onCancel: {
            process.interrupt()
        }
        result.timedOut = end == .deadline
        if let exit = process.exit {
            result.exited = exit.exited
            result.exitCode = exit.code
            result.signal = exit.signal
        }
        result.stdoutTail = Data(process.stdout.bytes)
        result.stderrTail = Data(process.stderr.bytes)
        result.outputTruncated = process.stdout.truncated || process.stderr.truncated
        result.durationUs = process.elapsedMicros
        return result
    }
}

/// Moves a checked hook's descriptor across a Sendable boundary; closed once.
final class CheckedHookBox: @unchecked Sendable {
    private(set) var descriptor: Int32

    init(_ hook: consuming CheckedHook) {
        self.descriptor = fcntl(hook.descriptor, F_DUPFD_CLOEXEC, 0)
    }

    func close() {
        if self.descriptor >= 0 { Glibc.close(self.descriptor); self.descriptor = -1 }
    }

    deinit { self.close() }
}
