import Foundation
import GRPCCore
import QuiesceAgent
import QuiesceCore
import QuiesceEngine
import QuiescePKI
import QuiesceProto
import QuiesceTestSupport
import QuiesceWire
import Synchronization
import Testing

@Suite("Agent sessions over mutual TLS")
struct SessionTests {
    @Test("a valid agent certificate opens a session that answers facts")
    func establishes() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (runner, task) = try await fleet.connect("i-good")
        defer { task.cancel() }

        let session = try #require(await fleet.engine.registry.session(for: "i-good"))
        #expect(session.agentVersion == QuiesceVersion.software)
        #expect(session.protocolVersion == .agentSession)
        #expect(session.capabilities.contains("facts"))
        #expect(session.remoteAddress.contains("127.0.0.1"))
        #expect(session.certificateFingerprint.count == 64)
        guard case .connected(let sessionID) = runner.phase else { Issue.record("agent not connected: \(runner.phase)"); return }
        #expect(sessionID == session.sessionID)

        let facts = try await fleet.engine.facts(of: "i-good")
        #expect(facts.osFamily == "linux")
        #expect(facts.mounts.contains { $0.mountPoint == "/" })
        #expect(facts.hostname == ProcessInfo.processInfo.hostName)
    }

    @Test("answers may come out of order; each caller gets its own")
    func outOfOrder() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        // Command 1 is slow, command 2 fast.
        let handler = ScriptedHandler { $0.id == 1 ? .seconds(3) : .milliseconds(10) }
        let (_, task) = try await fleet.connect("i-order", handler: handler)
        defer { task.cancel() }
        let clock = ContinuousClock()
        let start = clock.now
        async let slow = fleet.engine.send(.facts(.init()), to: "i-order", deadline: .seconds(5))
        try await Task.sleep(for: .milliseconds(50))
        let fast = try await fleet.engine.send(.facts(.init()), to: "i-order", deadline: .seconds(5))
        let fastDone = clock.now - start
        #expect(fast.facts.hostname == "answered-2")
        // Generous against a loaded machine, still well short of the slow command's 3 s.
        #expect(fastDone < .milliseconds(2500), "the fast answer waited for the slow one: \(fastDone)")
        #expect(try await slow.facts.hostname == "answered-1")
    }

    @Test("a command past its deadline fails and the agent is told to cancel it")
    func deadline() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let handler = ScriptedHandler { _ in .seconds(30) }
        let (_, task) = try await fleet.connect("i-slow", handler: handler)
        defer { task.cancel() }
        // A long engine-side grace: this test is about the agent's own enforcement, not the engine's timer.
        let session = try #require(await fleet.engine.registry.session(for: "i-slow"))
        let result = try await session.send(.facts(.init()), deadline: .milliseconds(300), grace: .seconds(10))
        // The agent enforces the relative deadline itself and says so.
        #expect(result.status.rpcCode == .deadlineExceeded)
        #expect(result.status.reason == "deadline-exceeded")
        #expect(handler.cancelled.withLock { $0.contains(1) })
    }

    @Test("an agent that never answers: the engine's own timer fails the command at deadline plus grace")
    func engineTimer() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let handler = DeafHandler(answerAfter: .seconds(3))
        let (_, task) = try await fleet.connect("i-deaf", handler: handler)
        defer { task.cancel() }
        let session = try #require(await fleet.engine.registry.session(for: "i-deaf"))
        let clock = ContinuousClock()
        let start = clock.now
        let error = await #expect(throws: RPCError.self) {
            _ = try await session.send(.facts(.init()), deadline: .milliseconds(200), grace: .milliseconds(200))
        }
        let waited = clock.now - start
        #expect(error?.code == .deadlineExceeded)
        #expect(error?.message.contains("got no answer within") == true)
        // Not before deadline + grace; well before the agent's late answer.
        #expect(waited >= .milliseconds(400) && waited < .milliseconds(2500), "failed after \(waited)")
        #expect(session.pendingCommands == 0)
    }

    @Test("cancelling the caller cancels the command on the agent")
    func cancel() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let handler = ScriptedHandler { _ in .seconds(30) }
        let (_, task) = try await fleet.connect("i-cancel", handler: handler)
        defer { task.cancel() }
        let call = Task { try await fleet.engine.send(.facts(.init()), to: "i-cancel", deadline: .seconds(20)) }
        try await Task.sleep(for: .milliseconds(200))
        call.cancel()
        await #expect(throws: RPCError.self) { try await call.value }
        try await waitUntil { handler.cancelled.withLock { $0.contains(1) } }
    }

    @Test("a caller that is already cancelled fails at once, not at its deadline")
    func cancelledBeforeSending() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-early", handler: ScriptedHandler { _ in .seconds(30) })
        defer { task.cancel() }
        let clock = ContinuousClock()
        let start = clock.now
        let call = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await fleet.engine.send(.facts(.init()), to: "i-early", deadline: .seconds(20))
        }
        await #expect(throws: RPCError.self) { try await call.value }
        #expect(clock.now - start < .seconds(2))
    }

    @Test("an engine shut down before it ran says so instead of hanging")
    func shutdownBeforeRun() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let engine = try Engine(configuration: EngineConfiguration(
            listen: ListenAddress(host: .ipv4("127.0.0.1"), port: 0), identity: fleet.ca.engineFiles,
            adminSocketPath: nil, limits: .defaults))
        engine.shutdown()
        try await engine.run()
        await #expect(throws: EngineError.self) { try await engine.listeningAddress() }
    }

    @Test("a dropped session fails its pending commands at once")
    func droppedSessionFailsPending() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let handler = ScriptedHandler { _ in .seconds(60) }
        let (_, task) = try await fleet.connect("i-drop", handler: handler)
        let clock = ContinuousClock()
        let call = Task { try await fleet.engine.send(.facts(.init()), to: "i-drop", deadline: .seconds(60)) }
        try await Task.sleep(for: .milliseconds(200))
        let dropped = clock.now
        task.cancel()  // the agent goes away
        do {
            _ = try await call.value
            Issue.record("the pending command succeeded after its session dropped")
        } catch let error as RPCError {
            #expect(error.code == .unavailable)
            #expect(error.message.contains("session with i-drop ended"))
        }
        #expect(clock.now - dropped < .seconds(3))
        await #expect(throws: EngineError.self) { try await fleet.engine.send(.facts(.init()), to: "i-drop") }
    }

    @Test("an unknown command is answered UNIMPLEMENTED and the session stays open")
    func unknownCommand() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-old")
        defer { task.cancel() }
        // VSS is the Windows agent's: the Linux agent has the action defined but not implemented.
        let vss = try await fleet.engine.send(.vssFreeze(.init()), to: "i-old", deadline: .seconds(5))
        #expect(vss.status.rpcCode == .unimplemented)
        #expect(vss.status.reason == "not-implemented")
        // Still serving.
        #expect(try await fleet.engine.facts(of: "i-old").osFamily == "linux")
    }

    @Test("the agent dials again after the engine restarts")
    func reconnects() async throws {
        let first = try await Fleet.start()
        let port = first.address.port
        let runner = try await first.agent("i-back")
        let task = Task { try await runner.run() }
        defer { task.cancel() }
        #expect(await first.engine.registry.waitFor(["i-back"], timeout: .seconds(10)).isEmpty)
        await first.stop(keepFiles: true)
        // If the second engine cannot start, the kept files must still go.
        defer { try? FileManager.default.removeItem(atPath: first.directory) }
        try await waitUntil { if case .connected = runner.phase { false } else { true } }

        // The port is free again, but another test's socket may hold it for a
        // moment (ports are shared by every test in the process): retry briefly.
        var started: Fleet?
        for attempt in 1...20 {
            do {
                started = try await Fleet.start(port: port, directory: first.directory)
                break
            } catch where attempt < 20 {
                try await Task.sleep(for: .milliseconds(150))
            }
        }
        let second = try #require(started)
        defer { second.discard() }
        #expect(await second.engine.registry.waitFor(["i-back"], timeout: .seconds(10)).isEmpty)
        try await waitUntil { runner.sessionsOpened == 2 }
        #expect(try await second.engine.facts(of: "i-back").osFamily == "linux")
    }

    @Test("an engine whose admin socket another engine serves fails to start, saying so, instead of waiting for good")
    func adminSocketTaken() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let outcome = await within(.seconds(10)) { () async -> String in
            do {
                let second = try await Fleet.start(directory: fleet.directory)
                second.discard()
                return "started"
            } catch {
                return "\(error)"
            }
        }
        #expect(outcome?.contains("another engine is already listening") == true, "\(outcome ?? "still waiting after 10 s")")
        // The first engine's socket is still there: the one that failed did not remove it.
        #expect(FileManager.default.fileExists(atPath: fleet.directory + "/admin.sock"))
    }

    @Test("a second agent for an instance whose session answers is refused (identity-conflict); one whose holder is silent replaces it")
    func replaced() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-twice")
        defer { task.cancel() }
        let firstID = try #require(await fleet.engine.registry.session(for: "i-twice")).sessionID
        let second = try await fleet.agent("i-twice")
        let end = await second.runSession()
        #expect(!end.established && "\(end.error.map { "\($0)" } ?? "")".contains("identity-conflict"), "\(String(describing: end.error))")
        #expect(await fleet.engine.registry.session(for: "i-twice")?.sessionID == firstID, "the answering holder keeps its session")

        // A holder that no longer answers (a wedged or vanished agent whose connection has not timed out yet) is replaced.
        // (a raw session: it says hello, then reads nothing and answers nothing)
        let files = try await fleet.agentFiles("i-silent")
        let silentTask = Task { try await fleet.rawSession(fleet.mTLS(files), sending: [try hello("i-silent").bytes], holdOpen: .seconds(8)) }
        defer { silentTask.cancel() }
        try await waitUntil { await fleet.engine.registry.session(for: "i-silent") != nil }
        let silentID = try #require(await fleet.engine.registry.session(for: "i-silent")).sessionID
        let newcomer = try await fleet.agent("i-silent")
        let newTask = Task { await newcomer.runSession() }
        defer { newTask.cancel() }
        do {
            try await waitUntil { await fleet.engine.registry.session(for: "i-silent")?.sessionID != silentID }
        } catch {
            Issue.record("not replaced: \(await fleet.endReasons()) newcomer: \(newcomer.lastError ?? "-") \(newcomer.phase)")
            throw error
        }
        // The replaced session's handler records its end after the new one registers.
        try await waitUntil { await fleet.endReasons().contains { $0.contains("replaced by a new session") } }
        #expect(await fleet.engine.registry.conflict(for: "i-silent") == nil)
    }

    @Test("an idle session hears no engine heartbeats; an agent silent for the silence timeout is closed, and so is a connection with no hello")
    func idleAndSilent() async throws {
        let fleet = try await Fleet.start(limits: .defaults {
            $0.idleHeartbeat = .milliseconds(150)
            // Eight beats' worth: a loaded CI machine (two test workers, MariaDB, freezes) once kept a
            // beating agent from its next beat for 450 ms, three beats, and the engine closed it.
            $0.silenceTimeout = .milliseconds(1200)
            $0.helloTimeout = .milliseconds(400)
        })
        defer { fleet.discard() }
        // The hello, then nothing for 3 s (twenty idle intervals, two and a half silence timeouts): the engine, not the end of the stream, ends it.
        let files = try await fleet.agentFiles("i-mute")
        let (replies, error) = try await fleet.rawSession(fleet.mTLS(files), sending: [try hello("i-mute").bytes], holdOpen: .seconds(3))
        #expect(replies.map { $0.kind.map(\.name) ?? "-" } == ["hello"], "only the hello reply, no idle heartbeats: \(replies)")
        #expect(replies.first?.hello.heartbeatIntervalMs == 150)
        #expect(error?.code == .unavailable && error?.message.contains("no message from the agent for") == true, "\(String(describing: error))")
        try await waitUntil { await fleet.endReasons().contains { $0.contains("no message from the agent") } }

        // Connected, TLS done, never a hello.
        let (none, noHello) = try await fleet.rawSession(fleet.mTLS(try await fleet.agentFiles("i-shy")), sending: [], holdOpen: .seconds(3))
        #expect(none.isEmpty)
        #expect(noHello?.code == .deadlineExceeded && noHello?.message.contains("no hello within") == true, "\(String(describing: noHello))")

        // An agent that beats on time keeps its session through many silence timeouts.
        let (runner, task) = try await fleet.connect("i-alive")
        defer { task.cancel() }
        let opened = runner.sessionsOpened
        try await Task.sleep(for: .seconds(4))
        #expect(runner.sessionsOpened == opened)
        #expect(await fleet.engine.registry.session(for: "i-alive")?.isClosed == false)
    }

    @Test("the admin socket is mode 0600 and lists the agents")
    func adminSocket() async throws {
        let fleet = try await Fleet.start()
        defer { fleet.discard() }
        let (_, task) = try await fleet.connect("i-listed")
        defer { task.cancel() }
        var info = stat()
        #expect(stat(fleet.directory + "/admin.sock", &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        #expect(info.st_mode & S_IFMT == S_IFSOCK)

        let agents = try await withGRPCClient(transport: SecureTransports.adminDialer(socketPath: fleet.directory + "/admin.sock")) {
            try await Quiesce_Admin_V1_Admin.Client(wrapping: $0).listAgents(.init()).agents
        }
        #expect(agents.map(\.instanceID) == ["i-listed"])
        #expect(agents.first?.protocolVersion == "1.0")
    }
}

