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
        #expect(ListenBacklog.reported(port: port) == 16)
        #expect(ListenBacklog.raise(port: port, to: 1000) == 1)
        #expect(ListenBacklog.reported(port: port) == min(1000, Int(ListenBacklog.kernelCap)))
        #expect(ListenBacklog.raise(port: port + 1 == 65536 ? 1 : port + 1) == 0, "a port nobody here listens on was touched")

        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        #expect(ListenBacklog.reported(port: fleet.address.port) == Int(ListenBacklog.kernelCap))
    }

    @Test("the spread grows with the sessions an engine holds, from none (a small fleet: one-shot runs stay prompt) to two minutes")
    func spread() {
        #expect(ReconnectSpread.milliseconds(sessions: 1) == 0)
        #expect(ReconnectSpread.milliseconds(sessions: 499) == 0)
        #expect(ReconnectSpread.milliseconds(sessions: 2_000) == 8_000)
        #expect(ReconnectSpread.milliseconds(sessions: 10_000) == 40_000)
        #expect(ReconnectSpread.milliseconds(sessions: 1_000_000) == 120_000)
    }
}
