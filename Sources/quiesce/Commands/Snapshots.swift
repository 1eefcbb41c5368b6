import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import QuiesceProto
import QuiesceCatalog
import QuiesceCore
import QuiesceFleet
import QuiesceInventory
import QuiesceProviders

/// Where snapshots and their records live. Each group is reached through the
/// provider it recorded: the catalog remembers every fleet provider a run used
/// (a pool's path; an EC2 region, profile and endpoint — never credentials).
struct StoreOptions: ParsableArguments {
    @Option(help: catalogHelp)
    var catalog: String?
    @Option(help: ArgumentHelp("The pool of every local group (default: the pool its run recorded, else $QUIESCE_HOME/pool).", valueName: "dir"))
    var pool: String?
    @Option(help: ArgumentHelp("A fleet file whose providers are used instead of the ones the catalog recorded (same names).", valueName: "file"))
    var fleet: String?

    func inventory() async throws -> Inventory {
        let (catalog, _) = try await openCatalog(self.catalog)
        do {
            let fleet = try self.fleet.map { try FleetFile.load($0) }
            return Inventory(catalog: catalog, providers: await ProviderDirectory(
                catalog: catalog, fleet: fleet, localPool: self.pool, defaultPool: defaultStateDirectory() + "/pool"))
        } catch let error as FleetFileError {
            for problem in error.problems { printError("\(problem)") }
            throw ExitCode(65)
        } catch {
            printError("\(error)")
            throw ExitStatus.failure
        }
    }
}

/// Runs `body`, turning the errors operators can act on into a message and exit 1.
func operatorErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as ExitCode {
        throw error
    } catch {
        printError("\(error)")
        throw ExitStatus.failure
    }
}

func encodeJSON<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.dateEncodingStrategy = .iso8601
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// What a catalog command prints, and its exit code: built once, printed here or sent to a
/// remote operator by the engine (`service Inventory` in admin.proto).
struct CommandOutput: Sendable {
    var text = ""
    var exitCode: Int32 = 0
    mutating func line(_ line: String) { self.text += line + "\n" }
}

/// A catalog command that runs here on a local catalog, or on the engine for an operator elsewhere.
protocol InventoryCommandRunnable: AsyncParsableCommand {
    /// The `Inventory` RPC that runs it on the engine.
    static var remoteMethod: String { get }
    var store: StoreOptions { get }
    var remote: RemoteAdminOptions { get }
    func render(_ inventory: Inventory) async throws -> CommandOutput
}

extension InventoryCommandRunnable {
    func runHereOrRemotely() async throws {
        if self.remote.engineAddress != nil {
            let output = try await self.runRemotely()
            print(output.stdout, terminator: "")
            if !output.stderr.isEmpty { FileHandle.standardError.write(Data(output.stderr.utf8)) }
            if output.exitCode != 0 { throw ExitCode(output.exitCode) }
            return
        }
        let output = try await operatorErrors { try await self.render(try await self.store.inventory()) }
        print(output.text, terminator: "")
        if output.exitCode != 0 { throw ExitCode(output.exitCode) }
    }

    /// The command line as given, without the subcommand and the options that say where the engine is.
    static func forwardedArguments(_ argv: [String] = CommandLine.arguments) -> [String] {
        let withValue: Set<String> = ["--engine-address", "--cert", "--key", "--ca", "--admin-socket"]
        var arguments: [String] = []
        var index = 2  // the program and the subcommand
        while index < argv.count {
            let argument = argv[index]
            if withValue.contains(argument) { index += 2; continue }
            if withValue.contains(where: { argument.hasPrefix($0 + "=") }) { index += 1; continue }
            arguments.append(argument)
            index += 1
        }
        return arguments
    }

    func runRemotely() async throws -> Quiesce_Admin_V1_InventoryOutput {
        let request = Quiesce_Admin_V1_InventoryCommand.with { $0.arguments = Self.forwardedArguments() }
        return try await withAdminConnection(socket: nil, remote: self.remote) { client in
            let inventory = Quiesce_Admin_V1_Inventory.Client(wrapping: client)
            switch Self.remoteMethod {
            case "Snapshots": return try await inventory.snapshots(request)
            case "Show": return try await inventory.show(request)
            case "Verify": return try await inventory.verify(request)
            case "Restore": return try await inventory.restore(request)
            case "Reconcile": return try await inventory.reconcile(request)
            default: return try await inventory.prune(request)
            }
        }
    }
}

/// `quiesce.admin.v1.Inventory`, in `quiesce serve`: the catalog commands on the engine's own catalog.
struct InventoryService: Quiesce_Admin_V1_Inventory.SimpleServiceProtocol {
    /// Made per call: the providers a run recorded since the engine started must be found.
    let makeInventory: @Sendable () async -> Inventory
    var inventory: Inventory { get async { await self.makeInventory() } }

