import Foundation
import QuiesceCore
import QuiescePlugins
import Yams

/// A fleet file: providers, policies, instances. Everything an operator wrote
/// is checked before anything runs; each problem names the file, the line and
/// the field, and says what was expected and what was found.
///
///     providers:
///       pool: { kind: local, pool: /var/lib/quiesce/pool, burst: 20, per_second: 50 }
///       aws: { kind: ec2, region: us-east-1, profile: prod }
///     policies:
///       app:
///         plugin: linux-freeze
///         wanted: application
///         minimum: filesystem
///         freeze_budget_ms: 10000
///         retries: 2
///         options: { skip_mounts: [/boot/efi] }
///     instances:
///       - { id: web-1, policy: app, provider: pool, disks: [web-1-root, web-1-data] }
///       - { id: db-1, policy: app, provider: aws, ec2_instance: i-0abc12345def67890, exclude_boot_volume: true }
///     groups:
///       shop: { members: [db-1, db-2], barrier_ms: 2000 }
///     schedules:
///       nightly: { cron: "30 2 * * *", time_zone: Europe/Berlin }
///       db-hourly: { cron: "0 * * * *", instances: [db-*] }
///     run: { concurrency: 16, agent_wait_s: 60, max_frozen: 8, pace_frozen: true, planning: 2, frozen_first_ms: 20 }
public struct FleetFile: Sendable {
    public struct Provider: Sendable, Equatable {
        public var name: String
        public var kind: String
        public var burst: Int
        public var perSecond: Double
        public var line: Int
        /// The kind's own keys (pool; region, profile, endpoint_url …), checked against its ``ProviderKindSpec``.
        public var settings: [String: FleetSetting] = [:]

        public init(name: String, kind: String, burst: Int, perSecond: Double, line: Int, settings: [String: FleetSetting] = [:]) {
            self.name = name
            self.kind = kind
            self.burst = burst
            self.perSecond = perSecond
            self.line = line
            self.settings = settings
        }

        /// The local provider's pool ("" for other kinds).
        public var pool: String { self.settings["pool"]?.string ?? "" }
    }

    public struct Policy: Sendable, Equatable {
        public var name: String
        public var plugin: String
        public var wanted: ConsistencyLevel
        public var minimum: ConsistencyLevel
        public var freezeBudgetMs: UInt32
        /// Extra attempts for transient provider errors (throttling), with jitter; never while frozen.
        public var retries: Int
        public var options: [String: OptionInput]
        public var line: Int
        /// Which of its instances' groups to keep, applied after each run; nil: keep every group.
        public var retention: RetentionRules? = nil
    }

    public struct Instance: Sendable, Equatable {
        public var id: String
        public var policy: String
        public var provider: String
        /// Provider disk ids; empty when the provider finds them (an `ec2_instance`).
        public var disks: [String]
        /// Options for this instance only, over its policy's (e.g. only_mounts).
        public var options: [String: OptionInput]
        public var line: Int
        /// Its provider kind's instance keys (ec2_instance, exclude_boot_volume, exclude_volumes).
        public var providerSettings: [String: FleetSetting] = [:]
    }

    /// A consistency group across instances: its members are quiesced together (a barrier), their
    /// disks snapshotted while every member is frozen, then all thawed; its level is the lowest member's.
    public struct Group: Sendable, Equatable {
        public var name: String
        public var members: [String]
        /// How long members already frozen wait at a barrier for the rest before the group is given up.
        public var barrierMs: Int
        public var line: Int

        public static let defaultBarrierMs = 2_000

        public init(name: String, members: [String], barrierMs: Int = Self.defaultBarrierMs, line: Int = 0) {
            self.name = name
            self.members = members
            self.barrierMs = barrierMs
            self.line = line
        }
    }

    /// When `quiesce serve --fleet FILE` backs the fleet (or part of it) up by itself.
    public struct Schedule: Sendable, Equatable {
        public var name: String
        public var cron: CronSchedule
        /// Which instances (shell-style patterns: `db-*`); empty: all of them.
        public var instances: [String]
        public var line: Int

        public init(name: String, cron: CronSchedule, instances: [String] = [], line: Int = 0) {
            self.name = name
            self.cron = cron
            self.instances = instances
            self.line = line
        }

        public func includes(_ instanceID: String) -> Bool {
            self.instances.isEmpty || self.instances.contains { FleetFile.matches(instanceID, pattern: $0) }
        }
    }

