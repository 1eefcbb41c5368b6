import Foundation

/// Runs a program to completion and hands back its exit status and output
/// (stdout and stderr together, as a person at a terminal would read them).
/// It blocks: call it from a ``DedicatedThread`` or other plain thread, never
/// from a task on the cooperative pool or an event loop (invariant 9).
public enum ChildProcess {
    public struct Finished: Sendable {
        public var status: Int32
        public var output: String
        /// The last `count` non-empty lines joined with " | ", for one-line messages.
        public func lastLines(_ count: Int = 2) -> String {
            self.output.split(separator: "\n").suffix(count).joined(separator: " | ")
        }
    }

    /// - Parameters:
    ///   - arguments: the program and its arguments; a bare name is looked up in PATH (through /usr/bin/env).
    ///   - executable: run this file instead, with `arguments` as its arguments.
    /// - Throws: only when the program cannot be started; a non-zero exit is the caller's to judge.
    public static func run(_ arguments: [String], executable: String? = nil) throws -> Finished {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable ?? "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Finished(status: process.terminationStatus, output: String(decoding: data, as: UTF8.self))
    }
}