    static func execute<C: InventoryCommandRunnable>(_ type: C.Type, _ request: Quiesce_Admin_V1_InventoryCommand, _ inventory: Inventory) async
        -> Quiesce_Admin_V1_InventoryOutput
    {
        var output = Quiesce_Admin_V1_InventoryOutput()
        for option in ["--catalog", "--pool", "--fleet", "--engine-address", "--admin-socket", "--cert", "--key", "--ca"]
        where request.arguments.contains(where: { $0 == option || $0.hasPrefix(option + "=") }) {
            output.stderr = "quiesce: \(option) cannot be given to a remote engine: it uses its own catalog and providers\n"
            output.exitCode = 64
            return output
        }
        let command: C
        do {
            command = try C.parse(request.arguments)
        } catch {
            output.stderr = C.fullMessage(for: error) + "\n"
            output.exitCode = 64
            return output
        }
        do {
            let rendered = try await command.render(inventory)
            output.stdout = rendered.text
            output.exitCode = rendered.exitCode
        } catch {
            output.stderr = "quiesce: \(error)\n"
            output.exitCode = 1
        }
        return output
    }

    func snapshots(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Snapshots.self, request, await self.inventory)
    }
    func show(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Show.self, request, await self.inventory)
    }
    func verify(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Verify.self, request, await self.inventory)
    }
    func restore(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Restore.self, request, await self.inventory)
    }
    func prune(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Prune.self, request, await self.inventory)
    }
    func reconcile(request: Quiesce_Admin_V1_InventoryCommand, context: ServerContext) async throws -> Quiesce_Admin_V1_InventoryOutput {
        await Self.execute(Reconcile.self, request, await self.inventory)
    }
}

func milliseconds(_ us: UInt64?) -> String { us.map { String(format: "%.1f ms", Double($0) / 1000) } ?? "-" }

struct Snapshots: InventoryCommandRunnable {
    static let configuration = CommandConfiguration(
        abstract: "List snapshot groups from the catalog, newest first.")
    static let remoteMethod = "Snapshots"

    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Only this instance.")
    var instance: String?
    @Option(help: "Only groups that reached this level: crash, filesystem, application.")
    var level: String?
    @Option(help: "Only this run.")
    var run: String?
    @Option(help: ArgumentHelp("Only groups older than this (e.g. 7d, 12h).", valueName: "duration"))
    var olderThan: String?
    @Option(help: ArgumentHelp("Only groups newer than this (e.g. 30m).", valueName: "duration"))
    var newerThan: String?
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        if let level, ConsistencyLevel(name: level) == nil {
            throw ValidationError("expected --level crash, filesystem or application, found \"\(level)\"")
        }
        for (flag, value) in [("--older-than", self.olderThan), ("--newer-than", self.newerThan)] {
            if let value, parseDuration(value) == nil {
                throw ValidationError("expected \(flag) as a number with s, m, h, d or w (e.g. 7d), found \"\(value)\"")
            }
        }
    }

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let now = Date()
        let filter = GroupFilter(
            instanceID: self.instance, runID: self.run, level: self.level.flatMap(ConsistencyLevel.init(name:)),
            createdBefore: self.olderThan.flatMap(parseDuration).map { now.addingTimeInterval(-$0.timeInterval) },
            createdAfter: self.newerThan.flatMap(parseDuration).map { now.addingTimeInterval(-$0.timeInterval) })
        let groups = try await inventory.groups(filter)
        if self.output == .json {
            out.line(try encodeJSON(groups))
            return out
        }
        guard !groups.isEmpty else {
            out.line("no snapshot groups match")
            return out
        }
        var table = TextTable(headers: ["GROUP", "INSTANCE", "CREATED", "WANTED", "ACHIEVED", "FROZEN", "DISKS", "STATE", "REASON"])
        let formatter = ISO8601DateFormatter()
        for group in groups {
            table.append([
                group.id, group.instanceID, formatter.string(from: group.createdAt), group.wantedLevel.name, group.achievedLevel.name,
                milliseconds(group.frozenUs), "\(group.disks.count)", group.state.rawValue, group.reasons.first?.code ?? "",
            ])
        }
        out.line(table.render())
        return out
    }
}

struct Show: InventoryCommandRunnable {
    static let configuration = CommandConfiguration(abstract: "Show one snapshot group: levels, reasons, timings, disks.")
    static let remoteMethod = "Show"

