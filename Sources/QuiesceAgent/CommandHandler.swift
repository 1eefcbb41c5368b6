import Foundation
import GRPCCore
import QuiesceCore
import QuiesceProto
import QuiesceWire

/// Performs the actions the engine asks for. One handler serves every
/// session of an agent; it must be safe to call concurrently.
public protocol CommandHandling: Sendable {
    /// The capabilities announced in the hello.
    var capabilities: [String] { get }

    /// Performs one command. Called on a task that is cancelled when the
    /// engine cancels the command or its deadline passes.
    func perform(_ command: AgentCommand) async -> CommandResult
}

/// The built-in actions this agent version implements: facts. Freeze, thaw,
/// hooks, holds and VSS answer UNIMPLEMENTED with reason "not-implemented",
/// so an engine can tell an old agent from a failed action.
public struct BuiltinCommandHandler: CommandHandling {
    public let facts: FactsCollector

    public init(facts: FactsCollector = FactsCollector()) {
        self.facts = facts
    }

    public var capabilities: [String] { ["facts"] }

    public func perform(_ command: AgentCommand) async -> CommandResult {
        var result = CommandResult()
        result.commandID = command.id
        switch command.action {
        case .facts(let request):
            do {
                result.facts = try await self.facts.collect(includeHookHashes: request.includeHookHashes)
                result.status = .ok
            } catch {
                result.status = .init(code: .internalError, message: "could not collect facts: \(error)", reason: "facts-failed")
            }
        case .some(let action):
            result.status = .init(
                code: .unimplemented,
                message: "\(action.name) is not implemented by agent \(QuiesceVersion.software)",
                reason: "not-implemented")
        case nil:
            let detail = command.unknownFields.data.isEmpty ? "no action set" : "an action this agent does not know (is the engine newer?)"
            result.status = .init(code: .unimplemented, message: "unknown command: \(detail)", reason: "unknown-command")
        }
        return result
    }
}
