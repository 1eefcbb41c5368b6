import Foundation
import QuiesceCoordinator
import Synchronization
import Testing

@Suite("Coordinator limits")
struct LimitsTests {
    @Test("the token bucket hands out its burst at once, then never faster than its rate")
    func tokenBucket() async {
        let bucket = TokenBucket(burst: 3, perSecond: 20)
        let began = ContinuousClock.now
        for _ in 0..<3 { await bucket.acquire() }
        #expect(ContinuousClock.now - began < .milliseconds(40))
        for _ in 0..<4 { await bucket.acquire() }
        // Four more tokens at 20/s take at least 200 ms (less a little for the refill already under way).
        #expect(ContinuousClock.now - began >= .milliseconds(180))
        let first = await bucket.firstGrant, last = await bucket.lastGrant
        #expect(first != nil && last != nil && last! > first!)
    }

    @Test("slots: never more holders than the limit, waiters served first come first served")
    func slots() async {
        let slots = Slots(limit: 2)
        let box = SlotLog()
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<6 {
                group.addTask {
                    await slots.acquire()
                    box.state.withLock {
                        $0.holding += 1
                        $0.most = max($0.most, $0.holding)
                        $0.order.append(index)
                    }
                    try? await Task.sleep(for: .milliseconds(30))
                    box.state.withLock { $0.holding -= 1 }
                    await slots.release()
                }
                // Queue them in a known order.
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
        let final = box.state.withLock { $0 }
        #expect(final.most == 2)
        #expect(final.order == Array(0..<6))
        #expect(await slots.inUse == 0)
    }
}

private final class SlotLog: Sendable {
    let state = Mutex((holding: 0, most: 0, order: [Int]()))
}