    @Argument(help: "The group id.")
    var group: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let group = try await inventory.group(self.group)
        if self.output == .json {
            out.line(try encodeJSON(group))
            return out
        }
        out.line("""
            group       \(group.id)  (provider \(group.provider), \(group.providerKind) \(group.providerGroupID))
            instance    \(group.instanceID)\(group.runID.map { "  run \($0)" } ?? "")
            created     \(ISO8601DateFormatter().string(from: group.createdAt))  state \(group.state.rawValue)
            level       \(group.achievedLevel.name) (wanted \(group.wantedLevel.name))
            frozen      \(milliseconds(group.frozenUs)); application stall \(milliseconds(group.applicationStallUs))
            """)
        for reason in group.reasons { out.line("reason      \(reason.code): \(reason.message)") }
        for (step, us) in group.stepTimingsUs.sorted(by: { $0.key < $1.key }) { out.line("step        \(step) \(milliseconds(us))") }
        if !group.tags.isEmpty { out.line("tags        " + group.tags.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")) }
        out.line("")
        var table = TextTable(headers: ["DISK", "SNAPSHOT", "SIZE", "DATA", "METHOD", "TOOK", "SHA256"])
        for disk in group.disks {
            table.append([
                disk.diskID, disk.snapshotID, formatBytes(disk.sizeBytes), formatBytes(disk.dataBytes), disk.method.rawValue,
                milliseconds(disk.durationUs), disk.sha256.map { String($0.prefix(16)) + "…" } ?? (disk.method == .provider ? "-" : "(pending)"),
            ])
        }
        out.line(table.render())
        if group.disks.contains(where: { $0.method == .sparseCopy }) {
            out.line("\nnote: sparse copy, not reflink: the pool's filesystem cannot share extents, so the copy time "
                + "fell inside the freeze window. An XFS pool made with `mkfs.xfs -m reflink=1` avoids this.")
        }
        return out
    }
}

struct Restore: InventoryCommandRunnable {
    static let configuration = CommandConfiguration(
        abstract: "Restore a group's disks as new disks, or in place over disks nothing has attached.")
    static let remoteMethod = "Restore"

    @Argument(help: "The group id.")
    var group: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Only this disk.")
    var disk: String?
    @Flag(help: "Write new disks named DISK-restored-GROUP.")
    var asNew = false
    @Flag(help: "Overwrite the original disks (refused while a disk is attached or mounted; local pools only).")
    var inPlace = false
    @Option(help: ArgumentHelp("A cloud's availability zone for the new volumes (default: the source volume's).", valueName: "zone"))
    var zone: String?
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        guard self.asNew != self.inPlace else { throw ValidationError("expected exactly one of --as-new or --in-place") }
        if self.zone != nil && self.inPlace { throw ValidationError("--zone: only with --as-new (a new volume is made in it)") }
    }

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let group = try await inventory.group(self.group)
        let restored = try await inventory.restore(self.group, disk: self.disk, inPlace: self.inPlace, newSuffix: "restored-\(self.group)", zone: self.zone)
        if self.output == .json {
            out.line(try encodeJSON(restored.map { ["disk": $0.disk, "restored_as": $0.restoredAs, "location": inventory.location(ofRestored: $0.restoredAs, group: group)] }))
            return out
        }
        for (disk, target) in restored {
            out.line("restored \(disk) → \(inventory.location(ofRestored: target, group: group))")
        }
        return out
    }
}

struct Prune: InventoryCommandRunnable {
    static let configuration = CommandConfiguration(
        abstract: "Delete old snapshot groups, per instance, keeping the newest N, everything recent, and one per day, week or month.",
        discussion: "A group any rule keeps is kept; an instance's newest application-consistent group and groups still pending are never deleted.")
    static let remoteMethod = "Prune"

    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Option(help: "Keep at least this many newest groups per instance (0: none by this rule).")
    var keepLast: Int?
    @Option(help: ArgumentHelp("Also keep every group newer than this (e.g. 7d).", valueName: "duration"))
    var keepWithin: String?
    @Option(help: ArgumentHelp("Also keep the newest group of each of the last N days (UTC).", valueName: "N"))
    var daily: Int = 0
    @Option(help: ArgumentHelp("Also keep the newest group of each of the last N ISO weeks.", valueName: "N"))
    var weekly: Int = 0
    @Option(help: ArgumentHelp("Also keep the newest group of each of the last N months.", valueName: "N"))
    var monthly: Int = 0
    @Option(help: "Only this instance.")
    var instance: String?
    @Flag(help: "Show what would be deleted; delete nothing.")
    var dryRun = false

