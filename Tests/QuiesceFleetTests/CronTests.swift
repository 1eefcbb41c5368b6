import Foundation
import QuiesceFleet
import Testing

@Suite("Cron schedules")
struct CronTests {
    static func date(_ text: String) -> Date { ISO8601DateFormatter().date(from: text)! }
    static func iso(_ date: Date?) -> String { date.map { ISO8601DateFormatter().string(from: $0) } ?? "nil" }

    func next(_ expression: String, _ zone: String = "UTC", after: String, count: Int = 1) throws -> [String] {
        let cron = try CronSchedule(expression, timeZone: TimeZone(identifier: zone)!)
        var times: [String] = []
        var cursor = Self.date(after)
        for _ in 0..<count {
            guard let next = cron.next(after: cursor) else { break }
            times.append(Self.iso(next))
            cursor = next
        }
        return times
    }

    @Test("fields: values, ranges, lists, steps, names; the next firings strictly after a moment")
    func fields() throws {
        #expect(try self.next("30 2 * * *", after: "2026-12-07T01:00:00Z", count: 2) == ["2026-12-07T02:30:00Z", "2026-12-08T02:30:00Z"])
        #expect(try self.next("30 2 * * *", after: "2026-12-07T02:30:00Z") == ["2026-12-08T02:30:00Z"], "strictly after")
        #expect(try self.next("*/15 * * * *", after: "2026-12-07T10:07:12Z", count: 3) == ["2026-12-07T10:15:00Z", "2026-12-07T10:30:00Z", "2026-12-07T10:45:00Z"])
        #expect(try self.next("0 9-17/4 * * mon-fri", after: "2026-12-11T16:00:00Z", count: 3)  // a Friday: its 17:00, then Monday
                == ["2026-12-11T17:00:00Z", "2026-12-14T09:00:00Z", "2026-12-14T13:00:00Z"])
        #expect(try self.next("0 0 1,15 jan,jul *", after: "2026-12-07T00:00:00Z", count: 3) == ["2027-01-01T00:00:00Z", "2027-01-15T00:00:00Z", "2027-07-01T00:00:00Z"])
        // Both day fields restricted: either matches (Vixie cron). The 13th, or any Friday.
        #expect(try self.next("0 12 13 * fri", after: "2026-12-07T00:00:00Z", count: 3) == ["2026-12-11T12:00:00Z", "2026-12-13T12:00:00Z", "2026-12-18T12:00:00Z"])
        #expect(try self.next("0 0 * * 7", after: "2026-12-07T00:00:00Z") == ["2026-12-13T00:00:00Z"], "7 is Sunday too")
        #expect(try self.next("0 0 29 2 *", after: "2026-03-01T00:00:00Z") == ["2028-02-29T00:00:00Z"])
        #expect(try CronSchedule("0 0 31 2 *").next(after: Date()) == nil, "never")
    }

    @Test("time zones: wall-clock times; the hour skipped in spring does not fire, the hour repeated in autumn fires once")
    func timeZones() throws {
        #expect(try self.next("30 2 * * *", "Europe/Berlin", after: "2026-12-07T00:00:00Z") == ["2026-12-07T01:30:00Z"], "CET is UTC+1")
        #expect(try self.next("30 2 * * *", "Europe/Berlin", after: "2026-07-01T00:00:00Z") == ["2026-07-01T00:30:00Z"], "CEST is UTC+2")
        // 2026-03-29: clocks go from 02:00 to 03:00 in Berlin; 02:30 does not exist that day.
        #expect(try self.next("30 2 * * *", "Europe/Berlin", after: "2026-03-28T02:00:00Z", count: 2) == ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"])
        // 2026-10-25: 02:00–03:00 happens twice; 02:30 fires at its first occurrence only.
        #expect(try self.next("30 2 * * *", "Europe/Berlin", after: "2026-10-24T12:00:00Z", count: 2) == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"])
        #expect(try self.next("0 * * * *", "America/New_York", after: "2026-11-01T04:30:00Z", count: 3)  // 00:30 EDT; 01:00 happens twice
                == ["2026-11-01T05:00:00Z", "2026-11-01T07:00:00Z", "2026-11-01T08:00:00Z"])
    }

    @Test("bad expressions: every mistake says which field, what was expected and what was found")
    func errors() {
        func message(_ expression: String) -> String {
            do {
                _ = try CronSchedule(expression)
                return "parsed"
            } catch {
                return "\(error)"
            }
        }
        #expect(message("30 2 * *") == "expected five fields (minute hour day-of-month month day-of-week), found 4 in \"30 2 * *\"")
        #expect(message("60 2 * * *") == "minute: expected 0–59, found \"60\"")
        #expect(message("0 2 * foo *") == "month: expected 1–12 or a name (jan, feb, mar …), found \"foo\"")
        #expect(message("0 2 * * 8") == "day-of-week: expected 0–7 or a name (sun, mon, tue …), found \"8\"")
        #expect(message("0 5-2 * * *") == "hour: a range runs upward, found \"5-2\"")
        #expect(message("*/0 * * * *") == "minute: expected a step from 1 to 59 after \"/\", found \"0\"")
        #expect(message("0 2 ,1 * *") == "day-of-month: expected a value, a range or a step, found \"\"")
    }

    static let fleet = """
        providers:
          pool: { kind: local, pool: /srv/pool }
        policies:
          app: { plugin: linux-freeze, retention: { keep_last: 7, daily: 14, weekly: 8, monthly: 12, keep_within: 36h } }
        instances:
          - { id: db-1, policy: app, disks: [d1] }
          - { id: db-2, policy: app, disks: [d2] }
          - { id: web-1, policy: app, disks: [w1] }
        groups:
          shop: { members: [db-1, db-2] }
        """

    @Test("a fleet file's schedules and retention: read, and every mistake with its line")
    func fleetFile() throws {
        let fleet = try FleetFile.parse(Self.fleet + "\nschedules:\n  nightly: { cron: \"30 2 * * *\", time_zone: Europe/Berlin }\n  dbs: { cron: \"0 * * * *\", instances: [db-*] }\n",
                                        path: "f.yaml")
        #expect(fleet.schedules.map(\.name) == ["nightly", "dbs"])
        #expect(fleet.schedules[0].cron.timeZone.identifier == "Europe/Berlin" && fleet.schedules[1].cron.timeZone.secondsFromGMT() == 0)
        #expect(fleet.only(fleet.schedules[1]).instances.map(\.id) == ["db-1", "db-2"] && fleet.only(fleet.schedules[1]).groups.count == 1)
        #expect(fleet.only(fleet.schedules[0]).instances.count == 3)
        let retention = try #require(fleet.policy(named: "app")?.retention)
        #expect(retention.keepLast == 7 && retention.daily == 14 && retention.weekly == 8 && retention.monthly == 12 && retention.keepWithin == .seconds(36 * 3600))

        func problems(_ text: String) throws -> [String] {
            let error = try #require(throws: FleetFileError.self) { try FleetFile.parse(text, path: "f.yaml") }
            return error.problems.map { "\($0.line): \($0.field): \($0.message)" }
        }
        #expect(try problems(Self.fleet + "\nschedules:\n  x: { cron: \"61 * * * *\" }\n") == ["12: schedules.x.cron: minute: expected 0–59, found \"61\""])
        #expect(try problems(Self.fleet + "\nschedules:\n  x: { cron: \"0 * * * *\", time_zone: Mars/Olympus }\n")
                == ["12: schedules.x.time_zone: expected an IANA time zone (e.g. Europe/Berlin, UTC), found \"Mars/Olympus\""])
        #expect(try problems(Self.fleet + "\nschedules:\n  x: { cron: \"0 * * * *\", instances: [db-1, cache-*] }\n") == [
            "12: schedules.x.instances: \"cache-*\" matches no instance of the fleet",
            "12: schedules.x.instances: includes db-1 but not db-2 of consistency group shop; a group is backed up whole"])
        #expect(try problems(Self.fleet + "\nschedules:\n  x: { time_zone: UTC }\n") == ["12: schedules.x.cron: missing: when to run, as a cron expression (e.g. \"30 2 * * *\")"])
        #expect(try problems(Self.fleet + "\nschedules:\n  x: { cron: \"0 0 30 2 *\" }\n") == ["12: schedules.x.cron: \"0 0 30 2 *\" never fires (no such date)"])
        #expect(try problems(Self.fleet.replacingOccurrences(of: "keep_within: 36h", with: "keep_within: 36 hours")) == [
            "4: policies.app.retention.keep_within: expected a duration such as 36h, 7d or 2w, found \"36 hours\""])
        #expect(try problems(Self.fleet.replacingOccurrences(of: "retention: { keep_last: 7, daily: 14, weekly: 8, monthly: 12, keep_within: 36h }", with: "retention: { keep_last: 0 }")) == [
            "4: policies.app.retention: expected at least one of keep_last, keep_within, daily, weekly, monthly above 0; as written it keeps only the newest application-consistent group"])
        #expect(FleetFile.matches("db-12", pattern: "db-*") && FleetFile.matches("a-db-1", pattern: "*db*") && !FleetFile.matches("web-1", pattern: "db-*")
                && FleetFile.matches("x", pattern: "x") && FleetFile.matches("web-1-eu", pattern: "web-*-eu") && !FleetFile.matches("web-1-us", pattern: "web-*-eu"))
    }
}
