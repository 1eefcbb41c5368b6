import QuiesceCore
import QuiescePluginProto
import QuiescePlugins
import Testing

@Suite("Levels: the plugin contract defines them, ConsistencyLevel mirrors them")
struct LevelTests {
    @Test("every contract level has a ConsistencyLevel with the same number and order, and back")
    func mirror() {
        #expect(Quiesce_Plugin_V1_Level.allCases.count == ConsistencyLevel.allCases.count)
        for level in Quiesce_Plugin_V1_Level.allCases {
            let mirrored = ConsistencyLevel(level)
            #expect(mirrored?.rawValue == level.rawValue && mirrored?.planLevel == level)
        }
        #expect(ConsistencyLevel(Quiesce_Plugin_V1_Level.UNRECOGNIZED(7)) == nil)
        #expect(Quiesce_Plugin_V1_Level.UNRECOGNIZED(7).name == "unknown(7)")
        #expect(ConsistencyLevel.allCases.map(\.planLevel) == [.crash, .filesystem, .application])
    }

    @Test("options from text: types, ranges, allowed values, lists")
    func optionText() throws {
        let info = PluginInfo.with {
            $0.name = "t"
            $0.version = "1"
            $0.levels = [.crash]
            $0.options = [
                .with { $0.name = "flag"; $0.type = .bool; $0.defaultValue = .with { $0.boolValue = false } },
                .with { $0.name = "wait_ms"; $0.type = .durationMs; $0.minimum = 1; $0.maximum = 100; $0.defaultValue = .with { $0.intValue = 5 } },
                .with { $0.name = "mode"; $0.type = .string; $0.allowed = ["a", "b"]; $0.defaultValue = .with { $0.stringValue = "a" } },
                .with { $0.name = "mounts"; $0.type = .stringList; $0.defaultValue = .with { $0.listValue = .init() } },
            ]
        }
        #expect(PlanValidator.problems(in: info).isEmpty)
        let resolved = try info.resolveOptions(["flag": .text("yes"), "wait_ms": .text("40ms"), "mounts": .text("/a, /b")])
        #expect(resolved["flag"]?.boolValue == true && resolved["wait_ms"]?.intValue == 40 && resolved["mode"]?.stringValue == "a")
        #expect(resolved["mounts"]?.listValue.values == ["/a", "/b"])
        #expect {
            try info.resolveOptions(["mode": .text("c"), "wait_ms": .int(500), "flag": .int(1)])
        } throws: { error in
            let text = "\(error)"
            return text.contains("option mode: expected one of a, b, found \"c\"")
                && text.contains("option wait_ms: expected milliseconds between 1 and 100, found 500")
                && text.contains("option flag: expected bool, found an integer (1)")
        }
        var bad = info
        bad.name = "Bad Name"
        bad.options.append(.with { $0.name = "flag"; $0.type = .int; $0.defaultValue = .with { $0.boolValue = true } })
        let problems = PlanValidator.problems(in: bad)
        #expect(problems.contains { $0.contains("name \"Bad Name\"") })
        #expect(problems.contains("option flag is declared twice"))
        #expect(problems.contains("option flag: default true does not match its type (integer)"), "\(problems)")
    }
}
