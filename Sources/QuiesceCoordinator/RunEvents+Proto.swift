import Foundation
import QuiesceCatalog
import QuiesceCore
import QuiesceProto

// Runs through `quiesce serve` stream their events as protobuf messages
// (quiesce.admin.v1.Runs); the CLI turns them back into the same values a
// one-shot run produces, so both print the same progress, JSON and report.

extension InstanceOutcome {
    public var proto: Quiesce_Admin_V1_InstanceOutcome {
        .with {
            $0.instanceID = self.instanceID
            $0.policy = self.policy
            $0.wanted = self.wanted.name
            $0.minimum = self.minimum.name
            $0.achieved = self.achieved?.name ?? ""
            $0.state = self.state.rawValue
            $0.reasons = self.reasons
            $0.warnings = self.warnings
            $0.groupID = self.groupID ?? ""
            $0.disks = UInt32(self.disks)
            $0.stallUs = self.stall.map(\.microseconds) ?? -1
            $0.frozenUs = self.frozen.map(\.microseconds) ?? -1
            $0.snapshotUs = self.snapshot.map(\.microseconds) ?? -1
            $0.durationUs = self.duration.microseconds
            $0.attempts = UInt32(self.attempts)
            $0.vssWriters = self.vssWriters
            $0.consistencyGroup = self.consistencyGroup ?? ""
            $0.pruned = self.pruned
        }
    }

    /// - Throws: `RunEventError` when a level or state name is not one this client knows.
    public init(proto: Quiesce_Admin_V1_InstanceOutcome) throws {
        func level(_ name: String, _ field: String) throws -> ConsistencyLevel {
            guard let level = ConsistencyLevel(name: name) else {
                throw RunEventError(detail: "\(proto.instanceID): \(field): expected crash, filesystem or application, found \"\(name)\"")
            }
            return level
        }
        guard let state = InstanceRecord.State(rawValue: proto.state) else {
            throw RunEventError(detail: "\(proto.instanceID): state: expected one of \(InstanceRecord.State.allCases.map(\.rawValue).joined(separator: ", ")), found \"\(proto.state)\"")
        }
        self.init(
            instanceID: proto.instanceID, policy: proto.policy, wanted: try level(proto.wanted, "wanted"), minimum: try level(proto.minimum, "minimum"),
            achieved: proto.achieved.isEmpty ? nil : try level(proto.achieved, "achieved"), state: state, reasons: proto.reasons,
            warnings: proto.warnings, groupID: proto.groupID.isEmpty ? nil : proto.groupID, disks: Int(proto.disks),
            stall: proto.stallUs < 0 ? nil : .microseconds(proto.stallUs), frozen: proto.frozenUs < 0 ? nil : .microseconds(proto.frozenUs),
            snapshot: proto.snapshotUs < 0 ? nil : .microseconds(proto.snapshotUs),
            duration: .microseconds(proto.durationUs), attempts: Int(proto.attempts), vssWriters: proto.vssWriters,
            consistencyGroup: proto.consistencyGroup.isEmpty ? nil : proto.consistencyGroup, pruned: proto.pruned)
    }
}

extension RunReport {
    public var proto: Quiesce_Admin_V1_RunReport {
        .with {
            $0.runID = self.runID
            $0.makespanUs = self.makespan.microseconds
            $0.instances = self.instances.map(\.proto)
            $0.exitCode = self.exitCode
        }
    }

    public init(proto: Quiesce_Admin_V1_RunReport) throws {
        self.init(runID: proto.runID, instances: try proto.instances.map(InstanceOutcome.init(proto:)), makespan: .microseconds(proto.makespanUs))
    }
}

extension RunEvent {
    public var proto: Quiesce_Admin_V1_RunFleetEvent {
        .with {
            switch self {
            case .waitingForAgents(let missing, let wait):
                $0.waiting = .with {
                    $0.instanceIds = missing
                    $0.waitS = UInt32(clamping: wait.components.seconds)
                }
            case .agentsWaited, .providerChecked, .settling, .joinedRun:
                break  // not on the admin wire: an engine that serves runs has its agents connected already
            case .instanceStarted(let id):
                $0.started = .with { $0.instanceID = id }
            case .instanceFinished(let outcome):
                $0.finished = outcome.proto
            }
        }
    }
}

public struct RunEventError: Error, CustomStringConvertible, Sendable {
    public var detail: String
    public init(detail: String) { self.detail = detail }
    public var description: String { "the engine sent an event this client cannot read: \(self.detail)" }
}
