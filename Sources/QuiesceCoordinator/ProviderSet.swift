import Foundation
import QuiesceCore
import QuiesceFleet
import QuiesceLocalProvider
import Synchronization

/// The providers an engine's runs use, one per pool and rate limit. Shared by
/// every run of one engine, so two runs against the same pool take their slots
/// from the same token bucket instead of each getting a full burst.
public final class ProviderSet: Sendable {
    private struct Key: Hashable {
        var kind: String
        var pool: String
        var burst: Int
        var perSecond: Double
    }

    private let cache = Mutex<[Key: Coordinator.Provider]>([:])

    public init() {}

    /// The fleet's providers by name.
    /// - Throws: `FleetFileError` naming the file, line and provider when a pool cannot be opened.
    public func providers(for fleet: FleetFile) throws -> [String: Coordinator.Provider] {
        var result: [String: Coordinator.Provider] = [:]
        var problems: [FleetProblem] = []
        for spec in fleet.providers {
            let key = Key(kind: spec.kind, pool: spec.pool, burst: spec.burst, perSecond: spec.perSecond)
            if let known = self.cache.withLock({ $0[key] }) {
                result[spec.name] = known
                continue
            }
            do {
                let provider = try LocalProvider(pool: spec.pool, createBurst: spec.burst, createsPerSecond: spec.perSecond)
                let made = Coordinator.Provider(provider: provider, bucket: TokenBucket(burst: spec.burst, perSecond: spec.perSecond))
                result[spec.name] = self.cache.withLock { cache in
                    if let raced = cache[key] { return raced }
                    cache[key] = made
                    return made
                }
            } catch {
                problems.append(FleetProblem(file: fleet.path, line: spec.line, column: 0, field: "providers.\(spec.name).pool",
                                             message: "cannot open the pool \(spec.pool): \(error)"))
            }
        }
        if !problems.isEmpty { throw FleetFileError(problems: problems) }
        return result
    }
}

extension Coordinator {
    /// A new run id: "run-20261126-031500-3fa2".
    public static func newRunID() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        return "run-\(formatter.string(from: Date()))-\(String(UInt32.random(in: 0...0xffff), radix: 16))"
    }

    /// Why `id` cannot be a run id, or nil when it can (1–64 letters, digits, '-', '_', '.').
    public static func runIDProblem(_ id: String) -> String? {
        if id.isEmpty || id.count > 64 || id.contains(where: { !($0.isASCII && ($0.isLetter || $0.isNumber) || "-_.".contains($0)) }) {
            return "expected 1 to 64 letters, digits, '-', '_' or '.', found \"\(id)\""
        }
        return nil
    }
}
