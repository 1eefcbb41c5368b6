import ArgumentParser
import Foundation
import QuiesceCoordinator
import QuiesceCore
import QuiesceFleet
import QuiesceProviders

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a fleet's providers before a run: credentials, permissions, instances and disks, limits.",
        discussion: """
            Runs every provider's own check, as `quiesce backup` does before it freezes \
            anything: for ec2, the credentials it found (never printed), each permission it \
            needs asked with DryRun (what is missing is named), every instance and volume, \
            and the group size limit; for local, the pool and each disk image.

            Exit codes: 0 every check passed; 2 only checks that a backup does not need \
            failed (restore's CreateVolume, prune's DeleteSnapshot); 3 a check a backup needs \
            failed; 65 the fleet file has problems.
            """)

    @Option(help: ArgumentHelp("The fleet file (YAML).", valueName: "file"))
    var fleet: String
    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func run() async throws {
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        let fleet = try loadFleet(self.fleet, plugins: registry)
        var rows: [(provider: String, kind: String, item: ProviderCheckItem)] = []
        for spec in fleet.providers {
            let instances = fleet.instances.filter { $0.provider == spec.name }
            do {
                let provider = try ProviderKinds.make(spec)
                for item in await provider.check(instances.map(ProviderKinds.target)) { rows.append((spec.name, spec.kind, item)) }
            } catch {
                rows.append((spec.name, spec.kind, ProviderCheckItem(item: "configuration", ok: false, detail: "\(error)")))
            }
        }
        if self.output == .json {
            print(try encodeJSON(rows.map { row in
                ["provider": row.provider, "kind": row.kind, "instance": row.item.instanceID ?? "", "item": row.item.item,
                 "ok": row.item.ok ? "true" : "false", "blocking": row.item.blocking ? "true" : "false", "detail": row.item.detail]
            }))
        } else {
            var table = TextTable(headers: ["PROVIDER", "INSTANCE", "CHECK", "RESULT", "DETAIL"])
            for row in rows {
                table.append([row.provider, row.item.instanceID ?? "-", row.item.item,
                              row.item.ok ? "ok" : row.item.blocking ? "FAILED" : "warning", row.item.detail])
            }
            print(table.render())
            let failed = rows.filter { !$0.item.ok }
            print(failed.isEmpty ? "\nevery check passed" : "\n\(failed.filter(\.item.blocking).count) failed, \(failed.filter { !$0.item.blocking }.count) warnings")
        }
        if rows.contains(where: { !$0.item.ok && $0.item.blocking }) { throw ExitCode(3) }
        if rows.contains(where: { !$0.item.ok }) { throw ExitCode(2) }
    }
}
