import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

@Suite("Output queue")
struct OutputQueueTests {
    @Test("a reader that is not reading never holds up the writer; once it reads, everything arrives in order")
    func fullPipe() async throws {
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        // Fill the pipe: from here on, a plain write to it blocks until the reader reads.
        let flags = fcntl(fds[1], F_GETFL)
        _ = fcntl(fds[1], F_SETFL, flags | O_NONBLOCK)
        let filler = [UInt8](repeating: UInt8(ascii: "."), count: 4096)
        var filled = 0
        while true {
            let n = filler.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            filled += n
        }
        _ = fcntl(fds[1], F_SETFL, flags)
        #expect(filled >= 4096)
        let prefilled = filled

        let queue = OutputQueue(fd: fds[1], name: "test-output")
        let lines = (0..<2000).map { "line \($0)\n" }
        // On a thread: if a write waited for the reader, only that thread would wait.
        let returned = await within(.seconds(10)) {
            let wrote: Bool? = try? await blocking {
                for line in lines { queue.write(line) }
                return true
            }
            return wrote == true
        }
        #expect(returned == true, "a write waited for the reader")
        #expect(queue.queuedBytes > 0, "the queue should still hold what the full pipe cannot take")

        // The reader starts reading: the filler, then every line, in order.
        let reader = fds[0]
        let received = try await blocking { () -> [UInt8] in
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            let expected = prefilled + lines.reduce(0) { $0 + $1.utf8.count }
            while bytes.count < expected {
                let n = buffer.withUnsafeMutableBytes { read(reader, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                bytes += buffer[..<n]
            }
            return bytes
        }
        #expect(await within(.seconds(10)) { () async -> Bool in
            let flushed: Bool? = try? await blocking { queue.flush(); return true }
            return flushed == true
        } == true)
        #expect(received.count == filled + lines.reduce(0) { $0 + $1.utf8.count })
        #expect(String(decoding: received[filled...], as: UTF8.self) == lines.joined())
    }

    @Test("a reader that is gone: writes fail quietly and flush returns")
    func closedPipe() async throws {
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        close(fds[0])
        defer { close(fds[1]) }
        // As in every Quiesce binary. Never toggled back: restoring the default while
        // another test writes to a pipe whose reader died (a crashed plugin host) would
        // kill the whole test process without a word.
        BrokenPipes.ignoreSignal()
        let queue = OutputQueue(fd: fds[1], name: "test-output")
        queue.write("nobody reads this\n")
        #expect(await within(.seconds(10)) { () async -> Bool in
            let flushed: Bool? = try? await blocking { queue.flush(); return true }
            return flushed == true
        } == true)
        queue.write("nor this\n")
        #expect(queue.queuedBytes == 0)
    }
}