    /// Whether `text` matches the shell-style `pattern` (`*`, `?`, `[…]`), as join tokens' `--match` does.
    public static func matches(_ text: String, pattern: String) -> Bool { fnmatch(pattern, text, 0) == 0 }

    /// This fleet with only the instances `schedule` names (and the groups and providers they use).
    public func only(_ schedule: Schedule) -> FleetFile {
        var subset = self
        subset.instances = self.instances.filter { schedule.includes($0.id) }
        subset.groups = self.groups.filter { group in group.members.allSatisfy { schedule.includes($0) } }
        return subset
    }

    public var path: String
    public var providers: [Provider]
    public var policies: [Policy]
    public var instances: [Instance]
    /// Consistency groups across instances.
    public var groups: [Group] = []
    public var schedules: [Schedule] = []
    /// Instances snapshotted at once.
    public var concurrency: Int
    /// How many instances may be quiesced (frozen, or holding their application) at once.
    public var maxFrozen: Int = 8
    /// Below `maxFrozen`, only as many quiesced at once as keep up with the provider (``Slots``' pacing).
    public var paceFrozen: Bool = true
    /// How many instances fetch facts and plan at once; nil: ``defaultPlanning``.
    public var planning: Int?
    /// While an instance is quiescing or frozen, how long (ms) the others' work waits to start (0: never).
    public var frozenFirstMs: Int = 20

    /// One planning slot per 25 creates/s of the fastest provider (a slot plans about
    /// 25 instances a second when facts are a ~40 ms round trip away), at least 2.
    public var defaultPlanning: Int {
        let fastest = self.providers.map(\.perSecond).max() ?? 50
        return min(64, max(2, Int((fastest / 25).rounded(.up))))
    }
    /// How long to wait for every instance's agent before running without the missing ones.
    public var agentWaitSeconds: Int

    public func policy(named name: String) -> Policy? { self.policies.first { $0.name == name } }
    public func provider(named name: String) -> Provider? { self.providers.first { $0.name == name } }
    public func instance(named id: String) -> Instance? { self.instances.first { $0.id == id } }
    /// The consistency group `instanceID` belongs to, if any.
    public func group(of instanceID: String) -> Group? { self.groups.first { $0.members.contains(instanceID) } }
}

/// One problem in a fleet file: "fleet.yaml:12:7: instances[1].disks: expected a list of disk ids, found a number (3)".
public struct FleetProblem: Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int
    public var field: String
    public var message: String

    public init(file: String, line: Int, column: Int, field: String, message: String) {
        self.file = file
        self.line = line
        self.column = column
        self.field = field
        self.message = message
    }

    /// "file:line:column: field: message"; line and column are left out when unknown (0).
    public var description: String {
        self.file + ":" + (self.line > 0 ? "\(self.line):" : "") + (self.line > 0 && self.column > 0 ? "\(self.column):" : "")
            + " \(self.field): \(self.message)"
    }
}

public struct FleetFileError: Error, Sendable, CustomStringConvertible {
    public var problems: [FleetProblem]
    public init(problems: [FleetProblem]) { self.problems = problems }
    public var description: String { self.problems.map(\.description).joined(separator: "\n") }
}