    func validate() throws {
        for (flag, value) in [("--keep-last", self.keepLast ?? 0), ("--daily", self.daily), ("--weekly", self.weekly), ("--monthly", self.monthly)] where value < 0 {
            throw ValidationError("expected \(flag) 0 or more, found \(value)")
        }
        if self.keepLast == nil && self.keepWithin == nil && self.daily == 0 && self.weekly == 0 && self.monthly == 0 {
            throw ValidationError("say what to keep: --keep-last N, --keep-within DURATION, --daily N, --weekly N or --monthly N")
        }
        if let value = self.keepWithin, parseDuration(value) == nil {
            throw ValidationError("expected --keep-within as a number with s, m, h, d or w (e.g. 7d), found \"\(value)\"")
        }
    }

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let policy = PrunePolicy(keepLast: self.keepLast ?? 0, keepWithin: self.keepWithin.flatMap(parseDuration), daily: self.daily, weekly: self.weekly,
                                 monthly: self.monthly)
        let plan = try await inventory.prune(policy, instanceID: self.instance, dryRun: self.dryRun)
        for group in plan.delete {
            out.line("\(self.dryRun ? "would delete" : "deleted") \(group.id) (\(group.instanceID), \(ISO8601DateFormatter().string(from: group.createdAt)))")
        }
        out.line("\(self.dryRun ? "would keep" : "kept") \(plan.keep.count), \(self.dryRun ? "would delete" : "deleted") \(plan.delete.count)")
        return out
    }
}

struct Verify: InventoryCommandRunnable {
    static let remoteMethod = "Verify"
    static let configuration = CommandConfiguration(
        abstract: "Check a group's snapshots against the checksums recorded at creation.",
        discussion: "With --deep, also fsck each disk on a throw-away copy (needs root for XFS). Exit 1 when any disk fails.")

    @Argument(help: "The group id.")
    var group: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Flag(help: "Also check each disk's filesystem on a copy.")
    var deep = false
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let checks = try await inventory.verify(self.group, deep: self.deep)
        if self.output == .json {
            let rows = checks.map { ["disk": $0.disk, "outcome": $0.outcome.rawValue, "filesystem": $0.filesystem ?? "", "detail": $0.detail] }
            out.line(try encodeJSON(rows))
        } else {
            var table = TextTable(headers: ["DISK", "RESULT", "FILESYSTEM", "DETAIL"])
            for check in checks { table.append([check.disk, check.outcome.rawValue, check.filesystem ?? "-", check.detail]) }
            out.line(table.render())
        }
        if checks.contains(where: { $0.outcome != .ok && $0.outcome != .okAfterRecovery }) { out.exitCode = 1 }
        return out
    }
}

struct Reconcile: InventoryCommandRunnable {
    static let remoteMethod = "Reconcile"
    static let configuration = CommandConfiguration(
        abstract: "Find snapshot groups a provider holds with Quiesce's tags but the catalog never recorded; adopt them.",
        discussion: """
            An engine that died between a provider's create and its catalog write (or a lost catalog) \
            leaves groups only the provider knows. This lists them, for every provider the catalog \
            (or --fleet) names. With --adopt each is recorded: at the level its quiesce:level tag says \
            (the thaw reply had proved it before the tag was written), or crash-consistent, and tagged \
            so, when it has none.

            Exit codes: 0 nothing left unrecorded; 2 groups found and not recorded (listed, or their \
            adoption failed); 1 a provider could not be listed.
            """)

    @OptionGroup var store: StoreOptions
    @OptionGroup var remote: RemoteAdminOptions
    @Flag(help: "Record every group found in the catalog.")
    var adopt = false
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws { try await self.runHereOrRemotely() }

    func render(_ inventory: Inventory) async throws -> CommandOutput {
        var out = CommandOutput()
        let fleet = self.store.fleet.flatMap { try? FleetFile.load($0) }
        let result = try await inventory.reconcile(adopt: self.adopt) { name in fleet?.policy(named: name)?.wanted }
        if self.output == .json {
            out.line(try encodeJSON(ReconcileReport(orphans: result.orphans, unreachable: result.unreachable)))
        } else if result.orphans.isEmpty {
            out.line("every group the providers hold with Quiesce's tags is in the catalog")
        } else {
            var table = TextTable(headers: ["GROUP", "PROVIDER", "RUN", "INSTANCE", "CREATED", "LEVEL TAG", "DISKS", "ACTION"])
            let formatter = ISO8601DateFormatter()
            for orphan in result.orphans {
                table.append([orphan.groupID, orphan.provider, orphan.runID, orphan.instanceID, formatter.string(from: orphan.createdAt),
                              orphan.taggedLevel?.name ?? "(none: crash)", "\(orphan.disks)", orphan.action])
            }
            out.line(table.render())
            let left = result.orphans.filter { $0.action != "adopted" }.count
            out.line(self.adopt ? "\(result.orphans.count - left) adopted, \(left) not" : "\(left) not in the catalog; `quiesce reconcile --adopt` records them")
        }
        for problem in result.unreachable { out.line("unreachable: \(problem)") }
        if !result.unreachable.isEmpty {
            out.exitCode = 1
        } else if result.orphans.contains(where: { $0.action != "adopted" }) {
            out.exitCode = 2
        }
        return out
    }
}

/// `quiesce reconcile --output json`.
struct ReconcileReport: Encodable {
    var orphans: [Inventory.Orphan]
    var unreachable: [String]
}
