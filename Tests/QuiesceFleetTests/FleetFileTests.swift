import QuiesceCore
import QuiesceFleet
import QuiescePlugins
import Testing

@Suite("Fleet files")
struct FleetFileTests {
    static let good = """
        providers:
          pool: { kind: local, pool: /var/lib/quiesce/pool, burst: 20, per_second: 50 }
        policies:
          app:
            plugin: linux-freeze
            wanted: application
            minimum: filesystem
            freeze_budget_ms: 8000
            retries: 3
            options: { skip_mounts: [/boot/efi], fs_freeze: true, prescript_timeout_ms: 1500 }
          baseline: { plugin: crash, wanted: crash }
        instances:
          - { id: web-1, policy: app, disks: [web-1-root, web-1-data] }
          - id: db-1
            policy: baseline
            provider: pool
            disks: [db-1-root]
        run: { concurrency: 4, agent_wait_s: 30 }
        """

    @Test("a good file: providers, policies with typed options, instances (the only provider is the default)")
    func good() throws {
        let fleet = try FleetFile.parse(Self.good, path: "fleet.yaml")
        let pool = try #require(fleet.providers.first)
        #expect(fleet.providers.count == 1 && pool.name == "pool" && pool.kind == "local" && pool.pool == "/var/lib/quiesce/pool")
        #expect(pool.burst == 20 && pool.perSecond == 50 && pool.line == 2)
        let app = try #require(fleet.policy(named: "app"))
        #expect(app.plugin == "linux-freeze" && app.wanted == .application && app.minimum == .filesystem)
        #expect(app.freezeBudgetMs == 8000 && app.retries == 3)
        #expect(app.options == ["skip_mounts": .list(["/boot/efi"]), "fs_freeze": .bool(true), "prescript_timeout_ms": .int(1500)])
        #expect(fleet.policy(named: "baseline")?.wanted == .crash && fleet.policy(named: "baseline")?.minimum == .crash)
        #expect(fleet.instances.map(\.id) == ["web-1", "db-1"])
        #expect(fleet.instances[0].provider == "pool" && fleet.instances[0].disks == ["web-1-root", "web-1-data"])
        #expect(fleet.concurrency == 4 && fleet.agentWaitSeconds == 30)
        // Defaults: 8 quiesced at once; planning one slot per 25 creates/s of the fastest provider, at least 2.
        #expect(fleet.maxFrozen == 8 && fleet.planning == nil && fleet.defaultPlanning == 2)
        let fast = try FleetFile.parse(
            Self.good.replacingOccurrences(of: "per_second: 50", with: "per_second: 400")
                .replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, max_frozen: 3, planning: 5"), path: "fleet.yaml")
        #expect(fast.defaultPlanning == 16 && fast.planning == 5 && fast.maxFrozen == 3)
        let zero = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good.replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, max_frozen: 0"), path: "f.yaml")
        }
        #expect(zero.problems.map(\.description).first?.contains("run.max_frozen: expected a whole number from 1 to 1000, found 0") == true,
                "\(zero.problems)")
    }

    @Test("every problem at once, each with file, line, field, expected and found")
    func problems() throws {
        let text = """
            providers:
              pool: { kind: s3, pool: relative/path, burst: lots }
            policies:
              app:
                plugin: linux-freeze
                wanted: everything
                minimum: application
                freeze_budget_ms: 5
                colour: blue
            instances:
              - { id: web-1, policy: nope, disks: web-1-root }
              - { id: web-1, policy: app, provider: other, disks: [] }
              - { id: "bad id!", policy: app }
            """
        let error = try #require(throws: FleetFileError.self) { try FleetFile.parse(text, path: "f.yaml") }
        let lines = error.problems.map(\.description)
        let expected = [
            "f.yaml:2:17: providers.pool.kind: expected a provider kind this engine has (local), found \"s3\"",
            "f.yaml:2:27: providers.pool.pool: expected an absolute path, found \"relative/path\"",
            "f.yaml:2:49: providers.pool.burst: expected a whole number from 1 to 10000, found \"lots\"",
            "f.yaml:9:5: policies.app.colour: unknown key (expected one of plugin, wanted, minimum, freeze_budget_ms, retries, options)",
            "f.yaml:6:13: policies.app.wanted: expected crash, filesystem or application, found \"everything\"",
            "f.yaml:8:23: policies.app.freeze_budget_ms: expected a whole number from 100 to 600000, found 5",
            "f.yaml:11:26: instances[0].policy: expected a policy defined under policies (app), found \"nope\"",
            "f.yaml:11:39: instances[0].disks: expected a list of strings, found \"web-1-root\"",
            "f.yaml:12:11: instances[1].id: instance web-1 is listed twice (first at line 11)",
            "f.yaml:12:41: instances[1].provider: expected a provider defined under providers (pool), found \"other\"",
            "f.yaml:12:55: instances[1].disks: expected at least one disk id, found an empty list",
            "f.yaml:13:11: instances[2].id: expected letters, digits, '.', '_' or '-' (at most 64), found \"bad id!\"",
            "f.yaml:13:5: instances[2].disks: missing: list the instance's disks (provider disk ids)",
        ]
        #expect(lines.count == expected.count, "\(lines)")
        for line in expected { #expect(lines.contains(line), "missing: \(line)\n got:\n\(lines.joined(separator: "\n"))") }
        // minimum above wanted is only checked when wanted parsed; here wanted fell back to application.
    }

    @Test("not YAML, not a mapping, missing sections, consistency groups not yet")
    func shapes() throws {
        let yaml = try #require(throws: FleetFileError.self) { try FleetFile.parse("providers: [unclosed", path: "x.yaml") }
        #expect(yaml.problems.first?.description.hasPrefix("x.yaml:") == true && yaml.problems.first?.message.hasPrefix("not valid YAML") == true)
        let list = try #require(throws: FleetFileError.self) { try FleetFile.parse("- a\n- b\n", path: "x.yaml") }
        #expect(list.problems.first?.message == "expected a mapping with providers, policies and instances, found a list")
        let empty = try #require(throws: FleetFileError.self) { try FleetFile.parse("run: {concurrency: 2}\n", path: "x.yaml") }
        #expect(Set(empty.problems.map(\.field)) == ["providers", "policies", "instances"])
        let groups = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good + "\ngroups: { db: [web-1, db-1] }\n", path: "x.yaml")
        }
        #expect(groups.problems.map(\.message) == ["multi-instance consistency groups are not supported yet; remove the key"])
    }

    @Test("plugin options checked against the loaded plugin's schema, with the option's line")
    func pluginOptions() async throws {
        let registry = await PluginRegistry.load(
            searchPath: PluginSearchPath(entries: [.init(path: Self.buildDirectory, explicit: false, prefix: "libquiesce-plugin-")]),
            hostExecutable: Self.buildDirectory + "/quiesce-plugin-host")
        defer { Task { await registry.shutdown() } }
        #expect(try FleetFile.parse(Self.good, path: "fleet.yaml", plugins: registry).instances.count == 2)
        let typo = Self.good.replacingOccurrences(of: "fs_freeze: true", with: "fs_frezee: true")
            .replacingOccurrences(of: "prescript_timeout_ms: 1500", with: "prescript_timeout_ms: soon")
            .replacingOccurrences(of: "plugin: crash", with: "plugin: crsh")
        let error = try #require(throws: FleetFileError.self) { try FleetFile.parse(typo, path: "fleet.yaml", plugins: registry) }
        let text = error.description
        #expect(text.contains("fleet.yaml:10:42: policies.app.options.fs_frezee: unknown option (linux-freeze accepts application_consistent, "), "\(text)")
        #expect(text.contains("fleet.yaml:10:81: policies.app.options.prescript_timeout_ms: expected milliseconds, found a string (\"soon\")"), "\(text)")
        #expect(text.contains("policies.baseline.plugin: expected a loaded plugin (crash, linux-freeze, mariadb), found \"crsh\""), "\(text)")
    }

    static var buildDirectory: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
    }
}

import Foundation