extension FleetFile {
    /// Reads and checks `path`. Plugin options are checked too when `plugins` is given.
    public static func load(_ path: String, plugins: PluginRegistry? = nil) throws -> FleetFile {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FleetFileError(problems: [FleetProblem(file: path, line: 0, column: 0, field: "(file)", message: "cannot read the fleet file")])
        }
        return try Self.parse(String(decoding: data, as: UTF8.self), path: path, plugins: plugins)
    }

    public static func parse(_ text: String, path: String, plugins: PluginRegistry? = nil) throws -> FleetFile {
        var reader = Reader(file: path)
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            throw FleetFileError(problems: [reader.yamlProblem(error)])
        }
        guard let root, case .mapping(let top) = root else {
            throw FleetFileError(problems: [FleetProblem(file: path, line: 1, column: 1, field: "(top level)",
                                                         message: "expected a mapping with providers, policies and instances, found \(Reader.kind(root))")])
        }
        var fleet = FleetFile(path: path, providers: [], policies: [], instances: [], concurrency: 16, agentWaitSeconds: 60)
        let fields = reader.fields(top, at: "(top level)", allowed: ["providers", "policies", "instances", "run", "groups", "schedules"])

        if let providers = fields["providers"], let mapping = reader.mapping(providers, at: "providers") {
            let allKinds = ProviderKindSpec.builtIn
            for (key, value) in mapping {
                guard let name = reader.name(key, at: "providers") else { continue }
                let field = "providers.\(name)"
                guard let body = reader.mapping(value, at: field) else { continue }
                let kind = body.first { $0.key.string == "kind" }.flatMap { $0.value.string } ?? ""
                let spec = ProviderKindSpec.named(kind)
                // An unknown kind is checked against every kind's keys, so that its other mistakes show too.
                let kindKeys = spec?.keys ?? allKinds.flatMap(\.keys)
                var allowed = ["kind", "burst", "per_second"]
                for key in kindKeys.map(\.name) where !allowed.contains(key) { allowed.append(key) }
                let f = reader.fields(body, at: field, allowed: allowed)
                _ = reader.string(f["kind"], at: field + ".kind", required: true)
                if !kind.isEmpty && spec == nil {
                    reader.problem(f["kind"]!, field + ".kind",
                                   "expected a provider kind this engine has (\(allKinds.map(\.name).sorted().joined(separator: ", "))), found \"\(kind)\"")
                }
                var settings: [String: FleetSetting] = [:]
                for spec in kindKeys where settings[spec.name] == nil {
                    if let setting = reader.setting(f[spec.name], spec, at: field) { settings[spec.name] = setting }
                }
                let burst = reader.int(f["burst"], at: field + ".burst", range: 1...10_000) ?? spec?.defaultBurst ?? 20
                let perSecond = reader.double(f["per_second"], at: field + ".per_second", range: 0.01...100_000) ?? spec?.defaultPerSecond ?? 50
                fleet.providers.append(.init(name: name, kind: kind, burst: burst, perSecond: perSecond, line: Reader.line(key), settings: settings))
            }
        } else if fields["providers"] == nil {
            reader.problem(root, "providers", "missing: a fleet needs at least one provider")
        }

        if let policies = fields["policies"], let mapping = reader.mapping(policies, at: "policies") {
            for (key, value) in mapping {
                guard let name = reader.name(key, at: "policies") else { continue }
                let field = "policies.\(name)"
                guard let body = reader.mapping(value, at: field) else { continue }
                let f = reader.fields(body, at: field, allowed: ["plugin", "wanted", "minimum", "freeze_budget_ms", "retries", "options", "retention"])
                let plugin = reader.string(f["plugin"], at: field + ".plugin", required: true) ?? ""
                let wanted = reader.level(f["wanted"], at: field + ".wanted") ?? .application
                let minimum = reader.level(f["minimum"], at: field + ".minimum") ?? .crash
                if minimum > wanted, let node = f["minimum"] {
                    reader.problem(node, field + ".minimum", "expected a level at or below wanted (\(wanted.name)), found \(minimum.name)")
                }
                let budget = reader.int(f["freeze_budget_ms"], at: field + ".freeze_budget_ms", range: 100...600_000) ?? 10_000
                let retries = reader.int(f["retries"], at: field + ".retries", range: 0...10) ?? 2
                var loaded: Plugin?
                if let plugins, !plugin.isEmpty {
                    loaded = plugins.plugin(named: plugin)
                    if loaded == nil {
                        let known = plugins.plugins.map(\.name).joined(separator: ", ")
                        reader.problem(f["plugin"]!, field + ".plugin", "expected a loaded plugin (\(known.isEmpty ? "none loaded" : known)), found \"\(plugin)\"")
                    }
                }
                let options = reader.options(f["options"], at: field + ".options", plugin: loaded)
                fleet.policies.append(.init(name: name, plugin: plugin, wanted: wanted, minimum: minimum, freezeBudgetMs: UInt32(budget),
                                            retries: retries, options: options, line: Reader.line(key),
                                            retention: f["retention"].flatMap { reader.retention($0, at: field + ".retention") }))
            }
        } else if fields["policies"] == nil {
            reader.problem(root, "policies", "missing: a fleet needs at least one policy")
        }

        if let instances = fields["instances"], let sequence = reader.sequence(instances, at: "instances") {
            var seen: [String: Int] = [:]
            for (index, item) in sequence.enumerated() {
                let field = "instances[\(index)]"
                guard let body = reader.mapping(item, at: field) else { continue }
                let named = body.first { $0.key.string == "provider" }.flatMap { $0.value.string }
                let providerSpec = (named.flatMap { fleet.provider(named: $0) } ?? (fleet.providers.count == 1 ? fleet.providers[0] : nil))
                    .flatMap { ProviderKindSpec.named($0.kind) }
                let f = reader.fields(body, at: field, allowed: ["id", "policy", "provider", "disks", "options", "group"]
                    + (providerSpec?.instanceKeys.map(\.name) ?? []))
                let id = reader.string(f["id"], at: field + ".id", required: true) ?? ""
                if !id.isEmpty {
                    if !Reader.isName(id) {
                        reader.problem(f["id"]!, field + ".id", "expected letters, digits, '.', '_' or '-' (at most 64), found \"\(id)\"")
                    } else if let first = seen[id] {
                        reader.problem(f["id"]!, field + ".id", "instance \(id) is listed twice (first at line \(first))")
                    } else {
                        seen[id] = Reader.line(f["id"]!)
                    }
                }
                let policy = reader.string(f["policy"], at: field + ".policy", required: true) ?? ""
                if !policy.isEmpty, fleet.policy(named: policy) == nil, fields["policies"] != nil {
                    reader.problem(f["policy"]!, field + ".policy",
                                   "expected a policy defined under policies (\(fleet.policies.map(\.name).joined(separator: ", "))), found \"\(policy)\"")
                }
                var provider = reader.string(f["provider"], at: field + ".provider", required: false) ?? ""
                if provider.isEmpty {
                    if fleet.providers.count == 1 { provider = fleet.providers[0].name }
                    else if fleet.providers.count > 1 { reader.problem(body.mark.map { _ in item } ?? item, field + ".provider", "missing: the fleet has several providers, name one") }
                } else if fleet.provider(named: provider) == nil {
                    reader.problem(f["provider"]!, field + ".provider",
                                   "expected a provider defined under providers (\(fleet.providers.map(\.name).joined(separator: ", "))), found \"\(provider)\"")
                }
                var providerSettings: [String: FleetSetting] = [:]
                for key in providerSpec?.instanceKeys ?? [] {
                    if let setting = reader.setting(f[key.name], key, at: field) { providerSettings[key.name] = setting }
                }
                let disksOptional = providerSpec?.disksOptionalWith.map { f[$0] != nil } ?? false
                let disks = reader.stringList(f["disks"], at: field + ".disks") ?? []
                if let node = f["disks"], case .sequence = node, disks.isEmpty { reader.problem(f["disks"]!, field + ".disks", "expected at least one disk id, found an empty list") }
                if f["disks"] == nil && !disksOptional {
                    reader.problem(item, field + ".disks", "missing: list the instance's disks (provider disk ids)"
                        + (providerSpec?.disksOptionalWith.map { ", or name the instance with \($0) to snapshot every disk attached to it" } ?? ""))
                }
                for disk in disks where !Reader.isName(disk) || providerSpec?.diskPattern.map({ !ProviderKindSpec.matches(disk, $0.regex) }) ?? false {
                    reader.problem(f["disks"]!, field + ".disks",
                                   "expected \(providerSpec?.diskPattern?.words ?? "disk ids (letters, digits, '.', '_', '-')"), found \"\(disk)\"")
                }
                if let group = f["group"] {
                    reader.problem(group, field + ".group", "expected the group under groups (groups: { NAME: { members: [\(id.isEmpty ? "ID" : id), …] } }), found it on the instance")
                }
                let plugin = fleet.policy(named: policy).flatMap { plugins?.plugin(named: $0.plugin) }
                let options = reader.options(f["options"], at: field + ".options", plugin: plugin)
                fleet.instances.append(.init(id: id, policy: policy, provider: provider, disks: disks, options: options, line: Reader.line(item),
                                             providerSettings: providerSettings))
            }
        } else if fields["instances"] == nil {
            reader.problem(root, "instances", "missing: list the instances to back up")
        }

        if let run = fields["run"], let body = reader.mapping(run, at: "run") {
            let f = reader.fields(body, at: "run", allowed: ["concurrency", "agent_wait_s", "max_frozen", "pace_frozen", "planning", "frozen_first_ms"])
            fleet.frozenFirstMs = reader.int(f["frozen_first_ms"], at: "run.frozen_first_ms", range: 0...10_000) ?? fleet.frozenFirstMs
            fleet.planning = reader.int(f["planning"], at: "run.planning", range: 1...1000)
            fleet.maxFrozen = reader.int(f["max_frozen"], at: "run.max_frozen", range: 1...1000) ?? fleet.maxFrozen
            fleet.paceFrozen = reader.bool(f["pace_frozen"], at: "run.pace_frozen") ?? fleet.paceFrozen
            fleet.concurrency = reader.int(f["concurrency"], at: "run.concurrency", range: 1...1000) ?? fleet.concurrency
            fleet.agentWaitSeconds = reader.int(f["agent_wait_s"], at: "run.agent_wait_s", range: 0...3600) ?? fleet.agentWaitSeconds
        }
        if let groups = fields["groups"], let mapping = reader.mapping(groups, at: "groups") {
            reader.groups(mapping, into: &fleet)
        }
        if let schedules = fields["schedules"], let mapping = reader.mapping(schedules, at: "schedules") {
            reader.schedules(mapping, into: &fleet)
        }
        guard reader.problems.isEmpty else { throw FleetFileError(problems: reader.problems) }
        return fleet
    }
}

