import Foundation
import QuiesceCore

/// What the VSS simulator plays: a Windows instance's facts (OS, volumes, the
/// VSS service, writers) and how each writer behaves in each phase of a
/// snapshot set. A JSON file (`quiesce-agent run --vss-simulator FILE`):
///
///     {
///       "hostname": "win-sql-1",
///       "os_name": "Microsoft Windows Server 2022 Datacenter",
///       "os_version": "10.0.20348",
///       "vss_service": "running",
///       "writer_timeout_ms": 60000,
///       "volumes": [ { "name": "C:\\", "fs_type": "NTFS", "path": "/mnt/win-c" },
///                    { "name": "D:\\", "fs_type": "ReFS", "path": "/mnt/win-d" } ],
///       "writers": [
///         { "name": "SqlServerWriter", "id": "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a",
///           "components": ["master", "sales"],
///           "phases": { "freeze": { "fail": "VSS_E_WRITERERROR_RETRYABLE", "times": 1 } } },
///         { "name": "Registry Writer" }
///       ]
///     }
///
/// A volume's `path` is a real mounted filesystem (a loop device in tests): the
/// hold of its writes is a real FIFREEZE through the thaw guard. A phase's
/// behaviour is one of `{"fail": "VSS_E_…", "times": N}` (the first N sets that
/// reach the phase; every set without `times`), `{"delay_ms": N}` (answers after
/// N ms; beyond `writer_timeout_ms` the writer times out,
/// VSS_E_WRITERERROR_TIMEOUT), or `{"hang": true}` (stops responding:
/// VSS_E_WRITER_NOT_RESPONDING once `writer_timeout_ms` has passed). Phases:
/// identify, prepare_backup, prepare_snapshot, freeze, thaw, post_snapshot,
/// backup_complete.
public struct VssScenario: Sendable, Equatable {
    public enum Phase: String, Sendable, CaseIterable {
        case identify
        case prepareBackup = "prepare_backup"
        case prepareSnapshot = "prepare_snapshot"
        case freeze
        case thaw
        case postSnapshot = "post_snapshot"
        case backupComplete = "backup_complete"

        /// The state a writer is left in when it fails here (VSS_WS_FAILED_AT_…).
        public var failedState: UInt32 {
            switch self {
            case .identify: 6
            case .prepareBackup: 7
            case .prepareSnapshot: 8
            case .freeze: 9
            case .thaw: 10
            case .postSnapshot: 11
            case .backupComplete: 12
            }
        }
    }

    public enum Behaviour: Sendable, Equatable {
        case fail(error: String, times: Int?)
        case delay(milliseconds: Int)
        case hang
    }

    public struct Volume: Sendable, Equatable {
        public var name: String
        public var fsType: String
        public var path: String
        public init(name: String, fsType: String, path: String) {
            self.name = name
            self.fsType = fsType
            self.path = path
        }
    }

    public struct Writer: Sendable, Equatable {
        public var name: String
        public var id: String
        public var instanceID: String
        public var components: [String]
        public var phases: [Phase: Behaviour]
        public init(name: String, id: String, instanceID: String, components: [String] = [], phases: [Phase: Behaviour] = [:]) {
            self.name = name
            self.id = id
            self.instanceID = instanceID
            self.components = components
            self.phases = phases
        }
    }

    public var hostname: String
    public var osName: String
    public var osVersion: String
    public var vssService: String
    public var writerTimeout: Duration
    public var volumes: [Volume]
    public var writers: [Writer]

    public init(hostname: String, osName: String = "Microsoft Windows Server 2022 Datacenter", osVersion: String = "10.0.20348",
                vssService: String = "running", writerTimeout: Duration = .seconds(60), volumes: [Volume], writers: [Writer]) {
        self.hostname = hostname
        self.osName = osName
        self.osVersion = osVersion
        self.vssService = vssService
        self.writerTimeout = writerTimeout
        self.volumes = volumes
        self.writers = writers
    }

