import Foundation
import Logging

/// `--log-format json`: one JSON object per line on standard error, for a log shipper
/// (journald's JSON, Loki, Elasticsearch): `ts` (RFC 3339, milliseconds, UTC), `level`,
/// `logger`, `message`, and the metadata's keys as fields of their own (`run`, `instance`,
/// `schedule`, …); a key that would shadow one of those is kept under `meta.KEY`.
struct JSONLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    /// Guards the formatter (not thread-safe) and the writes, so lines never interleave.
    private static let lock = NSLock()
    nonisolated(unsafe) private static let formatter: ISO8601DateFormatter = {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }()

    init(label: String) { self.label = label }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var object: [String: Any] = [:]
        var merged = self.metadata
        if let provided = self.metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        for (key, value) in merged {
            let name = ["ts", "level", "logger", "message"].contains(key) ? "meta.\(key)" : key
            object[name] = Self.plain(value)
        }
        object["ts"] = Self.lock.withLock { Self.formatter.string(from: Date()) }
        object["level"] = event.level.rawValue
        object["logger"] = self.label
        object["message"] = "\(event.message)"
        guard var line = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
        line.append(0x0A)
        Self.lock.withLock { FileHandle.standardError.write(line) }
    }

    static func plain(_ value: Logger.Metadata.Value) -> Any {
        switch value {
        case .string(let text): text
        case .stringConvertible(let convertible): "\(convertible)"
        case .array(let values): values.map(Self.plain)
        case .dictionary(let values): values.mapValues(Self.plain)
        }
    }
}