extension Reader {
    /// `retention: { keep_last: N, keep_within: 7d, daily: N, weekly: N, monthly: N, time_zone: Area/City }`.
    mutating func retention(_ node: Node, at field: String) -> RetentionRules? {
        guard let body = self.mapping(node, at: field) else { return nil }
        let f = self.fields(body, at: field, allowed: ["keep_last", "keep_within", "daily", "weekly", "monthly", "time_zone"])
        var rules = RetentionRules()
        rules.keepLast = self.int(f["keep_last"], at: field + ".keep_last", range: 0...100_000) ?? 0
        rules.daily = self.int(f["daily"], at: field + ".daily", range: 0...100_000) ?? 0
        rules.weekly = self.int(f["weekly"], at: field + ".weekly", range: 0...100_000) ?? 0
        rules.monthly = self.int(f["monthly"], at: field + ".monthly", range: 0...100_000) ?? 0
        if let within = f["keep_within"], let text = self.string(within, at: field + ".keep_within", required: true) {
            if let duration = parseDuration(text) {
                rules.keepWithin = duration
            } else {
                self.problem(within, field + ".keep_within", "expected a duration such as 36h, 7d or 2w, found \"\(text)\"")
            }
        }
        if let zone = f["time_zone"], let text = self.string(zone, at: field + ".time_zone", required: true) {
            if let found = TimeZone(identifier: text) { rules.timeZone = found } else {
                self.problem(zone, field + ".time_zone", "expected an IANA time zone (e.g. Europe/Berlin, UTC), found \"\(text)\"")
            }
        }
        if !rules.keepsSomething && self.problems.isEmpty {
            self.problem(node, field, "expected at least one of keep_last, keep_within, daily, weekly, monthly above 0; as written it keeps only the newest application-consistent group")
        }
        return rules
    }

