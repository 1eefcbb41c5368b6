import Foundation

/// What happens when a reader goes away: `quiesce backup … | head`, an agent
/// whose journal stream restarts, a plugin host that crashed. By default
/// Unix kills the writer with SIGPIPE, and Foundation's `FileHandle.write(_:)`
/// traps on the EPIPE that comes instead when SIGPIPE is ignored. Either way a
/// lost reader of *output* would end the engine in the middle of a run (with
/// agents frozen) or the agent in the middle of a freeze.
public enum BrokenPipes {
    /// Ignores SIGPIPE for the whole process, once and for good (never
    /// restored: another thread may be writing at any moment). Writes to a
    /// reader that is gone then fail with EPIPE, which callers handle. Every
    /// Quiesce binary calls it first thing.
    public static func ignoreSignal() { _ = Self.ignored }

    private static let ignored: Void = { signal(SIGPIPE, SIG_IGN) }()

    /// Writes a line of text to standard error, or drops it if nobody reads
    /// standard error any more (never traps, unlike `FileHandle.write(_:)`).
    public static func printError(_ text: String) {
        try? FileHandle.standardError.write(contentsOf: Data(text.utf8))
    }

    /// The same for standard output.
    public static func printOutput(_ text: String) {
        try? FileHandle.standardOutput.write(contentsOf: Data(text.utf8))
    }
}
