import Foundation
import GRPCCore

/// The live agent sessions, by instance id, and a short history of ended ones.
public actor SessionRegistry {
    /// A session that ended, and why: what an operator needs when an agent is missing.
    public struct EndedSession: Sendable {
        public var instanceID: String
        public var sessionID: String
        public var remoteAddress: String
        public var endedAt: Date
        public var reason: String
    }

    /// Two machines claiming one instance id: the holder kept it, the claimant was refused.
    public struct IdentityConflict: Sendable {
        public var instanceID: String
        public var holderSessionID: String
        public var holderAddress: String
        public var claimantAddress: String
        public var claimantRunID: String
        public var firstSeen: Date
        public var lastSeen: Date
        public var attempts: Int
    }

    /// A conflict stays in force this long after the last refused claim (a refused agent retries
    /// every few seconds to 30 s), and while the holder's session lives.
    public static let conflictMemory: TimeInterval = 120

    private var sessions: [String: AgentSession] = [:]
    private var conflicts: [String: IdentityConflict] = [:]
    private var ended: [EndedSession] = []
    private let historyLimit: Int
    private var waiters: [(id: UInt64, predicate: @Sendable ([String: AgentSession]) -> Bool, continuation: CheckedContinuation<Void, Never>)] = []
    private var nextWaiterID: UInt64 = 0

    public init(historyLimit: Int = 200) {
        self.historyLimit = historyLimit
    }

    /// Adds a session; a previous session of the same instance is closed (the
    /// agent reconnected, or something else holds its certificate).
    func register(_ session: AgentSession) {
        if let previous = self.sessions[session.instanceID] {
            previous.close(reason: RPCError(
                code: .aborted,
                message: "replaced by a new session \(session.sessionID) from \(session.remoteAddress)"))
        }
        self.sessions[session.instanceID] = session
        self.notify()
    }

    /// Removes `session` if it is still the current one for its instance.
    func remove(_ session: AgentSession, reason: String) {
        if self.sessions[session.instanceID] === session {
            self.sessions.removeValue(forKey: session.instanceID)
        }
        self.recordEnd(instanceID: session.instanceID, sessionID: session.sessionID,
                       remoteAddress: session.remoteAddress, reason: reason)
        self.notify()
    }

    /// Records a session refused before it registered (bad hello, wrong id …).
    func recordEnd(instanceID: String, sessionID: String, remoteAddress: String, reason: String) {
        self.ended.append(EndedSession(
            instanceID: instanceID, sessionID: sessionID, remoteAddress: remoteAddress, endedAt: Date(), reason: reason))
        if self.ended.count > self.historyLimit { self.ended.removeFirst(self.ended.count - self.historyLimit) }
    }

    public func session(for instanceID: String) -> AgentSession? { self.sessions[instanceID] }

    func noteConflict(instanceID: String, holder: AgentSession, claimantAddress: String, claimantRunID: String) -> IdentityConflict {
        let now = Date()
        var conflict = self.conflicts[instanceID].flatMap { $0.holderSessionID == holder.sessionID ? $0 : nil } ?? IdentityConflict(
            instanceID: instanceID, holderSessionID: holder.sessionID, holderAddress: holder.remoteAddress, claimantAddress: claimantAddress,
            claimantRunID: claimantRunID, firstSeen: now, lastSeen: now, attempts: 0)
        conflict.claimantAddress = claimantAddress
        conflict.lastSeen = now
        conflict.attempts += 1
        self.conflicts[instanceID] = conflict
        return conflict
    }

    /// The instance's identity conflict, while it is in force.
    public func conflict(for instanceID: String, now: Date = Date()) -> IdentityConflict? {
        guard let conflict = self.conflicts[instanceID], now.timeIntervalSince(conflict.lastSeen) < Self.conflictMemory else { return nil }
        return conflict
    }

    /// Every conflict in force, by instance id.
    public func allConflicts(now: Date = Date()) -> [IdentityConflict] {
        self.conflicts.values.filter { now.timeIntervalSince($0.lastSeen) < Self.conflictMemory }.sorted { $0.instanceID < $1.instanceID }
    }

    /// Closes every live session whose certificate `refused` names a reason for (a revocation).
    func closeRefused(_ refused: (AgentSession) -> String?) -> [(String, String)] {
        var closed: [(String, String)] = []
        for session in self.sessions.values {
            guard let reason = refused(session) else { continue }
            session.close(reason: RPCError(code: .permissionDenied, message: "revoked: \(reason)"))
            closed.append((session.instanceID, reason))
        }
        return closed
    }

    /// Live sessions sorted by instance id.
    public func all() -> [AgentSession] {
        self.sessions.values.sorted { $0.instanceID < $1.instanceID }
    }

    public var count: Int { self.sessions.count }

    /// Sessions that ended, oldest first.
    public func endedSessions() -> [EndedSession] { self.ended }

    /// Ends one session as a dropped connection would (tests: a network blip, a reconnect).
    public func closeForTest(_ session: AgentSession, reason: String) {
        session.close(reason: RPCError(code: .unavailable, message: reason))
    }

    func closeAll(reason: RPCError) {
        for session in self.sessions.values { session.close(reason: reason) }
    }

    /// Waits until every id in `instanceIDs` has a live session, or `timeout` passes.
    /// - Returns: The ids still missing (empty when all arrived).
    public func waitFor(_ instanceIDs: Set<String>, timeout: Duration) async -> Set<String> {
        await self.waitUntil(timeout: timeout) { live in instanceIDs.isSubset(of: live.keys) }
        return instanceIDs.subtracting(self.sessions.keys)
    }

    /// Waits until at least `count` sessions are live, or `timeout` passes.
    public func waitForCount(_ count: Int, timeout: Duration) async -> Int {
        await self.waitUntil(timeout: timeout) { $0.count >= count }
        return self.sessions.count
    }

    private func waitUntil(timeout: Duration, _ predicate: @escaping @Sendable ([String: AgentSession]) -> Bool) async {
        if predicate(self.sessions) { return }
        let id = self.nextWaiterID
        self.nextWaiterID += 1
        let timer = Task { [weak self] in
            try? await Task.sleep(for: timeout)
            await self?.release(waiter: id)
        }
        await withCheckedContinuation { continuation in
            self.waiters.append((id, predicate, continuation))
        }
        timer.cancel()
    }

    private func release(waiter id: UInt64) {
        if let index = self.waiters.firstIndex(where: { $0.id == id }) {
            self.waiters.remove(at: index).continuation.resume()
        }
    }

    private func notify() {
        let live = self.sessions
        self.waiters.removeAll { waiter in
            guard waiter.predicate(live) else { return false }
            waiter.continuation.resume()
            return true
        }
    }
}