    /// `schedules: { NAME: { cron: "M H DoM Mon DoW", time_zone: Area/City, instances: [pattern, …] } }`.
    mutating func schedules(_ mapping: Node.Mapping, into fleet: inout FleetFile) {
        for (key, value) in mapping {
            guard let name = self.name(key, at: "schedules") else { continue }
            let field = "schedules.\(name)"
            guard let body = self.mapping(value, at: field) else { continue }
            let f = self.fields(body, at: field, allowed: ["cron", "time_zone", "instances"])
            var zone = TimeZone(identifier: "UTC")!
            if let node = f["time_zone"], let text = self.string(node, at: field + ".time_zone", required: true) {
                if let found = TimeZone(identifier: text) {
                    zone = found
                } else {
                    self.problem(node, field + ".time_zone", "expected an IANA time zone (e.g. Europe/Berlin, UTC), found \"\(text)\"")
                }
            }
            guard let cronNode = f["cron"] else {
                self.problem(value, field + ".cron", "missing: when to run, as a cron expression (e.g. \"30 2 * * *\")")
                continue
            }
            guard let text = self.string(cronNode, at: field + ".cron", required: true) else { continue }
            let cron: CronSchedule
            do {
                cron = try CronSchedule(text, timeZone: zone)
            } catch {
                self.problem(cronNode, field + ".cron", "\(error)")
                continue
            }
            let patterns = self.stringList(f["instances"], at: field + ".instances") ?? []
            let schedule = FleetFile.Schedule(name: name, cron: cron, instances: patterns, line: Self.line(key))
            for pattern in patterns where !fleet.instances.contains(where: { FleetFile.matches($0.id, pattern: pattern) }) {
                self.problem(f["instances"]!, field + ".instances", "\"\(pattern)\" matches no instance of the fleet")
            }
            // A consistency group is backed up whole or not at all.
            for group in fleet.groups {
                let inside = group.members.filter(schedule.includes)
                if !inside.isEmpty && inside.count < group.members.count {
                    self.problem(f["instances"]!, field + ".instances",
                                 "includes \(inside.joined(separator: ", ")) but not \(group.members.filter { !schedule.includes($0) }.joined(separator: ", ")) of consistency group \(group.name); a group is backed up whole")
                }
            }
            if cron.next(after: Date()) == nil { self.problem(cronNode, field + ".cron", "\"\(text)\" never fires (no such date)") }
            fleet.schedules.append(schedule)
        }
    }

