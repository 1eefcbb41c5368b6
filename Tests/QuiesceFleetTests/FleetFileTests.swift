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
        #expect(fleet.maxFrozen == 8 && fleet.paceFrozen && fleet.planning == nil && fleet.defaultPlanning == 2 && fleet.frozenFirstMs == 20)
        let fast = try FleetFile.parse(
            Self.good.replacingOccurrences(of: "per_second: 50", with: "per_second: 400")
                .replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, max_frozen: 3, pace_frozen: false, planning: 5, frozen_first_ms: 0"),
            path: "fleet.yaml")
        #expect(fast.defaultPlanning == 16 && fast.planning == 5 && fast.maxFrozen == 3 && !fast.paceFrozen && fast.frozenFirstMs == 0)
        let word = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good.replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, pace_frozen: sometimes"), path: "f.yaml")
        }
        #expect(word.problems.map(\.description).first?.contains("run.pace_frozen: expected true or false, found \"sometimes\"") == true,
                "\(word.problems)")
        let zero = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good.replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, max_frozen: 0"), path: "f.yaml")
        }
        #expect(zero.problems.map(\.description).first?.contains("run.max_frozen: expected a whole number from 1 to 1000, found 0") == true,
                "\(zero.problems)")
        let long = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good.replacingOccurrences(of: "agent_wait_s: 30", with: "agent_wait_s: 30, frozen_first_ms: -1"), path: "f.yaml")
        }
        #expect(long.problems.map(\.description).first?.contains("run.frozen_first_ms: expected a whole number from 0 to 10000, found -1") == true,
                "\(long.problems)")
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
            "f.yaml:2:17: providers.pool.kind: expected a provider kind this engine has (ec2, local), found \"s3\"",
            "f.yaml:2:27: providers.pool.pool: expected an absolute path, found \"relative/path\"",
            "f.yaml:2:49: providers.pool.burst: expected a whole number from 1 to 10000, found \"lots\"",
            "f.yaml:9:5: policies.app.colour: unknown key (expected one of plugin, wanted, minimum, freeze_budget_ms, retries, options, retention)",
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

    @Test("not YAML, not a mapping, missing sections")
    func shapes() throws {
        let yaml = try #require(throws: FleetFileError.self) { try FleetFile.parse("providers: [unclosed", path: "x.yaml") }
        #expect(yaml.problems.first?.description.hasPrefix("x.yaml:") == true && yaml.problems.first?.message.hasPrefix("not valid YAML") == true)
        let list = try #require(throws: FleetFileError.self) { try FleetFile.parse("- a\n- b\n", path: "x.yaml") }
        #expect(list.problems.first?.message == "expected a mapping with providers, policies and instances, found a list")
        let empty = try #require(throws: FleetFileError.self) { try FleetFile.parse("run: {concurrency: 2}\n", path: "x.yaml") }
        #expect(Set(empty.problems.map(\.field)) == ["providers", "policies", "instances"])
    }

    @Test("consistency groups: members, barrier, and everything the group takes at once checked against the provider's burst and the run's slots")
    func groups() throws {
        let fleet = try FleetFile.parse(Self.good + "\ngroups:\n  shop: { members: [web-1, db-1], barrier_ms: 1500 }\n", path: "x.yaml")
        #expect(fleet.groups == [.init(name: "shop", members: ["web-1", "db-1"], barrierMs: 1500, line: 20)])
        #expect(fleet.group(of: "db-1")?.name == "shop" && fleet.group(of: "nope") == nil)
        #expect(try FleetFile.parse(Self.good + "\ngroups: { g: { members: [web-1, db-1] } }\n", path: "x.yaml").groups.first?.barrierMs == 2000)

        func problems(_ groups: String, run: String = "run: { concurrency: 4, agent_wait_s: 30 }", burst: Int = 20) throws -> [String] {
            let text = Self.good.replacingOccurrences(of: "run: { concurrency: 4, agent_wait_s: 30 }", with: run)
                .replacingOccurrences(of: "burst: 20", with: "burst: \(burst)")
            let error = try #require(throws: FleetFileError.self) { try FleetFile.parse(text + "\ngroups:\n" + groups + "\n", path: "x.yaml") }
            return error.problems.map { "\($0.field): \($0.message)" }
        }
        #expect(try problems("  g: { members: [web-1] }") == ["groups.g.members: expected at least two instances, found 1"])
        #expect(try problems("  g: { members: [web-1, web-9] }") == ["groups.g.members: expected instances listed under instances, found \"web-9\""])
        #expect(try problems("  g: { members: [web-1, web-1, db-1] }") == ["groups.g.members: instance web-1 is listed twice"])
        #expect(try problems("  g: { members: [web-1, db-1] }\n  h: { members: [db-1, web-1] }") == [
            "groups.h.members: instance db-1 is already in group g; an instance is in one group at most",
            "groups.h.members: instance web-1 is already in group g; an instance is in one group at most"])
        #expect(try problems("  g: { barrier_ms: 100 }") == ["groups.g.members: missing: list the group's instances (at least two)"])
        #expect(try problems("  g: { members: [web-1, db-1], barrier_ms: 5000 }").first
                == "groups.g.members: barrier_ms 5000 must be at most half of web-1's freeze budget (8000 ms, policy app): members wait at the barrier frozen")
        #expect(try problems("  g: { members: [web-1, db-1] }", burst: 1) == ["groups.g.members: the group needs 2 slots at provider pool at once, its burst is 1"])
        #expect(try problems("  g: { members: [web-1, db-1] }", run: "run: { concurrency: 4, max_frozen: 1 }")
                == ["groups.g.members: the group quiesces 2 instances at once, run.max_frozen is 1"])
        #expect(try problems("  g: { members: [web-1, db-1] }", run: "run: { concurrency: 1 }") == ["groups.g.members: the group runs 2 instances at once, run.concurrency is 1"])
        #expect(try problems("  g: { members: [web-1, db-1], size: 2 }") == ["groups.g.size: unknown key (expected one of members, barrier_ms)"])
        let onInstance = try #require(throws: FleetFileError.self) {
            try FleetFile.parse(Self.good.replacingOccurrences(of: "disks: [web-1-root, web-1-data] }", with: "disks: [web-1-root], group: shop }"), path: "x.yaml")
        }
        #expect(onInstance.problems.map(\.message) == ["expected the group under groups (groups: { NAME: { members: [web-1, …] } }), found it on the instance"])
    }

    @Test("an ec2 provider: its own keys and instance keys, disks found from ec2_instance, every mistake with its line")
    func ec2Block() throws {
        let good = """
            providers:
              aws: { kind: ec2, region: us-east-1, profile: prod, endpoint_url: "http://127.0.0.1:5000" }
              pool: { kind: local, pool: /srv/pool }
            policies:
              app: { plugin: linux-freeze }
            instances:
              - { id: web-1, policy: app, provider: aws, ec2_instance: i-0abc12345def67890, exclude_boot_volume: true }
              - { id: web-2, policy: app, provider: aws, disks: [vol-0abc12345def67890] }
              - { id: web-3, policy: app, provider: pool, disks: [web-3-root] }
            """
        let fleet = try FleetFile.parse(good, path: "f.yaml")
        let aws = try #require(fleet.provider(named: "aws"))
        #expect(aws.kind == "ec2" && aws.settings["region"]?.string == "us-east-1" && aws.settings["profile"]?.string == "prod")
        #expect(aws.burst == ProviderKindSpec.ec2.defaultBurst && aws.perSecond == ProviderKindSpec.ec2.defaultPerSecond)
        #expect(fleet.instances[0].disks.isEmpty && fleet.instances[0].providerSettings["ec2_instance"]?.string == "i-0abc12345def67890")
        #expect(fleet.instances[0].providerSettings["exclude_boot_volume"]?.bool == true)
        let bad = """
            providers:
              aws: { kind: ec2, region: Virginia, endpoint_url: "ftp://x", pool: /srv, poll_ms: 1 }
              pool: { kind: local, pool: /srv/pool }
            policies:
              app: { plugin: linux-freeze }
            instances:
              - { id: web-1, policy: app, provider: aws, ec2_instance: web-1, exclude_boot_volume: yes please }
              - { id: web-2, policy: app, provider: aws, disks: [web-2-root], exclude_volumes: [vol-1] }
              - { id: web-3, policy: app, provider: aws }
              - { id: web-4, policy: app, provider: pool, disks: [web-4-root], ec2_instance: i-0abc12345def67890 }
            """
        let error = try #require(throws: FleetFileError.self) { try FleetFile.parse(bad, path: "f.yaml") }
        let lines = error.problems.map(\.description)
        for expected in [
            "f.yaml:2:64: providers.aws.pool: unknown key (expected one of kind, burst, per_second, region, profile, endpoint_url, snapshot_timeout_s, poll_ms)",
            "f.yaml:2:29: providers.aws.region: expected an AWS region such as us-east-1, found \"Virginia\"",
            "f.yaml:2:53: providers.aws.endpoint_url: expected an http:// or https:// URL with a host, found \"ftp://x\"",
            "f.yaml:2:85: providers.aws.poll_ms: expected a whole number from 10 to 60000, found 1",
            "f.yaml:7:60: instances[0].ec2_instance: expected an EC2 instance id such as i-0abc12345def67890, found \"web-1\"",
            "f.yaml:7:88: instances[0].exclude_boot_volume: expected true or false, found \"yes please\"",
            "f.yaml:8:53: instances[1].disks: expected EC2 volume ids such as vol-0abc12345def67890, found \"web-2-root\"",
            "f.yaml:8:84: instances[1].exclude_volumes: expected EC2 volume ids such as vol-0abc12345def67890, found \"vol-1\"",
            "f.yaml:9:5: instances[2].disks: missing: list the instance's disks (provider disk ids), or name the instance with ec2_instance to snapshot every disk attached to it",
            "f.yaml:10:68: instances[3].ec2_instance: unknown key (expected one of id, policy, provider, disks, options, group)",
        ] {
            #expect(lines.contains(expected), "\(expected)\n\(lines.joined(separator: "\n"))")
        }
        #expect(lines.count == 10, "\(lines.joined(separator: "\n"))")
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
        #expect(text.contains("policies.baseline.plugin: expected a loaded plugin (crash, linux-freeze, mariadb, windows-vss), found \"crsh\""), "\(text)")
    }

    static var buildDirectory: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
    }
}

import Foundation
