import GRPCCore
import QuiesceCore
import QuiesceProto

public typealias AgentMessage = Quiesce_Agent_V1_AgentMessage
public typealias EngineMessage = Quiesce_Agent_V1_EngineMessage
public typealias AgentCommand = Quiesce_Agent_V1_Command
public typealias CommandResult = Quiesce_Agent_V1_CommandResult
public typealias Facts = Quiesce_Agent_V1_Facts
public typealias AgentStatus = Quiesce_Agent_V1_Status

extension Quiesce_Agent_V1_ProtocolVersion {
    public init(_ number: ProtocolVersionNumber) {
        self.init()
        self.major = number.major
        self.minor = number.minor
    }

    public var number: ProtocolVersionNumber { ProtocolVersionNumber(major: self.major, minor: self.minor) }
}

extension Quiesce_Agent_V1_Status {
    /// A status with a canonical gRPC code, a message for people and a stable reason for programs.
    public init(code: RPCError.Code, message: String, reason: String = "") {
        self.init()
        self.code = Int32(code.rawValue)
        self.message = message
        self.reason = reason
    }

    public static var ok: Self { Self() }

    public var rpcCode: Status.Code { Status.Code(rawValue: Int(self.code)) ?? .unknown }
    public var isOK: Bool { self.code == 0 }
}

extension Quiesce_Agent_V1_Command.OneOf_Action {
    /// The action's name as it appears in logs and errors.
    public var name: String {
        switch self {
        case .facts: "facts"
        case .runHook: "run-hook"
        case .freeze: "freeze"
        case .thaw: "thaw"
        case .freezeStatus: "freeze-status"
        case .hold: "hold"
        case .release: "release"
        case .vssFreeze: "vss-freeze"
        case .vssThaw: "vss-thaw"
        }
    }
}

extension Quiesce_Agent_V1_AgentMessage.OneOf_Kind {
    public var name: String {
        switch self {
        case .hello: "hello"
        case .result: "result"
        case .heartbeat: "heartbeat"
        case .event: "event"
        }
    }
}

extension Quiesce_Agent_V1_EngineMessage.OneOf_Kind {
    public var name: String {
        switch self {
        case .hello: "hello"
        case .command: "command"
        case .cancel: "cancel"
        case .heartbeat: "heartbeat"
        }
    }
}

extension Quiesce_Agent_V1_HookRefusal {
    /// Stable reason-code spelling: "missing", "not-regular", "wrong-owner", "wrong-mode", "hash-mismatch", "unknown-hook".
    public var reasonCode: String {
        switch self {
        case .none: "none"
        case .missing: "missing"
        case .notRegular: "not-regular"
        case .wrongOwner: "wrong-owner"
        case .wrongMode: "wrong-mode"
        case .hashMismatch: "hash-mismatch"
        case .unknownHook: "unknown-hook"
        case .UNRECOGNIZED(let value): "refusal-\(value)"
        }
    }
}

extension Quiesce_Agent_V1_ThawCause {
    /// The word the thaw guard's protocol and the logs use: "command", "budget", "guard", "engine-silent", …
    public var word: String {
        switch self {
        case .command: "command"
        case .budget: "budget"
        case .guard: "guard"
        case .engineSilent: "engine-silent"
        case .cancelled: "cancelled"
        case .agentShutdown: "agent-shutdown"
        default: "unspecified"
        }
    }
}