    /// `groups: { NAME: { members: [ID, …], barrier_ms: N } }`, checked against the fleet's instances,
    /// providers and run settings: a group runs all at once, so everything it needs at once must fit.
    mutating func groups(_ mapping: Node.Mapping, into fleet: inout FleetFile) {
        var owner: [String: String] = [:]
        for (key, value) in mapping {
            guard let name = self.name(key, at: "groups") else { continue }
            let field = "groups.\(name)"
            guard let body = self.mapping(value, at: field) else { continue }
            let f = self.fields(body, at: field, allowed: ["members", "barrier_ms"])
            guard let membersNode = f["members"] else {
                self.problem(value, field + ".members", "missing: list the group's instances (at least two)")
                continue
            }
            let members = self.stringList(membersNode, at: field + ".members") ?? []
            let barrier = self.int(f["barrier_ms"], at: field + ".barrier_ms", range: 50...60_000) ?? FleetFile.Group.defaultBarrierMs
            var problems: [String] = []
            if members.count < 2 { problems.append("expected at least two instances, found \(members.count)") }
            var seen = Set<String>()
            for member in members {
                if !seen.insert(member).inserted { problems.append("instance \(member) is listed twice"); continue }
                guard let instance = fleet.instance(named: member) else {
                    problems.append("expected instances listed under instances, found \"\(member)\"")
                    continue
                }
                if let other = owner[member] { problems.append("instance \(member) is already in group \(other); an instance is in one group at most") }
                owner[member] = name
                if let policy = fleet.policy(named: instance.policy), barrier * 2 > Int(policy.freezeBudgetMs) {
                    problems.append("barrier_ms \(barrier) must be at most half of \(member)'s freeze budget (\(policy.freezeBudgetMs) ms, policy \(policy.name)): "
                        + "members wait at the barrier frozen")
                }
            }
            // What the group takes at once: a provider slot per member, a frozen slot per member, a run slot per member.
            let known = members.compactMap { fleet.instance(named: $0) }
            for (providerName, count) in Dictionary(grouping: known, by: \.provider).mapValues(\.count).sorted(by: { $0.key < $1.key }) {
                if let provider = fleet.provider(named: providerName), count > provider.burst {
                    problems.append("the group needs \(count) slots at provider \(providerName) at once, its burst is \(provider.burst)")
                }
            }
            if known.count > fleet.maxFrozen {
                problems.append("the group quiesces \(known.count) instances at once, run.max_frozen is \(fleet.maxFrozen)")
            }
            if known.count > fleet.concurrency {
                problems.append("the group runs \(known.count) instances at once, run.concurrency is \(fleet.concurrency)")
            }
            for problem in problems { self.problem(membersNode, field + ".members", problem) }
            fleet.groups.append(.init(name: name, members: members, barrierMs: barrier, line: Self.line(key)))
        }
    }
}

/// Walks Yams nodes, collecting problems instead of stopping at the first.
struct Reader {
    let file: String
    var problems: [FleetProblem] = []

    init(file: String) { self.file = file }

    static func line(_ node: Node?) -> Int { node?.mark?.line ?? 0 }

    mutating func problem(_ node: Node, _ field: String, _ message: String) {
        self.problems.append(FleetProblem(file: self.file, line: node.mark?.line ?? 0, column: node.mark?.column ?? 0, field: field, message: message))
    }

