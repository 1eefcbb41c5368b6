import QuiesceCore
import QuiescePluginProto

/// An option value as an operator wrote it: typed (from a fleet file) or text
/// (from `--option name=value`), checked against the plugin's schema.
public enum OptionInput: Sendable, Equatable {
    case bool(Bool)
    case int(Int64)
    case string(String)
    case list([String])
    /// Text to be read according to the option's type: "true", "1500", "a,b".
    case text(String)
}

extension PluginInfo {
    /// The policy's options: every option this plugin declares, `given` checked
    /// against its type, range and allowed values, defaults for the rest.
    /// - Throws: `PluginError.badOptions` listing every problem (unknown names
    ///   with the accepted ones, wrong types with what was expected and found).
    public func resolveOptions(_ given: [String: OptionInput], path: String = "") throws -> [String: OptionValue] {
        var problems: [String] = []
        var resolved: [String: OptionValue] = [:]
        let specs = Dictionary(self.options.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for name in given.keys.sorted() where specs[name] == nil {
            let accepted = self.options.map(\.name).sorted()
            problems.append("unknown option \(name) (\(self.name) accepts \(accepted.isEmpty ? "no options" : accepted.joined(separator: ", ")))")
        }
        for spec in self.options {
            guard let input = given[spec.name] else {
                resolved[spec.name] = spec.defaultValue
                continue
            }
            do {
                resolved[spec.name] = try spec.check(input)
            } catch let problem as OptionProblem {
                problems.append("option \(spec.name): \(problem.text)")
            }
        }
        guard problems.isEmpty else {
            throw PluginError(.badOptions, plugin: self.name, path: path, problems.joined(separator: "; "))
        }
        return resolved
    }
}

struct OptionProblem: Error { var text: String }

extension OptionSpec {
    /// The expected type, as an operator reads it.
    public var typeName: String {
        switch self.type {
        case .bool: "bool"
        case .int: "integer"
        case .string: "string"
        case .stringList: "list of strings"
        case .durationMs: "milliseconds"
        case .unspecified, .UNRECOGNIZED: "unknown type"
        }
    }

    func check(_ input: OptionInput) throws -> OptionValue {
        var value = OptionValue()
        switch (self.type, input) {
        case (.bool, .bool(let v)): value.boolValue = v
        case (.bool, .text(let text)):
            switch text.lowercased() {
            case "true", "yes", "on", "1": value.boolValue = true
            case "false", "no", "off", "0": value.boolValue = false
            default: throw OptionProblem(text: "expected a bool (true or false), found \"\(text)\"")
            }
        case (.int, .int(let v)), (.durationMs, .int(let v)): value.intValue = v
        case (.int, .text(let text)), (.durationMs, .text(let text)):
            var digits = text
            if self.type == .durationMs, digits.hasSuffix("ms") { digits.removeLast(2) }
            guard let v = Int64(digits) else { throw OptionProblem(text: "expected \(self.typeName), found \"\(text)\"") }
            value.intValue = v
        case (.string, .string(let v)), (.string, .text(let v)): value.stringValue = v
        case (.stringList, .list(let v)): value.listValue = .with { $0.values = v }
        case (.stringList, .text(let text)):
            value.listValue = .with { $0.values = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } }
        case (.stringList, .string(let v)): value.listValue = .with { $0.values = [v] }
        default:
            throw OptionProblem(text: "expected \(self.typeName), found \(input.typeName)")
        }
        if case .intValue(let v)? = value.value, self.minimum != 0 || self.maximum != 0, v < self.minimum || v > self.maximum {
            throw OptionProblem(text: "expected \(self.typeName) between \(self.minimum) and \(self.maximum), found \(v)")
        }
        if case .stringValue(let v)? = value.value, !self.allowed.isEmpty, !self.allowed.contains(v) {
            throw OptionProblem(text: "expected one of \(self.allowed.joined(separator: ", ")), found \"\(v)\"")
        }
        return value
    }
}

extension OptionInput {
    var typeName: String {
        switch self {
        case .bool(let v): "a bool (\(v))"
        case .int(let v): "an integer (\(v))"
        case .string(let v): "a string (\"\(v)\")"
        case .list: "a list"
        case .text(let v): "\"\(v)\""
        }
    }
}

extension OptionValue {
    /// How the value reads on the command line and in tables.
    public var text: String {
        switch self.value {
        case .boolValue(let v)?: "\(v)"
        case .intValue(let v)?: "\(v)"
        case .stringValue(let v)?: v
        case .listValue(let v)?: "[" + v.values.joined(separator: ", ") + "]"
        case nil: "(none)"
        }
    }
}

import Foundation
