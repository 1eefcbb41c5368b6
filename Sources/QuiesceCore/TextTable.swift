/// Renders rows as a left-aligned, space-padded table with a header line, the
/// way `kubectl get` and `docker ps` do: readable, and `awk`-able.
public struct TextTable: Sendable {
    public var headers: [String]
    public var rows: [[String]]

    public init(headers: [String], rows: [[String]] = []) {
        self.headers = headers
        self.rows = rows
    }

    public mutating func append(_ row: [String]) { self.rows.append(row) }

    public func render() -> String {
        var widths = self.headers.map(\.count)
        for row in self.rows {
            for (index, cell) in row.enumerated() where index < widths.count {
                widths[index] = max(widths[index], cell.count)
            }
        }
        func line(_ cells: [String]) -> String {
            var text = ""
            for (index, width) in widths.enumerated() {
                let cell = index < cells.count ? cells[index] : ""
                let isLast = index == widths.count - 1
                text += isLast ? cell : cell + String(repeating: " ", count: width - cell.count + 3)
            }
            return text
        }
        return ([line(self.headers)] + self.rows.map(line)).joined(separator: "\n")
    }
}

/// Formats a byte count for people: 1.5 GiB, 512 MiB, 12 KiB.
public func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    if unit == 0 { return "\(bytes) B" }
    let rounded = (value * 10).rounded() / 10
    return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[unit])" : "\(rounded) \(units[unit])"
}
