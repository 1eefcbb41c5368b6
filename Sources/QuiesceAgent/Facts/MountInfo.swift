/// One line of `/proc/self/mountinfo` (proc(5)).
public struct MountInfoEntry: Sendable, Hashable {
    public var mountID: Int
    public var parentID: Int
    /// "major:minor" of the filesystem's device.
    public var deviceNumber: String
    public var root: String
    public var mountPoint: String
    public var mountOptions: [String]
    public var fsType: String
    public var source: String
    public var superOptions: [String]

    public var readOnly: Bool { self.mountOptions.contains("ro") || self.superOptions.contains("ro") }

    /// Parses the whole file; a malformed line is an error naming its number.
    public static func parse(_ text: String) throws -> [MountInfoEntry] {
        var entries: [MountInfoEntry] = []
        // Split on bytes: Character-wise splitting (grapheme clusters) cost ~20 µs a line,
        // which an instance with hundreds of mounts pays on every facts request.
        var text = text
        text.makeContiguousUTF8()
        for (index, line) in text.utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true).enumerated() {
            entries.append(try self.parse(line: Substring(line), number: index + 1))
        }
        return entries
    }

    static func parse(line: Substring, number: Int) throws -> MountInfoEntry {
        let fields = line.utf8.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false).map { Substring($0) }
        guard let separator = fields.firstIndex(of: "-"), separator >= 6, fields.count >= separator + 4,
              let mountID = Int(fields[0]), let parentID = Int(fields[1])
        else {
            throw FactsError.malformed(
                source: "/proc/self/mountinfo", detail: "line \(number): expected 'ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPEROPTIONS', found \"\(line.prefix(120))\"")
        }
        return MountInfoEntry(
            mountID: mountID,
            parentID: parentID,
            deviceNumber: String(fields[2]),
            root: unescape(fields[3]),
            mountPoint: unescape(fields[4]),
            mountOptions: fields[5].utf8.split(separator: UInt8(ascii: ",")).map { String(Substring($0)) },
            fsType: String(fields[separator + 1]),
            source: unescape(fields[separator + 2]),
            superOptions: fields[separator + 3].utf8.split(separator: UInt8(ascii: ",")).map { String(Substring($0)) }
        )
    }

    /// The kernel writes space, tab, newline and backslash as octal escapes (\040 …).
    static func unescape(_ field: Substring) -> String {
        guard field.utf8.contains(UInt8(ascii: "\\")) else { return String(field) }
        var bytes: [UInt8] = []
        var utf8 = Array(field.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "\\"), utf8.count >= 3,
               let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8)
            {
                bytes.append(value)
                utf8 = utf8.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

public enum FactsError: Error, CustomStringConvertible, Sendable {
    case malformed(source: String, detail: String)
    case unreadable(source: String, detail: String)

    public var description: String {
        switch self {
        case .malformed(let source, let detail): "\(source): \(detail)"
        case .unreadable(let source, let detail): "\(source): \(detail)"
        }
    }
}
