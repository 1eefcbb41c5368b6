import QuiesceCore
import Testing

@Suite("Consistency levels")
struct ConsistencyLevelTests {
    @Test("crash < filesystem < application")
    func ordering() {
        #expect(ConsistencyLevel.crash < .filesystem)
        #expect(ConsistencyLevel.filesystem < .application)
        #expect(ConsistencyLevel.allCases.sorted() == [.crash, .filesystem, .application])
    }

    @Test("names and the seed's tags")
    func names() {
        #expect(ConsistencyLevel(name: "application-consistent") == .application)
        #expect(ConsistencyLevel(name: "FS") == .filesystem)
        #expect(ConsistencyLevel(name: "crash") == .crash)
        #expect(ConsistencyLevel(name: "best") == nil)
        #expect(ConsistencyLevel.application.tagValue == "APPConsistent")
        #expect(ConsistencyLevel.filesystem.tagValue == "FsConsistent")
    }
}

@Suite("Protocol versions")
struct ProtocolVersionTests {
    @Test("minor differences are compatible, major ones are refused naming both")
    func compatibility() {
        let engine = ProtocolVersionNumber(major: 1, minor: 0)
        #expect(engine.incompatibility(with: .init(major: 1, minor: 7), peerRole: "agent", ownRole: "engine") == nil)
        let problem = engine.incompatibility(with: .init(major: 2, minor: 1), peerRole: "agent", ownRole: "engine")
        #expect(problem?.contains("the agent speaks 2.1, the engine speaks 1.0") == true)
    }
}

@Suite("Backoff")
struct BackoffTests {
    @Test("the ceiling doubles up to the cap and every wait stays within [floor, ceiling]")
    func bounds() {
        var backoff = Backoff(base: .milliseconds(100), cap: .seconds(2), floor: .milliseconds(10))
        var generator = SeededGenerator(seed: 42)
        var ceilings: [Duration] = []
        for _ in 0..<10 {
            let ceiling = backoff.currentCeiling
            ceilings.append(ceiling)
            let wait = backoff.next(using: &generator)
            #expect(wait >= .milliseconds(10) && wait <= ceiling)
        }
        #expect(Array(ceilings.prefix(6)) == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(1600), .seconds(2)])
        #expect(ceilings.last == .seconds(2))
        backoff.reset()
        #expect(backoff.currentCeiling == .milliseconds(100))
    }

    @Test("waits are spread out (jitter), not in lockstep")
    func jitter() {
        var generator = SeededGenerator(seed: 7)
        let waits = (0..<50).map { _ -> Duration in
            var backoff = Backoff(base: .seconds(1), cap: .seconds(1))
            return backoff.next(using: &generator)
        }
        #expect(Set(waits).count > 40)
    }
}

@Suite("Deadlines and tables")
struct UtilityTests {
    @Test("withDeadline cancels a late operation")
    func deadline() async throws {
        await #expect(throws: DeadlineExceeded.self) {
            try await withDeadline(.milliseconds(50)) { try await Task.sleep(for: .seconds(10)) }
        }
        #expect(try await withDeadline(.seconds(5)) { 42 } == 42)
    }

    @Test("DedicatedThread runs off the cooperative pool and returns results and errors")
    func dedicatedThread() async throws {
        struct Boom: Error {}
        #expect(try await DedicatedThread.run { 7 } == 7)
        await #expect(throws: Boom.self) { try await DedicatedThread.run { throw Boom() } }
    }

    @Test("tables align columns")
    func table() {
        let table = TextTable(headers: ["A", "LONGER"], rows: [["wide value", "x"]])
        #expect(table.render() == "A            LONGER\nwide value   x")
        #expect(formatBytes(1536) == "1.5 KiB")
        #expect(formatBytes(512) == "512 B")
        #expect(formatBytes(1 << 30) == "1 GiB")
    }
}