/// Polls `condition` every 20 ms for up to `timeout`.
func waitUntil(timeout: Duration = .seconds(10), _ condition: @Sendable () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    throw TestFailure("condition not met within \(timeout)")
}

extension SessionTests {
    /// NIO traps ("Deinited NIOAsyncWriter without calling finish()") when a
    /// server's serving task is cancelled while an accepted connection is still
    /// queued, unserved (apple/swift-nio#3481). Cancelling the task that runs
    /// `Engine.run` is how `quiesce backup`, the bench and the test fleet end an
    /// engine, and connections arrive at any moment (agents redialling, an
    /// admin client, a second engine probing the admin socket). The engine must
    /// turn that cancellation into its graceful shutdown: this test hammers
    /// both listeners while cancelling, 12 times; the old code crashed the
    /// whole test process here.
    @Test("cancelling the engine's task while connections arrive stops it cleanly, 12 times over")
    func cancelWhileConnecting() async throws {
        for round in 0..<12 {
            let fleet = try await Fleet.start()
            let stop = StopFlag()
            let port = fleet.address.port
            let adminPath = fleet.directory + "/admin.sock"
            // Two threads dial as fast as they can: TCP to the agent port, unix to the admin socket.
            let dialers = (0..<2).map { kind in
                Task.detached {
                    try await blocking {
                        var dialled = 0
                        while !stop.isSet {
                            if kind == 0 ? tcpDial(port: port) : UnixSocket.answers(adminPath) {
                                dialled += 1
                                stop.connected()
                            }
                            usleep(500)  // fast, without exhausting the listener's descriptors (NIO then pauses accepting for 1 s)
                        }
                        return dialled
                    }
                }
            }
            // Both dialers under way (on a loaded machine their threads start late), then a little more.
            for _ in 0..<500 where stop.connections < 2 { try await Task.sleep(for: .milliseconds(10)) }
            try await Task.sleep(for: .milliseconds(2 + round % 7))
            fleet.engineTask.cancel()
            let ended = await within(.seconds(10)) { () async -> Bool in
                _ = try? await fleet.engineTask.value
                return true
            }
            stop.set()
            var dialled = 0
            for dialer in dialers { dialled += try await dialer.value }
            fleet.discard()
            #expect(ended == true, "round \(round): the engine's run did not return within 10 s of its task being cancelled")
            #expect(dialled > 0, "round \(round): nothing was dialled")
        }
    }
}

private final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    private let count = Atomic<Int>(0)
    var isSet: Bool { self.flag.load(ordering: .acquiring) }
    func set() { self.flag.store(true, ordering: .releasing) }
    var connections: Int { self.count.load(ordering: .acquiring) }
    func connected() { self.count.add(1, ordering: .relaxed) }
}

/// One TCP connect to 127.0.0.1:port and close; true when it connected.
private func tcpDial(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}
