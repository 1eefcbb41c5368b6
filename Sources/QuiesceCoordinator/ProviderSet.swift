import Foundation
import QuiesceCore
import QuiesceFleet
import QuiesceProviders
import Synchronization

/// The providers an engine's runs use, one per configuration and rate limit.
/// Shared by every run of one engine, so two runs against the same pool or the
/// same EC2 account take their slots from the same token bucket instead of each
/// getting a full burst. Providers are built by ``ProviderKinds``.
public final class ProviderSet: Sendable {
    private struct Key: Hashable {
        var kind: String
        var settings: [String: String]
        var burst: Int
        var perSecond: Double
    }

    private let cache = Mutex<[Key: Coordinator.Provider]>([:])
    private let environment: [String: String]
    /// Wraps every provider built (the engine's metrics count their calls), given the fleet's name for it.
    private let wrap: @Sendable (any SnapshotProvider, String) -> any SnapshotProvider

    public init(environment: [String: String] = ProcessInfo.processInfo.environment,
                wrap: @escaping @Sendable (any SnapshotProvider, String) -> any SnapshotProvider = { provider, _ in provider }) {
        self.environment = environment
        self.wrap = wrap
    }

    /// The fleet's providers by name.
    /// - Throws: `FleetFileError` naming the file, line and provider when one cannot be built
    ///   (a pool that cannot be opened, no AWS credentials or region).
    public func providers(for fleet: FleetFile) throws -> [String: Coordinator.Provider] {
        var result: [String: Coordinator.Provider] = [:]
        var problems: [FleetProblem] = []
        for spec in fleet.providers {
            let key = Key(kind: spec.kind, settings: spec.settings.mapValues(\.text), burst: spec.burst, perSecond: spec.perSecond)
            if var known = self.cache.withLock({ $0[key] }) {
                known.record = ProviderKinds.record(spec)
                result[spec.name] = known
                continue
            }
            do {
                let provider = self.wrap(try ProviderKinds.make(spec, environment: self.environment), spec.name)
                let made = Coordinator.Provider(provider: provider, bucket: TokenBucket(burst: spec.burst, perSecond: spec.perSecond),
                                                record: ProviderKinds.record(spec))
                result[spec.name] = self.cache.withLock { cache in
                    if var raced = cache[key] {
                        raced.record = made.record
                        return raced
                    }
                    cache[key] = made
                    return made
                }
            } catch {
                let field = spec.kind == "local" ? "providers.\(spec.name).pool" : "providers.\(spec.name)"
                let detail = (error as? ProviderError).map { "\($0)" } ?? "\(error)"
                problems.append(FleetProblem(file: fleet.path, line: spec.line, column: 0, field: field,
                                             message: spec.kind == "local" ? "cannot open the pool \(spec.pool): \(detail)" : detail))
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
