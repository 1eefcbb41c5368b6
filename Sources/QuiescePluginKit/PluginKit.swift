import CQuiescePlugin
import Foundation
@_exported import QuiescePluginProto
import SwiftProtobuf

public typealias PluginInfo = Quiesce_Plugin_V1_PluginInfo
public typealias PlanRequest = Quiesce_Plugin_V1_PlanRequest
public typealias Plan = Quiesce_Plugin_V1_Plan
public typealias PlanStep = Quiesce_Plugin_V1_Step
public typealias PlanLevel = Quiesce_Plugin_V1_Level
public typealias OptionSpec = Quiesce_Plugin_V1_OptionSpec
public typealias OptionValue = Quiesce_Plugin_V1_OptionValue
public typealias HookFact = Quiesce_Plugin_V1_HookFact
public typealias MountFact = Quiesce_Plugin_V1_MountFact
public typealias InstanceFacts = Quiesce_Plugin_V1_InstanceFacts

/// A plugin written in Swift: a pure function from an instance's facts and a
/// policy to a plan (docs/plugin-guide.md). No I/O, no threads, no globals
/// that outlive a call; throw ``PluginRefusal`` to refuse with a message.
public protocol QuiescePlugin {
    static var info: PluginInfo { get }
    static func plan(_ request: PlanRequest) throws -> Plan
}

/// A refusal an operator reads (e.g. "this plugin plans Linux instances; i-1 is windows").
public struct PluginRefusal: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Turns a ``QuiescePlugin`` into the C table of quiesce_plugin.h.
///
/// C function pointers cannot capture, so each plugin writes two one-line
/// closures that name its type, and exports the entry symbol itself:
///
///     private let table = PluginExport.table(
///         describe: { PluginExport.describe(MyPlugin.self, into: $0) },
///         plan: { PluginExport.plan(MyPlugin.self, $0, $1, into: $2) })
///     @_cdecl("quiesce_plugin_entry")
///     public func quiescePluginEntry() -> UnsafePointer<quiesce_plugin> { table.pointer }
public enum PluginExport {
    public typealias Describe = @convention(c) (UnsafeMutablePointer<quiesce_buffer>?) -> Int32
    public typealias PlanCall = @convention(c) (UnsafePointer<UInt8>?, Int, UnsafeMutablePointer<quiesce_buffer>?) -> Int32

    /// The table, allocated once and never freed (the library is never unloaded).
    public struct Table: @unchecked Sendable {
        public let pointer: UnsafePointer<quiesce_plugin>
    }

    public static func table(describe: Describe, plan: PlanCall) -> Table {
        let table = UnsafeMutablePointer<quiesce_plugin>.allocate(capacity: 1)
        table.initialize(to: quiesce_plugin(
            abi_version: UInt32(QUIESCE_PLUGIN_ABI_MAJOR << 16 | QUIESCE_PLUGIN_ABI_MINOR),
            struct_size: UInt32(MemoryLayout<quiesce_plugin>.size),
            describe: describe, plan: plan, free_buffer: { buffer in
                guard let buffer else { return }
                free(buffer.pointee.data)
                buffer.pointee.data = nil
                buffer.pointee.length = 0
            }))
        return Table(pointer: UnsafePointer(table))
    }

    public static func describe<P: QuiescePlugin>(_ plugin: P.Type, into out: UnsafeMutablePointer<quiesce_buffer>?) -> Int32 {
        guard let out else { return QUIESCE_PLUGIN_ERROR }
        do {
            return Self.write(try P.info.serializedBytes(), QUIESCE_PLUGIN_OK, to: out)
        } catch {
            return Self.write(Array("cannot encode PluginInfo: \(error)".utf8), QUIESCE_PLUGIN_ERROR, to: out)
        }
    }

    public static func plan<P: QuiescePlugin>(
        _ plugin: P.Type, _ bytes: UnsafePointer<UInt8>?, _ length: Int, into out: UnsafeMutablePointer<quiesce_buffer>?
    ) -> Int32 {
        guard let out else { return QUIESCE_PLUGIN_ERROR }
        do {
            let data = bytes.map { Data(bytes: $0, count: length) } ?? Data()
            let request: PlanRequest
            do {
                request = try PlanRequest(serializedBytes: data)
            } catch {
                throw PluginRefusal("cannot decode the PlanRequest (\(length) bytes): \(error)")
            }
            var plan = try P.plan(request)
            if plan.plugin.isEmpty { plan.plugin = P.info.name }
            return Self.write(try plan.serializedBytes(), QUIESCE_PLUGIN_OK, to: out)
        } catch let refusal as PluginRefusal {
            return Self.write(Array(refusal.description.utf8), QUIESCE_PLUGIN_ERROR, to: out)
        } catch {
            return Self.write(Array("\(P.info.name): \(error)".utf8), QUIESCE_PLUGIN_ERROR, to: out)
        }
    }

    private static func write(_ bytes: [UInt8], _ code: Int32, to out: UnsafeMutablePointer<quiesce_buffer>) -> Int32 {
        let memory = malloc(max(bytes.count, 1))!.assumingMemoryBound(to: UInt8.self)
        bytes.withUnsafeBufferPointer { memory.update(from: $0.baseAddress!, count: bytes.count) }
        out.pointee.data = memory
        out.pointee.length = bytes.count
        return code
    }
}
