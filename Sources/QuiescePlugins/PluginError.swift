/// Why a plugin could not be loaded or could not plan. Every one names the
/// plugin (when its info was read) and the path, and says what was expected
/// and what was found; the other plugins keep working.
public struct PluginError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable, CaseIterable {
        // Loading (from the host process).
        case notFound = "not-found"
        case unsafePermissions = "unsafe-permissions"
        case notASharedObject = "not-a-shared-object"
        case loadFailed = "load-failed"
        case noEntrySymbol = "no-entry-symbol"
        case entryNull = "entry-null"
        case abiMismatch = "abi-mismatch"
        case structTooSmall = "struct-too-small"
        case missingFunction = "missing-function"
        case describeFailed = "describe-failed"
        // Reading its answers.
        case undecodableInfo = "undecodable-info"
        case invalidInfo = "invalid-info"
        case duplicateName = "duplicate-name"
        case undecodablePlan = "undecodable-plan"
        case invalidPlan = "invalid-plan"
        case refused = "refused"
        case badOptions = "bad-options"
        // The host process.
        case crashed = "crashed"
        case timedOut = "timed-out"
        case hostFailed = "host-failed"
        case protocolError = "protocol-error"
    }

    public var code: Code
    /// The plugin's name, once its info was read.
    public var plugin: String?
    public var path: String
    public var detail: String

    public init(_ code: Code, plugin: String? = nil, path: String, _ detail: String) {
        self.code = code
        self.plugin = plugin
        self.path = path
        self.detail = detail
    }

    public var description: String {
        let who = self.plugin.map { "plugin \($0) (\(self.path))" } ?? "plugin \(self.path)"
        return "\(who): \(self.code.rawValue): \(self.detail)"
    }
}