    /// Reads and checks a scenario file; every problem names the file and the field.
    public static func load(path: String) throws -> VssScenario {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VssScenarioError(problems: ["\(path): cannot read the VSS scenario file"])
        }
        return try Self.parse(data, source: path)
    }

    public static func parse(_ data: Data, source: String) throws -> VssScenario {
        let root: Any
        do {
            root = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw VssScenarioError(problems: ["\(source): expected a JSON object, found text that is not JSON (\(error.localizedDescription))"])
        }
        var problems: [String] = []
        func problem(_ field: String, _ text: String) { problems.append("\(source): \(field): \(text)") }
        func describe(_ value: Any?) -> String {
            switch value {
            case nil: return "nothing"
            case let s as String: return "\"\(s)\""
            case let n as NSNumber: return "\(n)"
            case is [Any]: return "a list"
            case is [String: Any]: return "an object"
            default: return "\(value!)"
            }
        }
        func object(_ value: Any?, _ field: String, allowed: Set<String>) -> [String: Any]? {
            guard let object = value as? [String: Any] else {
                problem(field, "expected an object, found \(describe(value))")
                return nil
            }
            for key in object.keys.sorted() where !allowed.contains(key) {
                problem(field, "unknown key \"\(key)\" (expected one of \(allowed.sorted().joined(separator: ", ")))")
            }
            return object
        }
        func string(_ object: [String: Any], _ key: String, _ field: String, default value: String? = nil) -> String? {
            guard let raw = object[key] else {
                if value == nil { problem("\(field).\(key)", "missing") }
                return value
            }
            guard let text = raw as? String, !text.isEmpty else {
                problem("\(field).\(key)", "expected a non-empty string, found \(describe(raw))")
                return nil
            }
            return text
        }
        func int(_ raw: Any?, _ field: String, in range: ClosedRange<Int>) -> Int? {
            guard let number = raw as? NSNumber, let value = Int(exactly: number.doubleValue), range.contains(value) else {
                problem(field, "expected a whole number in \(range.lowerBound)…\(range.upperBound), found \(describe(raw))")
                return nil
            }
            return value
        }

        guard let top = object(root, "scenario", allowed: ["hostname", "os_name", "os_version", "vss_service", "writer_timeout_ms", "volumes", "writers"]) else {
            throw VssScenarioError(problems: problems)
        }
        var scenario = VssScenario(hostname: ProcessInfo.processInfo.hostName, volumes: [], writers: [])
        scenario.hostname = string(top, "hostname", "scenario", default: scenario.hostname) ?? scenario.hostname
        scenario.osName = string(top, "os_name", "scenario", default: scenario.osName) ?? scenario.osName
        scenario.osVersion = string(top, "os_version", "scenario", default: scenario.osVersion) ?? scenario.osVersion
        let service = string(top, "vss_service", "scenario", default: "running") ?? "running"
        if !["running", "stopped", "disabled"].contains(service) {
            problem("vss_service", "expected running, stopped or disabled, found \"\(service)\"")
        }
        scenario.vssService = service
        if let raw = top["writer_timeout_ms"], let ms = int(raw, "writer_timeout_ms", in: 1...600_000) {
            scenario.writerTimeout = .milliseconds(ms)
        }

        if let rawVolumes = top["volumes"] {
            if let list = rawVolumes as? [Any], !list.isEmpty {
                for (index, raw) in list.enumerated() {
                    let field = "volumes[\(index)]"
                    guard let volume = object(raw, field, allowed: ["name", "fs_type", "path"]) else { continue }
                    let name = string(volume, "name", field), fs = string(volume, "fs_type", field, default: "NTFS"), path = string(volume, "path", field)
                    if let name, !Self.isVolumeName(name) {
                        problem("\(field).name", "expected a volume name such as C:\\ or D:\\, found \"\(name)\"")
                    }
                    if let path, !path.hasPrefix("/") { problem("\(field).path", "expected an absolute path (the mounted filesystem that plays this volume), found \"\(path)\"") }
                    if let name, let fs, let path { scenario.volumes.append(.init(name: name, fsType: fs, path: path)) }
                }
                let names = scenario.volumes.map { $0.name.uppercased() }
                for name in Set(names) where names.filter({ $0 == name }).count > 1 { problem("volumes", "volume \(name) is listed twice") }
            } else {
                problem("volumes", "expected a non-empty list of volumes, found \(describe(rawVolumes))")
            }
        } else {
            problem("volumes", "missing: list the instance's volumes (name, fs_type, path)")
        }

        if let rawWriters = top["writers"] {
            if let list = rawWriters as? [Any] {
                for (index, raw) in list.enumerated() {
                    let field = "writers[\(index)]"
                    guard let writer = object(raw, field, allowed: ["name", "id", "instance_id", "components", "phases"]) else { continue }
                    guard let name = string(writer, "name", field) else { continue }
                    let id = string(writer, "id", field, default: Self.uuid(from: "writer:" + name)) ?? ""
                    let instance = string(writer, "instance_id", field, default: Self.uuid(from: "instance:" + name)) ?? ""
                    var components: [String] = []
                    if let raw = writer["components"] {
                        if let list = raw as? [String] { components = list } else { problem("\(field).components", "expected a list of component names, found \(describe(raw))") }
                    }
                    var phases: [Phase: Behaviour] = [:]
                    if let raw = writer["phases"], let map = object(raw, "\(field).phases", allowed: Set(Phase.allCases.map(\.rawValue))) {
                        for (key, value) in map {
                            guard let phase = Phase(rawValue: key) else { continue }
                            let at = "\(field).phases.\(key)"
                            guard let rule = object(value, at, allowed: ["fail", "times", "delay_ms", "hang"]) else { continue }
                            let kinds = ["fail", "delay_ms", "hang"].filter { rule[$0] != nil }
                            guard kinds.count == 1 else {
                                problem(at, "expected exactly one of fail, delay_ms or hang, found \(kinds.isEmpty ? "none" : kinds.joined(separator: " and "))")
                                continue
                            }
                            if let error = rule["fail"] {
                                guard let name = error as? String, VssErrors.code(of: name) != nil else {
                                    problem("\(at).fail", "expected a VSS error such as VSS_E_WRITERERROR_RETRYABLE (known: \(VssErrors.codes.keys.sorted().joined(separator: ", "))), found \(describe(error))")
                                    continue
                                }
                                var times: Int?
                                if let raw = rule["times"] { times = int(raw, "\(at).times", in: 1...1000) }
                                phases[phase] = .fail(error: name, times: times)
                            } else if rule["times"] != nil {
                                problem("\(at).times", "only a fail rule counts times")
                            } else if let raw = rule["delay_ms"] {
                                if let ms = int(raw, "\(at).delay_ms", in: 0...3_600_000) { phases[phase] = .delay(milliseconds: ms) }
                            } else if let raw = rule["hang"] {
                                if (raw as? Bool) == true { phases[phase] = .hang } else { problem("\(at).hang", "expected true, found \(describe(raw))") }
                            }
                        }
                    }
                    scenario.writers.append(.init(name: name, id: id, instanceID: instance, components: components, phases: phases))
                }
                let names = scenario.writers.map(\.name)
                for name in Set(names) where names.filter({ $0 == name }).count > 1 { problem("writers", "writer \"\(name)\" is listed twice") }
            } else {
                problem("writers", "expected a list of writers, found \(describe(rawWriters))")
            }
        }
        guard problems.isEmpty else { throw VssScenarioError(problems: problems) }
        return scenario
    }

    /// "C:\", "D:\", or a mount-point folder such as "C:\Data\".
    static func isVolumeName(_ name: String) -> Bool {
        let scalars = Array(name.unicodeScalars)
        guard scalars.count >= 3, scalars.count <= 260, ("A"..."Z").contains(scalars[0]) || ("a"..."z").contains(scalars[0]) else { return false }
        return scalars[1] == ":" && scalars[2] == "\\" && name.hasSuffix("\\")
    }

    /// A stable GUID-looking id from a name (so a scenario without ids reports the same ids every time).
    public static func uuid(from text: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325, second: UInt64 = 0x8422_2325_cbf2_9ce4
        for byte in text.utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3
            second = (second ^ UInt64(byte)) &* 0x100_0000_01b3 &+ 7
        }
        let hex = String(format: "%016llx%016llx", hash, second)
        let c = Array(hex)
        return "\(String(c[0..<8]))-\(String(c[8..<12]))-\(String(c[12..<16]))-\(String(c[16..<20]))-\(String(c[20..<32]))"
    }
}

public struct VssScenarioError: Error, CustomStringConvertible {
    public var problems: [String]
    public var description: String { self.problems.joined(separator: "\n") }
}
