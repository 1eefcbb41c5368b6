import Foundation
import GRPCCore
import QuiesceCore
import QuiescePKI
import QuiesceProto
import QuiesceWire

/// `quiesce.admin.v1.Admin`, served on the engine's unix socket.
struct AdminService: Quiesce_Admin_V1_Admin.SimpleServiceProtocol {
    let engine: Engine

    func listAgents(request: Quiesce_Admin_V1_ListAgentsRequest, context: ServerContext) async throws
        -> Quiesce_Admin_V1_ListAgentsResponse
    {
        var response = Quiesce_Admin_V1_ListAgentsResponse()
        response.agents = await self.engine.registry.all().map(Self.describe)
        response.conflicts = await self.engine.registry.allConflicts().map { conflict in
            .with {
                $0.instanceID = conflict.instanceID
                $0.holderSessionID = conflict.holderSessionID
                $0.holderAddress = conflict.holderAddress
                $0.claimantAddress = conflict.claimantAddress
                $0.firstSeenUnixMs = Int64(conflict.firstSeen.timeIntervalSince1970 * 1000)
                $0.lastSeenUnixMs = Int64(conflict.lastSeen.timeIntervalSince1970 * 1000)
                $0.attempts = UInt32(conflict.attempts)
            }
        }
        if let authority = self.engine.authority {
            let list = authority.revocations
            let entries = (try? await DedicatedThread.run(name: "quiesce-revocations") { try list.entries() }) ?? []
            response.revoked = entries.map { entry in
                .with {
                    $0.serial = entry.serial ?? ""
                    $0.identity = entry.identity ?? ""
                    $0.revokedAtUnixMs = Int64(entry.revokedAt.timeIntervalSince1970 * 1000)
                    $0.reason = entry.reason
                }
            }
        }
        return response
    }

    func getFacts(request: Quiesce_Admin_V1_GetFactsRequest, context: ServerContext) async throws
        -> Quiesce_Admin_V1_GetFactsResponse
    {
        let timeout: Duration = request.timeoutMs == 0 ? .seconds(10) : .milliseconds(Int64(request.timeoutMs))
        var response = Quiesce_Admin_V1_GetFactsResponse()
        response.facts = try await self.engine.facts(of: request.instanceID, includeHookHashes: request.includeHookHashes, timeout: timeout)
        return response
    }

    func engineInfo(request: Quiesce_Admin_V1_EngineInfoRequest, context: ServerContext) async throws
        -> Quiesce_Admin_V1_EngineInfoResponse
    {
        var response = Quiesce_Admin_V1_EngineInfoResponse()
        response.engineVersion = QuiesceVersion.software
        response.agentListenAddress = (try? await self.engine.listeningAddress().description) ?? ""
        response.startedAtUnixMs = Int64(self.engine.startedAt.timeIntervalSince1970 * 1000)
        response.sessions = UInt32(await self.engine.registry.count)
        response.caFingerprintSha256 = self.engine.caFingerprint
        return response
    }

    static func describe(_ session: AgentSession) -> Quiesce_Admin_V1_AgentSession {
        var agent = Quiesce_Admin_V1_AgentSession()
        agent.instanceID = session.instanceID
        agent.sessionID = session.sessionID
        agent.remoteAddress = session.remoteAddress
        agent.agentVersion = session.agentVersion
        agent.protocolVersion = session.protocolVersion.description
        agent.capabilities = session.capabilities
        agent.connectedAtUnixMs = Int64(session.connectedAt.timeIntervalSince1970 * 1000)
        agent.lastHeardUnixMs = Int64(session.lastHeard.timeIntervalSince1970 * 1000)
        agent.pendingCommands = UInt32(session.pendingCommands)
        agent.certificateSha256 = session.certificateFingerprint
        if let certificate = session.certificate {
            agent.certificateSerial = RevocationList.serialHex(certificate)
            agent.certificateNotAfterUnix = Int64(certificate.notValidAfter.timeIntervalSince1970)
        }
        return agent
    }
}
