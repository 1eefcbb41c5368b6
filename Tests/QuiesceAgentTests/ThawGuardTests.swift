import Foundation
@testable import QuiesceAgent
import QuiesceTestSupport
import Synchronization
import Testing

/// The agent's end of the thaw guard, on its own (the freeze tests drive it through the agent).
@Suite("Thaw guard link")
struct ThawGuardTests {
    /// Once the guard is gone the agent closes its socket, and the kernel hands
    /// that descriptor number to whatever opens a file next: in the test suite,
    /// another agent's guard socket; in an agent, a hook's pipe or a connection.
    /// `shutdown()` (the agent stopping) and `post()` (a thaw nobody waits for)
    /// used the number anyway and shut down or wrote into someone else's socket —
    /// an innocent guard then saw end-of-file and exited ("the thaw guard process
    /// is gone" in an unrelated test). Here the number is taken by fresh
    /// socketpairs; every one of them must come through untouched.
    @Test("a guard that is gone never touches the descriptor number it used to own")
    func lostGuardKeepsItsHandsOff() async throws {
        let lost = Flag()
        let link = try await ThawGuard.start(executable: ThawGuard.defaultExecutable()) { message in
            if message == nil { lost.set() }
        }
        kill(link.pid, SIGKILL)
        for _ in 0..<150 where !lost.isSet { try await Task.sleep(for: .milliseconds(20)) }
        try #require(lost.isSet, "the agent did not notice its guard's death within 3 s")

        // Lowest free numbers first: one of these takes the number the guard's socket had.
        var pairs: [[Int32]] = []
        defer { for pair in pairs { close(pair[0]); close(pair[1]) } }
        for _ in 0..<32 {
            var pair: [Int32] = [-1, -1]
            try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
            pairs.append(pair)
        }
        #expect(link.post("THAW x engine-silent") == false, "post() reported a send on a guard that is gone")
        link.shutdown()
        for (index, pair) in pairs.enumerated() {
            for (from, to) in [(pair[0], pair[1]), (pair[1], pair[0])] {
                var out: UInt8 = 42
                #expect(send(from, &out, 1, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) == 1, "pair \(index) (fds \(pair)) was shut down: \(String(cString: strerror(errno)))")
                var back: UInt8 = 0
                #expect(recv(to, &back, 1, Int32(MSG_DONTWAIT)) == 1 && back == 42, "pair \(index) (fds \(pair)) lost its data or got a stranger's")
            }
        }
    }
}

private final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { self.value.load(ordering: .acquiring) }
    func set() { self.value.store(true, ordering: .releasing) }
}
