import Foundation
import QuiesceCatalog
import QuiesceCore

extension InstanceOutcome {
    /// The outcome as JSON (for `--output json`).
    public var json: [String: Any] {
        var item: [String: Any] = [
            "instance": self.instanceID, "policy": self.policy, "wanted": self.wanted.name, "minimum": self.minimum.name,
            "state": self.state.rawValue, "reasons": self.reasons, "warnings": self.warnings, "disks": self.disks,
            "duration_ms": self.duration.milliseconds, "attempts": self.attempts,
        ]
        item["achieved"] = self.achieved?.name ?? NSNull()
        item["group"] = self.groupID ?? NSNull()
        item["stall_ms"] = self.stall.map { Double($0.nanoseconds) / 1e6 } ?? NSNull()
        item["frozen_ms"] = self.frozen.map { Double($0.nanoseconds) / 1e6 } ?? NSNull()
        item["snapshot_ms"] = self.snapshot.map { Double($0.nanoseconds) / 1e6 } ?? NSNull()
        if !self.metadata.isEmpty { item["metadata"] = self.metadata }
        if !self.vssWriters.isEmpty { item["vss_writers"] = self.vssWriters }
        if let group = self.consistencyGroup { item["consistency_group"] = group }
        if !self.pruned.isEmpty { item["pruned"] = self.pruned }
        return item
    }
}

/// A consistency group's outcome in a run, from its members' outcomes.
public struct ConsistencyGroupOutcome: Sendable, Equatable {
    public var name: String
    public var members: [String]
    /// The lowest member's level; nil when the group is incomplete (a member without a snapshot,
    /// off the group's cut, or failed for the group).
    public var level: ConsistencyLevel?

    public init(name: String, members: [String], level: ConsistencyLevel?) {
        self.name = name
        self.members = members
        self.level = level
    }

    public var json: [String: Any] {
        ["name": self.name, "members": self.members, "level": self.level?.name ?? NSNull(), "complete": self.level != nil]
    }
}

extension RunReport {
    /// The run's consistency groups across instances, in the order of their first member.
    public var consistencyGroups: [ConsistencyGroupOutcome] {
        var order: [String] = []
        var members: [String: [InstanceOutcome]] = [:]
        for outcome in self.instances {
            guard let name = outcome.consistencyGroup else { continue }
            if members[name] == nil { order.append(name) }
            members[name, default: []].append(outcome)
        }
        return order.map { name in
            let outcomes = members[name]!
            let incomplete = outcomes.contains { $0.achieved == nil || $0.reasons.contains { $0.hasPrefix("group-incomplete:") } }
            return ConsistencyGroupOutcome(name: name, members: outcomes.map(\.instanceID),
                                           level: incomplete ? nil : outcomes.compactMap(\.achieved).min())
        }
    }

    /// The final report: instance, wanted/achieved level, state, stall, frozen, disks, duration, why.
    public func renderTable() -> String {
        var table = TextTable(headers: ["INSTANCE", "POLICY", "WANTED", "ACHIEVED", "STATE", "STALL MS", "FROZEN MS", "SNAPSHOT MS", "DISKS", "DURATION", "WHY"])
        for outcome in self.instances {
            table.append([
                outcome.instanceID, outcome.policy, outcome.wanted.name, outcome.achieved?.name ?? "-", outcome.state.rawValue,
                outcome.stall.map { String(format: "%.1f", Double($0.nanoseconds) / 1e6) } ?? "-",
                outcome.frozen.map { String(format: "%.1f", Double($0.nanoseconds) / 1e6) } ?? "-",
                outcome.snapshot.map { String(format: "%.1f", Double($0.nanoseconds) / 1e6) } ?? "-",
                "\(outcome.disks)", String(format: "%.2f s", outcome.duration.timeInterval), outcome.reasons.first ?? "",
            ])
        }
        var text = "Run \(self.runID): \(self.instances.count) instances in \(String(format: "%.1f", self.makespan.timeInterval)) s"
        if self.agentWait >= .milliseconds(50) { text += " (\(String(format: "%.1f", self.agentWait.timeInterval)) s of it waiting for agents to connect)" }
        text += "\n\n"
        text += table.render()
        for outcome in self.instances where outcome.reasons.count > 1 {
            text += "\n\n\(outcome.instanceID):"
            for reason in outcome.reasons { text += "\n  \(reason)" }
        }
        for group in self.consistencyGroups {
            text += "\n\nConsistency group \(group.name): " + (group.level.map { "\($0.name), one point in time across \(group.members.joined(separator: ", "))" }
                ?? "incomplete (\(group.members.joined(separator: ", ")))")
            for outcome in self.instances where outcome.consistencyGroup == group.name {
                text += "\n  \(outcome.instanceID): \(outcome.achieved?.name ?? "no snapshot"), \(outcome.state.rawValue)"
                    + (outcome.frozen.map { String(format: ", frozen %.1f ms", Double($0.nanoseconds) / 1e6) } ?? "")
            }
        }
        for outcome in self.instances where !outcome.vssWriters.isEmpty {
            text += "\n\n\(outcome.instanceID) VSS writers:"
            for writer in outcome.vssWriters { text += "\n  \(writer)" }
        }
        let pruned = self.instances.filter { !$0.pruned.isEmpty }
        if !pruned.isEmpty {
            text += "\n\nRetention deleted \(pruned.map(\.pruned.count).reduce(0, +)) older group(s): "
                + pruned.map { "\($0.instanceID) \($0.pruned.joined(separator: ", "))" }.joined(separator: "; ")
        }
        let counts = Dictionary(grouping: self.instances, by: \.state).mapValues(\.count)
        text += "\n\n" + [InstanceRecord.State.succeeded, .downgraded, .failed].map { "\(counts[$0] ?? 0) \($0.rawValue)" }.joined(separator: ", ")
        return text
    }
}
