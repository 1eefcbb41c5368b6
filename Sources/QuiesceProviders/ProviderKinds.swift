import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceEC2
import QuiesceFleet
import QuiesceLocalProvider

/// Every provider kind this engine has, in one place: each builds its
/// `any SnapshotProvider` from the settings its ``ProviderKindSpec`` checked in
/// the fleet file, or from the catalog's record of them. The coordinator, the
/// inventory and every CLI command get their providers here.
public enum ProviderKinds {
    /// The kinds, by name.
    public static var names: [String] { ProviderKindSpec.builtIn.map(\.name) }

    /// Builds a provider from its kind and its settings as text (the fleet file's, or the catalog's).
    /// - Throws: `ProviderError.permanent` saying what is missing (a pool that cannot be opened, no credentials, no region).
    public static func make(kind: String, name: String, settings: [String: String], burst: Int, perSecond: Double,
                            environment: [String: String] = ProcessInfo.processInfo.environment) throws -> any SnapshotProvider {
        switch kind {
        case "local":
            guard let pool = settings["pool"], !pool.isEmpty else { throw ProviderError.permanent("provider \(name): expected a pool, found none") }
            return try LocalProvider(pool: pool, createBurst: burst, createsPerSecond: perSecond)
        case "ec2":
            let resolver = AWSConfigResolver(environment: environment)
            do {
                let profile = settings["profile"]
                let credentials = try resolver.credentials(profile: profile)
                let region = try resolver.region(given: settings["region"], profile: profile)
                let endpoint = resolver.endpoint(given: settings["endpoint_url"], region: region)
                guard let url = URL(string: endpoint), url.host != nil else {
                    throw AWSConfigError("expected an endpoint URL with a host, found \"\(endpoint)\"")
                }
                var provider = EC2Provider(client: EC2Client(endpoint: url, region: region, credentials: credentials), createBurst: burst,
                                           createsPerSecond: perSecond)
                if let poll = settings["poll_ms"].flatMap(Int.init) { provider.pollInterval = .milliseconds(poll) }
                return provider
            } catch let error as AWSConfigError {
                throw ProviderError.permanent("provider \(name) (ec2): \(error)")
            }
        default:
            throw ProviderError.permanent("provider \(name): expected a provider kind this engine has (\(Self.names.sorted().joined(separator: ", "))), found \"\(kind)\"")
        }
    }

    public static func make(_ spec: FleetFile.Provider, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> any SnapshotProvider {
        try self.make(kind: spec.kind, name: spec.name, settings: spec.settings.mapValues(\.text), burst: spec.burst, perSecond: spec.perSecond,
                      environment: environment)
    }

    /// Rebuilds a provider the catalog remembers.
    public static func make(_ record: ProviderRecord, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> any SnapshotProvider {
        try self.make(kind: record.kind, name: record.name, settings: record.settings, burst: Int(record.settings["burst"] ?? "") ?? 20,
                      perSecond: Double(record.settings["per_second"] ?? "") ?? 50, environment: environment)
    }

    /// What the catalog keeps of a fleet provider: its kind and the settings that locate it.
    /// Fleet files hold no secrets (credentials come from the environment or the AWS files), so nothing is left out.
    public static func record(_ spec: FleetFile.Provider) -> ProviderRecord {
        var settings = spec.settings.mapValues(\.text)
        settings["burst"] = "\(spec.burst)"
        settings["per_second"] = "\(spec.perSecond)"
        return ProviderRecord(name: spec.name, kind: spec.kind, settings: settings)
    }

    /// What a fleet instance points at in its provider.
    public static func target(_ instance: FleetFile.Instance) -> ProviderTarget {
        ProviderTarget(
            instanceID: instance.id, providerInstance: instance.providerSettings["ec2_instance"]?.string, disks: instance.disks,
            excludeBoot: instance.providerSettings["exclude_boot_volume"]?.bool ?? false,
            excludeDisks: instance.providerSettings["exclude_volumes"]?.list ?? [])
    }

    /// How long to wait for a group to be usable after the thaw (`snapshot_timeout_s`, default 600 s for a cloud, 60 s locally).
    public static func readyTimeout(_ spec: FleetFile.Provider?) -> Duration {
        if let seconds = spec?.settings["snapshot_timeout_s"]?.int { return .seconds(seconds) }
        return spec?.kind == "local" ? .seconds(60) : .seconds(600)
    }
}

/// The providers of the groups in a catalog, found by the name each group
/// recorded: a fleet file's provider of that name first, then the catalog's
/// record of it, then (for groups recorded before providers had names) the
/// local pool given on the command line or the default one.
public final class ProviderDirectory: @unchecked Sendable {
    let fleetProviders: [String: FleetFile.Provider]
    let records: [String: ProviderRecord]
    let localPool: String?
    let defaultPool: String
    let environment: [String: String]
    private let lock = NSLock()
    private var built: [String: any SnapshotProvider] = [:]

    /// - Parameters:
    ///   - fleet: a fleet file whose providers win over the catalog's records.
    ///   - localPool: the pool for local groups with no recorded provider (`--pool`), and for every local group when given.
    ///   - defaultPool: the pool for local groups nothing else names.
    public init(catalog: any CatalogStore, fleet: FleetFile? = nil, localPool: String?, defaultPool: String,
                environment: [String: String] = ProcessInfo.processInfo.environment) async {
        self.defaultPool = defaultPool
        self.fleetProviders = Dictionary((fleet?.providers ?? []).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        self.records = Dictionary(((try? await catalog.providers()) ?? []).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        self.localPool = localPool
        self.environment = environment
    }

    /// Every provider this directory knows by name (the fleet file's, then the catalog's records), with its kind;
    /// the `--pool` given, or the default pool, when it knows none of kind local.
    public var known: [(name: String, kind: String)] {
        var seen: [String: String] = [:]
        for (name, spec) in self.fleetProviders { seen[name] = spec.kind }
        for (name, record) in self.records where seen[name] == nil { seen[name] = record.kind }
        if !seen.values.contains("local") && (self.localPool != nil || seen.isEmpty) { seen["local"] = "local" }
        return seen.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    /// The provider holding `group`.
    public func provider(name: String, kind: String) throws -> any SnapshotProvider {
        let key = "\(name)/\(kind)"
        if let known = self.lock.withLock({ self.built[key] }) { return known }
        let made: any SnapshotProvider
        if kind == "local", let pool = self.localPool {
            made = try LocalProvider(pool: pool)
        } else if let spec = self.fleetProviders[name] {
            made = try ProviderKinds.make(spec, environment: self.environment)
        } else if let record = self.records[name] {
            made = try ProviderKinds.make(record, environment: self.environment)
        } else if kind == "local" {
            made = try LocalProvider(pool: self.defaultPool)
        } else {
            throw ProviderError.permanent("provider \(name) (\(kind)) is not in the catalog's records; give the fleet file that defines it (--fleet)")
        }
        self.lock.withLock { self.built[key] = made }
        return made
    }
}
