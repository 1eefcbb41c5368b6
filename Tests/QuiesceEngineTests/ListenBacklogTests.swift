import Foundation
import QuiesceWire
import Testing

@Suite("Accept queue and reconnect spread")
struct ListenBacklogTests {
    @Test("a listening socket's backlog is raised in place; the engine's agent port listens with the kernel's cap")
    func backlog() async throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        #expect(bound && listen(fd, 16) == 0)
        let port = Int(UInt16(bigEndian: address.sin_port))
        #expect(reportedBacklog(port: port) == 16)
        #expect(ListenBacklog.raise(port: port, to: 1000) == 1)
        #expect(reportedBacklog(port: port) == min(1000, Int(ListenBacklog.kernelCap)))
        #expect(ListenBacklog.raise(port: port + 1 == 65536 ? 1 : port + 1) == 0, "a port nobody here listens on was touched")

        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        #expect(reportedBacklog(port: fleet.address.port) == Int(ListenBacklog.kernelCap))
    }

    @Test("the spread grows with the sessions an engine holds, from none (a small fleet: one-shot runs stay prompt) to two minutes")
    func spread() {
        #expect(ReconnectSpread.milliseconds(sessions: 1) == 0)
        #expect(ReconnectSpread.milliseconds(sessions: 499) == 0)
        #expect(ReconnectSpread.milliseconds(sessions: 2_000) == 8_000)
        #expect(ReconnectSpread.milliseconds(sessions: 10_000) == 40_000)
        #expect(ReconnectSpread.milliseconds(sessions: 1_000_000) == 120_000)
    }

    @Test("the idle heartbeat interval an engine asks for: the base up to 2,000 sessions, then in proportion, at most four times the base")
    func idleInterval() {
        let base = Duration.seconds(15)
        #expect(IdleHeartbeat.interval(base: base, sessions: 0) == .seconds(15))
        #expect(IdleHeartbeat.interval(base: base, sessions: 2_000) == .seconds(15))
        #expect(IdleHeartbeat.interval(base: base, sessions: 4_000) == .seconds(30))
        #expect(IdleHeartbeat.interval(base: base, sessions: 8_000) == .seconds(60))
        #expect(IdleHeartbeat.interval(base: base, sessions: 10_000) == .seconds(60))
        #expect(IdleHeartbeat.interval(base: .milliseconds(150), sessions: 1) == .milliseconds(150))
        #expect(!IdleHeartbeat.worthTelling(told: 15_000, now: 18_000))
        #expect(IdleHeartbeat.worthTelling(told: 15_000, now: 19_500))
    }

    @Test("an agent hears a new spread only when it moved by more than a quarter, or to or from none")
    func spreadWorthTelling() {
        #expect(!ReconnectSpread.worthTelling(told: 0, now: 0))
        #expect(ReconnectSpread.worthTelling(told: 0, now: 2_000))
        #expect(!ReconnectSpread.worthTelling(told: 2_000, now: 2_400))
        #expect(!ReconnectSpread.worthTelling(told: 2_000, now: 1_600))
        #expect(ReconnectSpread.worthTelling(told: 2_000, now: 2_600))
        #expect(ReconnectSpread.worthTelling(told: 2_000, now: 1_400))
        #expect(ReconnectSpread.worthTelling(told: 2_000, now: 0))
        // A fleet growing one session at a time from 500 to 10,000 tells each agent a handful of times.
        var told: UInt32 = 0, tellings = 0
        for sessions in 1...10_000 where ReconnectSpread.worthTelling(told: told, now: ReconnectSpread.milliseconds(sessions: sessions)) {
            told = ReconnectSpread.milliseconds(sessions: sessions)
            tellings += 1
        }
        #expect(tellings <= 15, "\(tellings)")
    }
}

/// The backlog of the listening socket on `port` as the kernel reports it (`ss -ltn`'s Send-Q
/// column for a listening socket).
func reportedBacklog(port: Int) -> Int? {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/ss")
    process.arguments = ["-Hltn", "sport", "= :\(port)"]
    let pipe = Pipe()
    process.standardOutput = pipe
    guard (try? process.run()) != nil else { return nil }
    let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    // State Recv-Q Send-Q Local Peer: Send-Q is the backlog of a listening socket.
    let fields = output.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" })
    return fields.count >= 3 ? Int(fields[2]) : nil
}