    func yamlProblem(_ error: YamlError) -> FleetProblem {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
            return FleetProblem(file: self.file, line: mark.line, column: mark.column, field: "(yaml)", message: "not valid YAML: \(problem)")
        default:
            return FleetProblem(file: self.file, line: 0, column: 0, field: "(yaml)", message: "not valid YAML: \(error)")
        }
    }

    static func kind(_ node: Node?) -> String {
        switch node {
        case nil: return "an empty document"
        case .mapping?: return "a mapping"
        case .sequence?: return "a list"
        case .alias?: return "an alias"
        case .scalar(let scalar)?:
            if node?.tag == Tag(.null) { return "nothing (null)" }
            if node?.tag == Tag(.int) { return "a number (\(scalar.string))" }
            if node?.tag == Tag(.bool) { return "a bool (\(scalar.string))" }
            if node?.tag == Tag(.float) { return "a number (\(scalar.string))" }
            return "\"\(scalar.string)\""
        }
    }

    /// The mapping's keys as fields; unknown keys are problems naming the allowed ones.
    mutating func fields(_ mapping: Node.Mapping, at field: String, allowed: [String]) -> [String: Node] {
        var fields: [String: Node] = [:]
        for (key, value) in mapping {
            guard let name = key.string else {
                self.problem(key, field, "expected a key, found \(Self.kind(key))")
                continue
            }
            if !allowed.contains(name) {
                self.problem(key, field.hasPrefix("(") ? name : "\(field).\(name)", "unknown key (expected one of \(allowed.joined(separator: ", ")))")
            } else if fields[name] != nil {
                self.problem(key, "\(field).\(name)", "given twice")
            } else {
                fields[name] = value
            }
        }
        return fields
    }

    mutating func mapping(_ node: Node, at field: String) -> Node.Mapping? {
        if case .mapping(let mapping) = node { return mapping }
        self.problem(node, field, "expected a mapping, found \(Self.kind(node))")
        return nil
    }

    mutating func sequence(_ node: Node, at field: String) -> Node.Sequence? {
        if case .sequence(let sequence) = node { return sequence }
        self.problem(node, field, "expected a list, found \(Self.kind(node))")
        return nil
    }

    mutating func name(_ node: Node, at field: String) -> String? {
        guard case .scalar = node, let name = node.string, Self.isName(name) else {
            self.problem(node, field, "expected a name (letters, digits, '.', '_', '-'), found \(Self.kind(node))")
            return nil
        }
        return name
    }

    mutating func string(_ node: Node?, at field: String, required: Bool) -> String? {
        guard let node else {
            if required { self.problems.append(FleetProblem(file: self.file, line: 0, column: 0, field: field, message: "missing")) }
            return nil
        }
        guard case .scalar = node, node.tag == Tag(.str), let text = node.string else {
            self.problem(node, field, "expected a string, found \(Self.kind(node))")
            return nil
        }
        return text
    }

    mutating func int(_ node: Node?, at field: String, range: ClosedRange<Int>) -> Int? {
        guard let node else { return nil }
        guard case .scalar = node, node.tag == Tag(.int), let value = node.int else {
            self.problem(node, field, "expected a whole number from \(range.lowerBound) to \(range.upperBound), found \(Self.kind(node))")
            return nil
        }
        guard range.contains(value) else {
            self.problem(node, field, "expected a whole number from \(range.lowerBound) to \(range.upperBound), found \(value)")
            return nil
        }
        return value
    }

    mutating func bool(_ node: Node?, at field: String) -> Bool? {
        guard let node else { return nil }
        guard case .scalar = node, node.tag == Tag(.bool), let value = node.bool else {
            self.problem(node, field, "expected true or false, found \(Self.kind(node))")
            return nil
        }
        return value
    }

    mutating func double(_ node: Node?, at field: String, range: ClosedRange<Double>) -> Double? {
        guard let node else { return nil }
        guard case .scalar = node, node.tag == Tag(.int) || node.tag == Tag(.float), let value = node.float else {
            self.problem(node, field, "expected a number, found \(Self.kind(node))")
            return nil
        }
        guard range.contains(value) else {
            self.problem(node, field, "expected a number from \(range.lowerBound) to \(range.upperBound), found \(value)")
            return nil
        }
        return value
    }

    /// A provider kind's key, checked as its spec says.
    mutating func setting(_ node: Node?, _ spec: ProviderKindSpec.Key, at parent: String) -> FleetSetting? {
        let field = "\(parent).\(spec.name)"
        guard let node else {
            if spec.required { _ = self.string(nil, at: field, required: true) }
            return nil
        }
        let line = node.mark?.line ?? 0, column = node.mark?.column ?? 0
        switch spec.kind {
        case .int(let range):
            return self.int(node, at: field, range: range).map { FleetSetting(.int($0), line: line, column: column) }
        case .bool:
            guard case .scalar = node, node.tag == Tag(.bool), let value = node.bool else {
                self.problem(node, field, "expected true or false, found \(Self.kind(node))")
                return nil
            }
            return FleetSetting(.bool(value), line: line, column: column)
        case .list(let regex, let words):
            guard let items = self.stringList(node, at: field) else { return nil }
            for item in items where !ProviderKindSpec.matches(item, regex) {
                self.problem(node, field, "expected \(words), found \"\(item)\"")
            }
            return FleetSetting(.list(items), line: line, column: column)
        case .string, .absolutePath, .url, .name, .pattern:
            guard let text = self.string(node, at: field, required: false) else { return nil }
            let problem: String? = switch spec.kind {
            case .absolutePath: text.hasPrefix("/") ? nil : "expected an absolute path, found \"\(text)\""
            case .url:
                URL(string: text).flatMap { url in ["http", "https"].contains(url.scheme ?? "") && !(url.host ?? "").isEmpty ? url : nil } != nil
                    ? nil : "expected an http:// or https:// URL with a host, found \"\(text)\""
            case .name: Self.isName(text) ? nil : "expected a name (letters, digits, '.', '_', '-'), found \"\(text)\""
            case .pattern(let regex, let words): ProviderKindSpec.matches(text, regex) ? nil : "expected \(words), found \"\(text)\""
            default: text.isEmpty ? "expected a non-empty string, found \"\"" : nil
            }
            if let problem {
                self.problem(node, field, problem)
                return nil
            }
            return FleetSetting(.string(text), line: line, column: column)
        }
    }

    mutating func level(_ node: Node?, at field: String) -> ConsistencyLevel? {
        guard let node else { return nil }
        guard case .scalar = node, let text = node.string, let level = ConsistencyLevel(name: text) else {
            self.problem(node, field, "expected crash, filesystem or application, found \(Self.kind(node))")
            return nil
        }
        return level
    }

    mutating func stringList(_ node: Node?, at field: String) -> [String]? {
        guard let node else { return nil }
        guard case .sequence(let sequence) = node else {
            self.problem(node, field, "expected a list of strings, found \(Self.kind(node))")
            return nil
        }
        var values: [String] = []
        for item in sequence {
            guard case .scalar = item, item.tag == Tag(.str), let text = item.string else {
                self.problem(item, field, "expected a string, found \(Self.kind(item))")
                continue
            }
            values.append(text)
        }
        return values
    }

    /// A mapping of plugin options; each is checked against `plugin`'s schema when it is known,
    /// the problem placed at the option's name (unknown) or its value (wrong type, range).
    mutating func options(_ node: Node?, at field: String, plugin: Plugin?) -> [String: OptionInput] {
        guard let node, let mapping = self.mapping(node, at: field) else { return [:] }
        var options: [String: OptionInput] = [:]
        for (key, value) in mapping {
            guard let name = self.name(key, at: field), let input = self.optionInput(value, at: "\(field).\(name)") else { continue }
            options[name] = input
            guard let plugin else { continue }
            let accepted = plugin.info.options.map(\.name).sorted()
            if !accepted.contains(name) {
                self.problem(key, "\(field).\(name)",
                             "unknown option (\(plugin.name) accepts \(accepted.isEmpty ? "no options" : accepted.joined(separator: ", ")))")
            } else if case .failure(let error) = Result(catching: { try plugin.resolveOptions([name: input]) }) {
                let detail = (error as? PluginError)?.detail ?? "\(error)"
                self.problem(value, "\(field).\(name)", detail.replacingOccurrences(of: "option \(name): ", with: ""))
            }
        }
        return options
    }

    mutating func optionInput(_ node: Node, at field: String) -> OptionInput? {
        switch node {
        case .scalar:
            if node.tag == Tag(.bool), let value = node.bool { return .bool(value) }
            if node.tag == Tag(.int), let value = node.int { return .int(Int64(value)) }
            if node.tag == Tag(.str), let value = node.string { return .string(value) }
            self.problem(node, field, "expected a bool, a whole number, a string or a list of strings, found \(Self.kind(node))")
            return nil
        case .sequence:
            return self.stringList(node, at: field).map { .list($0) }
        default:
            self.problem(node, field, "expected a bool, a whole number, a string or a list of strings, found \(Self.kind(node))")
            return nil
        }
    }

    static func isName(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 64
            && text.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) && $0.isASCII || "._-".unicodeScalars.contains($0) }
    }
}
