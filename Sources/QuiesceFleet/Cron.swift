import Foundation

/// A cron expression with a time zone: `minute hour day-of-month month day-of-week`, each a
/// `*`, a number, a range `a-b`, a list `a,b`, a step `*/n` or `a-b/n`; months and days may be
/// named (`jan`, `mon`); day-of-week 0 and 7 are Sunday. As in Vixie cron, when both day
/// fields are restricted a day matches either. Times are wall-clock times in `timeZone`: a
/// time that does not exist on a day (the hour skipped when clocks go forward) does not fire
/// that day, and one that happens twice (clocks going back) fires once.
public struct CronSchedule: Sendable, Equatable, CustomStringConvertible {
    public let expression: String
    public let timeZone: TimeZone
    let minutes: Set<Int>
    let hours: Set<Int>
    let days: Set<Int>
    let months: Set<Int>
    let weekdays: Set<Int>
    let daysRestricted: Bool
    let weekdaysRestricted: Bool

    public var description: String { "\(self.expression) (\(self.timeZone.identifier))" }

    /// - Throws: `CronError` naming the field and what was found.
    public init(_ expression: String, timeZone: TimeZone = TimeZone(identifier: "UTC")!) throws {
        self.expression = expression
        self.timeZone = timeZone
        let fields = expression.split(whereSeparator: \.isWhitespace).map(String.init)
        guard fields.count == 5 else {
            throw CronError("expected five fields (minute hour day-of-month month day-of-week), found \(fields.count) in \"\(expression)\"")
        }
        let monthNames = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
        let dayNames = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
        self.minutes = try Self.field(fields[0], "minute", 0...59)
        self.hours = try Self.field(fields[1], "hour", 0...23)
        self.days = try Self.field(fields[2], "day-of-month", 1...31)
        self.months = try Self.field(fields[3], "month", 1...12, names: monthNames, nameBase: 1)
        self.weekdays = Set(try Self.field(fields[4], "day-of-week", 0...7, names: dayNames, nameBase: 0).map { $0 % 7 })
        self.daysRestricted = fields[2] != "*"
        self.weekdaysRestricted = fields[4] != "*"
    }

    static func field(_ text: String, _ name: String, _ range: ClosedRange<Int>, names: [String] = [], nameBase: Int = 0) throws -> Set<Int> {
        func value(_ word: Substring) throws -> Int {
            if let number = Int(word), range.contains(number) { return number }
            if let index = names.firstIndex(of: word.lowercased()) { return index + nameBase }
            throw CronError("\(name): expected \(range.lowerBound)–\(range.upperBound)\(names.isEmpty ? "" : " or a name (\(names.prefix(3).joined(separator: ", ")) …)"), found \"\(word)\"")
        }
        var values = Set<Int>()
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let pieces = part.split(separator: "/", omittingEmptySubsequences: false)
            guard pieces.count <= 2, let base = pieces.first, !base.isEmpty else { throw CronError("\(name): expected a value, a range or a step, found \"\(part)\"") }
            var step = 1
            if pieces.count == 2 {
                guard let given = Int(pieces[1]), given >= 1, given <= range.upperBound else {
                    throw CronError("\(name): expected a step from 1 to \(range.upperBound) after \"/\", found \"\(pieces[1])\"")
                }
                step = given
            }
            let low: Int, high: Int
            if base == "*" {
                (low, high) = (range.lowerBound, range.upperBound)
            } else if let dash = base.firstIndex(of: "-") {
                (low, high) = (try value(base[..<dash]), try value(base[base.index(after: dash)...]))
                guard low <= high else { throw CronError("\(name): a range runs upward, found \"\(base)\"") }
            } else {
                low = try value(base)
                high = pieces.count == 2 ? range.upperBound : low
            }
            values.formUnion(stride(from: low, through: high, by: step))
        }
        return values
    }

    var calendar: Calendar {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = self.timeZone
        return calendar
    }

    /// Whether the wall-clock minute of `date` matches.
    public func matches(_ date: Date) -> Bool {
        let parts = self.calendar.dateComponents([.minute, .hour, .day, .month, .weekday], from: date)
        return self.matches(parts)
    }

    func matches(_ parts: DateComponents) -> Bool {
        guard let minute = parts.minute, let hour = parts.hour, let day = parts.day, let month = parts.month, let weekday = parts.weekday else { return false }
        guard self.minutes.contains(minute), self.hours.contains(hour), self.months.contains(month) else { return false }
        return self.dayMatches(day: day, weekday: weekday - 1)
    }

    func dayMatches(day: Int, weekday: Int) -> Bool {
        switch (self.daysRestricted, self.weekdaysRestricted) {
        case (true, true): self.days.contains(day) || self.weekdays.contains(weekday)
        case (true, false): self.days.contains(day)
        case (false, true): self.weekdays.contains(weekday)
        case (false, false): true
        }
    }

    /// The first time after `date` (strictly) the schedule fires; nil when none within eight years
    /// (e.g. `0 0 31 2 *`).
    public func next(after date: Date) -> Date? {
        let calendar = self.calendar
        // From the next whole minute, in absolute time: skipped local times never come up, and a
        // local minute that comes twice (clocks going back) fires only the first time.
        var candidate = Date(timeIntervalSince1970: (date.timeIntervalSince1970 / 60).rounded(.down) * 60 + 60)
        let seenBefore = calendar.dateComponents([.year, .month, .day, .hour, .minute], from: date)
        let limit = date.addingTimeInterval(8 * 366 * 86_400)
        while candidate < limit {
            let parts = calendar.dateComponents([.year, .minute, .hour, .day, .month, .weekday], from: candidate)
            guard let month = parts.month, let day = parts.day, let hour = parts.hour, let weekday = parts.weekday else { return nil }
            if !self.months.contains(month) {
                // To the first day of the next month, midnight.
                candidate = calendar.nextDate(after: candidate, matching: DateComponents(day: 1, hour: 0, minute: 0), matchingPolicy: .nextTime) ?? limit
                continue
            }
            if !self.dayMatches(day: day, weekday: weekday - 1) {
                candidate = calendar.nextDate(after: candidate, matching: DateComponents(hour: 0, minute: 0), matchingPolicy: .nextTime) ?? limit
                continue
            }
            if !self.hours.contains(hour) {
                candidate = calendar.nextDate(after: candidate, matching: DateComponents(minute: 0), matchingPolicy: .nextTime) ?? limit
                continue
            }
            if self.matches(parts) {
                let local = calendar.dateComponents([.year, .month, .day, .hour, .minute], from: candidate)
                // The same wall-clock minute as the one we start from (an hour repeated): not again.
                if local != seenBefore && !self.repeatsEarlierMinute(candidate, calendar) { return candidate }
            }
            candidate = candidate.addingTimeInterval(60)
        }
        return nil
    }

    /// Whether the same wall-clock minute already happened within the last two hours (clocks went back).
    func repeatsEarlierMinute(_ date: Date, _ calendar: Calendar) -> Bool {
        let local = calendar.dateComponents([.year, .month, .day, .hour, .minute], from: date)
        for back in stride(from: 30, through: 120, by: 30) {
            let earlier = date.addingTimeInterval(-Double(back) * 60)
            if calendar.dateComponents([.year, .month, .day, .hour, .minute], from: earlier) == local { return true }
        }
        return false
    }
}

public struct CronError: Error, Sendable, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
