import QuiesceCore
import QuiescePlugins
import QuiescePluginProto
import QuiesceProto
import QuiesceWire

extension InstanceFacts {
    /// What a plugin sees of an instance: the agent's facts (with hook hashes)
    /// and the capabilities its session announced.
    public init(instanceID: String, facts: Facts, capabilities: [String]) {
        self.init()
        self.instanceID = instanceID
        self.osFamily = facts.osFamily
        self.osName = facts.osName
        self.kernelRelease = facts.kernelRelease
        self.hostname = facts.hostname
        self.guardReady = facts.guardReady
        self.capabilities = capabilities
        self.osVersion = facts.osVersion
        self.vssService = facts.vssService
        self.vssWriters = facts.vssWriters.map { writer in
            .with {
                $0.name = writer.name
                $0.writerID = writer.writerID
                $0.instanceID = writer.instanceID
                $0.state = writer.state
                $0.components = writer.components
                $0.lastError = writer.lastError
            }
        }
        self.mounts = facts.mounts.map { mount in
            .with {
                $0.mountPoint = mount.mountPoint
                $0.device = mount.device
                $0.fsType = mount.fsType
                $0.readOnly = mount.readOnly
                $0.freezable = mount.freezable
                $0.notFreezableReason = mount.notFreezableReason
                $0.sizeBytes = mount.sizeBytes
            }
        }
        self.hooks = facts.hooks.map { hook in
            .with {
                $0.name = hook.name
                $0.path = hook.path
                $0.exists = hook.exists
                $0.regularFile = hook.regularFile
                $0.ownerUid = hook.ownerUid
                $0.mode = hook.mode
                $0.sizeBytes = hook.sizeBytes
                $0.sha256 = hook.sha256
                $0.refusal = hook.refusal == .none ? "" : hook.refusal.reasonCode
            }
        }
    }
}

extension Quiesce_Agent_V1_HookRef {
    /// The agent's form of a plan's (validated) hook reference.
    init(_ ref: Quiesce_Plugin_V1_HookRef) {
        self.init()
        switch ref.hook {
        case .seed(let seed)?: self.seed = seed.which == "postscript" ? .postscript : .prescript
        case .name(let name)?: self.name = name
        case nil: break
        }
        self.sha256 = ref.sha256
    }
}

extension Engine {
    /// The instance's facts with hook hashes, as a plugin sees them.
    public func planFacts(of instanceID: String, timeout: Duration = .seconds(10)) async throws -> InstanceFacts {
        let session = try await self.liveSession(for: instanceID)
        let facts = try await self.facts(of: instanceID, includeHookHashes: true, timeout: timeout)
        return InstanceFacts(instanceID: instanceID, facts: facts, capabilities: session.capabilities)
    }
}
