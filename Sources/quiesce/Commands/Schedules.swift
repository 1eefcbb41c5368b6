import ArgumentParser
import Foundation
import QuiesceCore
import QuiesceFleet

struct Schedules: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a fleet file's schedules and when each fires next (in its own time zone and in UTC).",
        discussion: """
            `quiesce serve --fleet FILE` runs them. Exit codes: 0; 65 the fleet file has \
            problems (a cron expression or time zone it cannot read, a schedule that splits a \
            consistency group, …).
            """)

    @Option(help: ArgumentHelp("The fleet file (YAML).", valueName: "file"))
    var fleet: String
    @Option(help: "How many firings to show per schedule.")
    var count: Int = 3
    @Option(help: ArgumentHelp("Count from this moment (ISO 8601, e.g. 2026-12-24T00:00:00Z) instead of now.", valueName: "time"))
    var from: String?
    @OptionGroup var plugins: PluginOptions
    @Option(help: "Output format: table or json.")
    var output: OutputFormat = .table

    func validate() throws {
        guard (1...100).contains(self.count) else { throw ValidationError("--count: expected 1 to 100, found \(self.count)") }
        if let from, ISO8601DateFormatter().date(from: from) == nil {
            throw ValidationError("--from: expected an ISO 8601 time such as 2026-12-24T00:00:00Z, found \"\(from)\"")
        }
    }

    func run() async throws {
        let registry = await self.plugins.load()
        defer { Task { await registry.shutdown() } }
        let fleet = try loadFleet(self.fleet, plugins: registry)
        let start = self.from.flatMap { ISO8601DateFormatter().date(from: $0) } ?? Date()
        var rows: [(FleetFile.Schedule, [Date], Int)] = []
        for schedule in fleet.schedules {
            var times: [Date] = []
            var cursor = start
            while times.count < self.count, let next = schedule.cron.next(after: cursor) {
                times.append(next)
                cursor = next
            }
            rows.append((schedule, times, fleet.instances.filter { schedule.includes($0.id) }.count))
        }
        let utc = ISO8601DateFormatter()
        func local(_ date: Date, _ zone: TimeZone) -> String {
            let formatter = DateFormatter()
            formatter.locale = Locale(identifier: "en_US_POSIX")
            formatter.timeZone = zone
            formatter.dateFormat = "EEE yyyy-MM-dd HH:mm zzz"
            return formatter.string(from: date)
        }
        if self.output == .json {
            let items: [[String: Any]] = rows.map { schedule, times, count in
                ["name": schedule.name, "cron": schedule.cron.expression, "time_zone": schedule.cron.timeZone.identifier,
                 "instances": schedule.instances.isEmpty ? ["*"] : schedule.instances, "instance_count": count,
                 "next": times.map { utc.string(from: $0) }]
            }
            let data = try JSONSerialization.data(withJSONObject: ["schedules": items], options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        guard !rows.isEmpty else {
            print("\(self.fleet) has no schedules (add `schedules: { nightly: { cron: \"30 2 * * *\", time_zone: UTC } }`)")
            return
        }
        var table = TextTable(headers: ["SCHEDULE", "CRON", "TIME ZONE", "INSTANCES", "NEXT (LOCAL)", "NEXT (UTC)"])
        for (schedule, times, count) in rows {
            for (index, time) in times.enumerated() {
                table.append(index == 0
                    ? [schedule.name, schedule.cron.expression, schedule.cron.timeZone.identifier,
                       "\(count)" + (schedule.instances.isEmpty ? " (all)" : " (\(schedule.instances.joined(separator: ", ")))"),
                       local(time, schedule.cron.timeZone), utc.string(from: time)]
                    : ["", "", "", "", local(time, schedule.cron.timeZone), utc.string(from: time)])
            }
        }
        print(table.render())
    }
}
