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
    func slots() async throws {
        let slots = Slots(limit: 2)
        await slots.acquire()
        await slots.acquire()
        #expect(await slots.inUse == 2)
        // Four waiters, each queued before the next one starts.
        let box = SlotLog()
        var waiters: [Task<Void, Never>] = []
        for index in 0..<4 {
            waiters.append(Task {
                await slots.acquire()
                box.order.withLock { $0.append(index) }
            })
            while await slots.waiting < index + 1 { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(box.order.withLock { $0.isEmpty })
        // Each release hands the slot to the longest waiter.
        for served in 1...4 {
            await slots.release()
            while box.order.withLock({ $0.count }) < served { try await Task.sleep(for: .milliseconds(1)) }
            #expect(box.order.withLock { $0 } == Array(0..<served))
            #expect(await slots.inUse == 2)
        }
        for waiter in waiters { await waiter.value }
        #expect(await slots.waiting == 0)
        // Waiters 2 and 3 hold the two slots now.
        await slots.release()
        await slots.release()
        #expect(await slots.inUse == 0)
    }

    @Test("a consistency group's slots come together: a group of three waits for three at once, and one behind it waits its turn")
    func groupSlots() async throws {
        let slots = Slots(limit: 3)
        await slots.acquire()
        let box = SlotLog()
        let group = Task {
            await slots.acquire(count: 3)
            box.order.withLock { $0.append(3) }
        }
        while await slots.waiting < 1 { try await Task.sleep(for: .milliseconds(1)) }
        let single = Task {
            await slots.acquire()
            box.order.withLock { $0.append(1) }
        }
        while await slots.waiting < 2 { try await Task.sleep(for: .milliseconds(1)) }
        // Two slots are free, not three: the group does not start with two of them, and the single does not overtake it.
        try await Task.sleep(for: .milliseconds(20))
        let inUse = await slots.inUse
        #expect(box.order.withLock { $0.isEmpty } && inUse == 1)
        await slots.release()
        await group.value
        let held = await slots.inUse
        #expect(box.order.withLock { $0 } == [3] && held == 3)
        await slots.release(count: 3)
        await single.value
        let after = await slots.inUse
        #expect(box.order.withLock { $0 } == [3, 1] && after == 1)

        // The bucket: three tokens at once or none; with one left, a group of two waits for the refill.
        let bucket = TokenBucket(burst: 3, perSecond: 10)
        await bucket.acquire(count: 3)
        let began = ContinuousClock.now
        await bucket.acquire(count: 2)
        #expect(ContinuousClock.now - began >= .milliseconds(180), "two tokens at 10/s take 200 ms")
    }

    @Test("paced slots: one at a time until a hold is known and while holds are short; a queue of long holds goes in together, up to the cap")
    func pacedSlots() async throws {
        let slots = Slots(limit: 4, paced: true)
        // No hold measured yet: one at a time.
        await slots.acquire()
        let second = Task { await slots.acquire() }
        while await slots.waiting < 1 { try await Task.sleep(for: .milliseconds(1)) }
        try await Task.sleep(for: .milliseconds(20))
        let (alone, allowedAlone) = (await slots.inUse, await slots.allowed)
        #expect(alone == 1 && allowedAlone == 1)
        await slots.release(heldFor: .milliseconds(2))
        await second.value
        #expect(await slots.inUse == 1)
        await slots.release(heldFor: .milliseconds(2))
        // Short holds (2 ms each): ten callers queued behind a holder still go one at a time.
        await slots.acquire()
        var queued: [Task<Void, Never>] = []
        for index in 0..<10 {
            queued.append(Task { await slots.acquire() })
            while await slots.waiting < index + 1 { try await Task.sleep(for: .milliseconds(1)) }
        }
        for left in (0..<10).reversed() {
            await slots.release(heldFor: .milliseconds(2))
            let (inUse, waiting) = (await slots.inUse, await slots.waiting)
            #expect(inUse == 1 && waiting == left, "after a release: \(inUse) held, \(waiting) waiting")
        }
        for waiter in queued { await waiter.value }
        await slots.release(heldFor: .milliseconds(2))
        let (mostShort, afterShort) = (await slots.mostHeld, await slots.inUse)
        #expect(mostShort == 1 && afterShort == 0)

        // Long holds (300 ms, a slow provider's create inside each window): a queue of six is
        // 1.8 s one at a time, so they go in together, as many as the cap allows.
        let slow = Slots(limit: 4, paced: true)
        await slow.acquire()
        var waiters: [Task<Void, Never>] = []
        for index in 0..<6 {
            waiters.append(Task { await slow.acquire() })
            while await slow.waiting < index + 1 { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(await slow.inUse == 1)
        await slow.release(heldFor: .milliseconds(300))
        while await slow.inUse < 4 { try await Task.sleep(for: .milliseconds(1)) }
        let (inUse, waiting, allowed) = (await slow.inUse, await slow.waiting, await slow.allowed)
        #expect(inUse == 4 && waiting == 2 && allowed == 4)
        for _ in 0..<6 { await slow.release(heldFor: .milliseconds(300)) }
        for waiter in waiters { await waiter.value }
        let (afterSlow, mostSlow) = (await slow.inUse, await slow.mostHeld)
        #expect(afterSlow == 0 && mostSlow == 4)

        // A consistency group of three, wider than the pacing allows now, goes when nothing else is held.
        let group = Slots(limit: 4, paced: true)
        await group.acquire(count: 3)
        #expect(await group.inUse == 3)
        let single = Task { await group.acquire() }
        while await group.waiting < 1 { try await Task.sleep(for: .milliseconds(1)) }
        await group.release(count: 3, heldFor: .milliseconds(2))
        await single.value
        #expect(await group.inUse == 1)

        // Not paced: the cap alone.
        let plain = Slots(limit: 4)
        for _ in 0..<4 { await plain.acquire() }
        let (plainInUse, plainAllowed) = (await plain.inUse, await plain.allowed)
        #expect(plainInUse == 4 && plainAllowed == 4)
    }

    @Test("frozen first: nothing frozen, no wait; frozen, a wait that ends at the last thaw, or after the patience")
    func frozenFirst() async throws {
        let gate = FrozenFirst(patience: .milliseconds(300))
        var began = ContinuousClock.now
        await gate.yield()
        let idle = ContinuousClock.now - began
        let none = await gate.deferred
        #expect(idle < .milliseconds(50) && none == 0)
        // Two frozen: a waiter waits through the first thaw and goes at the second.
        await gate.quiescing()
        await gate.quiescing()
        began = .now
        let waiter = Task { await gate.yield(); return ContinuousClock.now }
        try await Task.sleep(for: .milliseconds(60))
        await gate.thawed()
        try await Task.sleep(for: .milliseconds(60))
        let lastThaw = ContinuousClock.now
        await gate.thawed()
        let went = await waiter.value
        #expect(went >= lastThaw && went - lastThaw < .milliseconds(150), "went \(went - lastThaw) after the last thaw")
        let (deferred, frozenNow) = (await gate.deferred, await gate.frozenNow)
        #expect(deferred == 1 && frozenNow == 0)
        // Frozen for longer than the patience: the wait ends at the patience.
        await gate.quiescing()
        began = .now
        await gate.yield()
        let waited = ContinuousClock.now - began
        #expect(waited >= .milliseconds(290) && waited < .milliseconds(1500), "waited \(waited)")
        await gate.thawed()
        // No patience: never a wait.
        let eager = FrozenFirst(patience: .zero)
        await eager.quiescing()
        began = .now
        await eager.yield()
        let eagerWaited = ContinuousClock.now - began
        let eagerDeferred = await eager.deferred
        #expect(eagerWaited < .milliseconds(50) && eagerDeferred == 0)
    }
}

private final class SlotLog: Sendable {
    let order = Mutex<[Int]>([])
}
