import Crypto
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import NIOSSL
import NIOTLS
import QuiesceCore
import QuiescePKI
import Synchronization
import X509

/// Builds the gRPC transports Quiesce uses, so that every listener and dialler
/// gets the same TLS rules:
///
/// * the agent port is mutual TLS, trusting only the engine's CA (never the
///   system roots), requiring a client certificate, which BoringSSL checks for
///   validity dates and the clientAuth extended key usage during the handshake;
/// * agents verify the engine's certificate fully, host name or IP SAN included;
/// * the admin API is plain gRPC on a unix socket whose mode is 0600.
public enum SecureTransports {
    /// The mutual-TLS listener agents dial.
    /// - Parameter onStreamError: Called for errors the transport raises on an
    ///   RPC stream, including those (an oversized first message) that end the
    ///   stream before any handler sees it, so the engine can log them.
    /// - Parameter refuse: Asked, right after each TLS handshake, about the client's certificate (DER);
    ///   a reason (it was revoked) closes the connection before any request is read.
    public static func agentListener(
        address: ListenAddress, identity: TLSFiles, limits: SessionLimits = .defaults,
        onStreamError: (@Sendable (_ peer: String, _ error: any Error) -> Void)? = nil,
        refuse: (@Sendable (_ der: [UInt8]) -> String?)? = nil,
        onRefused: (@Sendable (_ peer: String, _ reason: String) -> Void)? = nil
    ) -> HTTP2ServerTransport.Posix {
        var config = HTTP2ServerTransport.Posix.Config.defaults
        config.channelDebuggingCallbacks.onAcceptTCPConnection = { channel in
            channel.eventLoop.makeCompletedFuture {
                let pipeline = channel.pipeline.syncOperations
                // Right after TLS, so HTTP/2 never holds on to TLS's read buffer (see PlaintextCompactor).
                try pipeline.addHandler(PlaintextCompactor(), position: .after(try pipeline.handler(type: NIOSSLServerHandler.self)))
                if let refuse { try pipeline.addHandler(HandshakeGate(refuse: refuse, onRefused: onRefused)) }
            }
        }
        if let onStreamError {
            config.channelDebuggingCallbacks.onAcceptHTTP2Stream = { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(StreamErrorReporter(report: onStreamError))
                }
            }
        }
        config.rpc.maxRequestPayloadSize = limits.maxMessageBytes
        // Agents ping after 60 s without frames. The server would ping a connection it has read
        // nothing from for 4 min and drop it 10 s later; the agents' heartbeats (at most 60 s
        // apart) and the session watchdog's silence limit (three of them) come first.
        config.connection.keepalive = .init(
            time: .seconds(240), timeout: .seconds(10),
            clientBehavior: .init(minPingIntervalWithoutCalls: .seconds(5), allowWithoutCalls: true))
        // A session carries a few small messages at a time, and a freeze waits
        // for each of them: write at once instead of holding each flush back
        // (up to 100 µs, often several times that once the timer fires) in the
        // hope of batching it with others.
        config.connection.flushCoalescing = nil
        return HTTP2ServerTransport.Posix(
            address: address.grpcAddress,
            transportSecurity: .mTLS(
                certificateChain: [.file(path: identity.certificatePath, format: .pem)],
                privateKey: .file(path: identity.keyPath, format: .pem)
            ) {
                $0.trustRoots = .certificates([.file(path: identity.trustRootsPath, format: .pem)])
                $0.clientCertificateVerification = .noHostnameVerification
            },
            config: config
        )
    }

    /// The agent's connection to its engine.
    ///
    /// - Parameter oneConnection: The transport opens one TCP connection and never another: when
    ///   it drops, grpc's client would otherwise dial again at once (an unclean close, such as an
    ///   engine that died, means "reconnect" to it), and every agent of a fleet would do a full TLS
    ///   handshake with the restarted engine at the same moment, only to close it again because
    ///   its session had ended: the herd the agents' jittered backoff exists to prevent. An agent
    ///   session uses one client per connection and redials on its own backoff.
    public static func agentDialer(engine: ListenAddress, identity: TLSFiles, oneConnection: Bool = false)
        -> HTTP2ClientTransport.Posix
    {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        if oneConnection {
            // Until one connection is up, every address of the target may be tried (a name that
            // resolves to ::1 and 127.0.0.1); after that, none. The callback runs before the TCP
            // connect is issued: a failed future here sends no packet.
            let connected = OnceFlag()
            config.channelDebuggingCallbacks.onCreateTCPConnection = { channel in
                guard !connected.isSet else {
                    return channel.eventLoop.makeFailedFuture(RPCError(
                        code: .unavailable, message: "this session's connection is gone; the agent redials on its own backoff"))
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectedMarker(connected), position: .first)
                }
            }
        }
        // A ping after 60 s without frames: an idle engine sends none (it only reads the agent's
        // heartbeats), so this is how an idle agent notices an engine that vanished without closing
        // its connection (a crashed host, a partition): within 70 s. Each ping costs the engine a
        // read and a write: at 10,000 sessions, 30 s was a third of what holding them cost.
        config.connection.keepalive = .init(time: .seconds(60), timeout: .seconds(10), allowWithoutCalls: true)
        // Every freeze and thaw answer waits on this flush (see agentListener).
        config.connection.flushCoalescing = nil
        // The agent runs its own backoff between sessions; the transport's reconnection inside one
        // client is kept short, or, with one connection, out of the way: every later attempt fails
        // in the callback above, and a client retrying every 100 ms until its owner has shut it down
        // spent a fleet's worth of channel set-ups while thousands of sessions ended at once.
        config.backoff = oneConnection
            ? .init(initial: .seconds(60), max: .seconds(60), multiplier: 1, jitter: 0)
            : .init(initial: .milliseconds(100), max: .seconds(2), multiplier: 1.6, jitter: 0.2)
        return try! HTTP2ClientTransport.Posix(
            target: engine.grpcTarget,
            transportSecurity: .mTLS(
                certificateChain: [.file(path: identity.certificatePath, format: .pem)],
                privateKey: .file(path: identity.keyPath, format: .pem)
            ) {
                $0.trustRoots = .certificates([.file(path: identity.trustRootsPath, format: .pem)])
                $0.serverCertificateVerification = .fullVerification
            },
            config: config
        )
    }

    /// The enrolment listener: TLS that authenticates the engine only (a new agent has no
    /// certificate yet). The chain offered ends with the CA's certificate, so an agent that
    /// knows only the CA's fingerprint can pin it (see ``enrolDialer(engine:caFingerprint:found:)``).
    public static func enrolListener(address: ListenAddress, identity: TLSFiles) -> HTTP2ServerTransport.Posix {
        var config = HTTP2ServerTransport.Posix.Config.defaults
        config.rpc.maxRequestPayloadSize = 64 * 1024
        return HTTP2ServerTransport.Posix(
            address: address.grpcAddress,
            transportSecurity: .tls(
                certificateChain: [.file(path: identity.certificatePath, format: .pem), .file(path: identity.trustRootsPath, format: .pem)],
                privateKey: .file(path: identity.keyPath, format: .pem)),
            config: config)
    }

    /// A new agent's connection to the enrolment port. It trusts no CA yet: the handshake
    /// goes on only if the engine's chain holds a CA certificate whose SHA-256 is
    /// `caFingerprint` and the engine's certificate is signed by it and valid now (a few
    /// minutes of clock skew allowed). Otherwise it fails before any request is sent;
    /// `found` receives what the engine presented, for the error.
    public static func enrolDialer(engine: ListenAddress, caFingerprint: String, found: PinReport) -> HTTP2ClientTransport.Posix {
        let pin = caFingerprint.lowercased().replacingOccurrences(of: ":", with: "")
        return try! HTTP2ClientTransport.Posix(
            target: engine.grpcTarget,
            transportSecurity: .tls {
                $0.serverCertificateVerification = .noHostnameVerification
                $0.customVerificationCallback = { certificates, promise in
                    promise.succeed(PinReport.verify(certificates, pin: pin, report: found))
                }
            },
            config: .defaults)
    }

    /// The remote admin API: mutual TLS like the agent port (the same CA, a client certificate
    /// required); which certificates may call what is the engine's per-call check (operators only).
    public static func operatorListener(
        address: ListenAddress, identity: TLSFiles, refuse: (@Sendable (_ der: [UInt8]) -> String?)? = nil,
        onRefused: (@Sendable (_ peer: String, _ reason: String) -> Void)? = nil
    ) -> HTTP2ServerTransport.Posix {
        self.agentListener(address: address, identity: identity, refuse: refuse, onRefused: onRefused)
    }

    /// An operator's connection to the remote admin API (its operator certificate, the engine verified fully).
    public static func operatorDialer(engine: ListenAddress, identity: TLSFiles) -> HTTP2ClientTransport.Posix {
        self.agentDialer(engine: engine, identity: identity)
    }

    /// The admin API listener on a unix socket.
    public static func adminListener(socketPath: String) -> HTTP2ServerTransport.Posix {
        HTTP2ServerTransport.Posix(address: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
    }

    /// The CLI's connection to the admin socket.
    public static func adminDialer(socketPath: String) -> HTTP2ClientTransport.Posix {
        try! HTTP2ClientTransport.Posix(target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
    }
}

/// What the engine presented to a pinning client, and why it was refused.
public final class PinReport: Sendable {
    private let state = Mutex<(fingerprints: [String], problem: String?)>(([], nil))
    public init() {}
    public var fingerprints: [String] { self.state.withLock { $0.fingerprints } }
    public var problem: String? { self.state.withLock { $0.problem } }

    static func verify(_ chain: [NIOSSLCertificate], pin: String, report: PinReport) -> NIOSSLVerificationResultWithMetadata {
        let parsed: [(der: [UInt8], certificate: Certificate)] = chain.compactMap { item in
            guard let der = try? item.toDERBytes(), let certificate = try? Certificate(derEncoded: der) else { return nil }
            return (der, certificate)
        }
        let prints = parsed.map { SHA256.hash(data: $0.der).map { String(format: "%02x", $0) }.joined() }
        func fail(_ why: String) -> NIOSSLVerificationResultWithMetadata {
            report.state.withLock { $0 = (prints, why) }
            return .failed
        }
        guard let leaf = parsed.first else { return fail("the engine presented no certificate") }
        guard let index = prints.firstIndex(of: pin), index > 0 || parsed.count == 1 else {
            return fail("no certificate in the engine's chain has the pinned SHA-256 \(pin) (found \(prints.joined(separator: ", ")))")
        }
        let ca = parsed[index].certificate
        guard ca.publicKey.isValidSignature(leaf.certificate.signature, for: leaf.certificate) else {
            return fail("the engine's certificate is not signed by the pinned CA")
        }
        let now = Date()
        guard leaf.certificate.notValidBefore <= now.addingTimeInterval(300), now <= leaf.certificate.notValidAfter.addingTimeInterval(300) else {
            return fail("the engine's certificate is not valid now (\(leaf.certificate.notValidBefore) – \(leaf.certificate.notValidAfter))")
        }
        report.state.withLock { $0 = (prints, nil) }
        return .certificateVerified(VerificationMetadata(nil))
    }
}

/// Closes a connection right after its TLS handshake when the client's certificate is refused
/// (revoked): before any HTTP/2 frame is read, so no request of that client runs.
final class HandshakeGate: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = Any
    let refuse: @Sendable ([UInt8]) -> String?
    let onRefused: (@Sendable (String, String) -> Void)?

    init(refuse: @escaping @Sendable ([UInt8]) -> String?, onRefused: (@Sendable (String, String) -> Void)?) {
        self.refuse = refuse
        self.onRefused = onRefused
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            let handler = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
            if let der = try? handler?.peerCertificate?.toDERBytes(), let reason = self.refuse(der) {
                self.onRefused?(context.channel.remoteAddress.map { "\($0)" } ?? "unknown", reason)
                context.close(promise: nil)
                return
            }
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// Sits at the end of each accepted HTTP/2 stream's pipeline and reports the
/// errors that reach it.
final class StreamErrorReporter: ChannelInboundHandler, Sendable {
    typealias InboundIn = Any
    let report: @Sendable (String, any Error) -> Void

    init(report: @escaping @Sendable (String, any Error) -> Void) {
        self.report = report
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.report(context.channel.remoteAddress.map { "\($0)" } ?? "unknown", error)
        context.fireErrorCaught(error)
    }
}

/// Hands each decrypted read on in a buffer of its own size. NIOSSL decrypts
/// into one 32 KiB buffer per connection and passes it on; HTTP/2's frame
/// decoder keeps what it is given between reads, so on the next read NIOSSL
/// finds its buffer shared and allocates another 32 KiB, and the decoder, to
/// append, copies the old one (about 14 KiB, three times). An idle session
/// thereby held some 70 KiB more after its first heartbeat (heaptrack, 1,000
/// sessions), and every read paid for fresh pages (13 % of the engine's CPU
/// holding 2,000 idle sessions went to clearing them). A read is at most one
/// TLS record (16 KiB) and a heartbeat a few dozen bytes: copying it costs
/// less than any of that, and NIOSSL's buffer stays its own.
final class PlaintextCompactor: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = Self.unwrapInboundIn(data)
        var own = context.channel.allocator.buffer(capacity: buffer.readableBytes)
        own.writeImmutableBuffer(buffer)
        context.fireChannelRead(Self.wrapInboundOut(own))
    }
}

/// Sets its flag when the TCP connection is up (see ``SecureTransports/agentDialer(engine:identity:oneConnection:)``).
final class ConnectedMarker: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny
    private let flag: OnceFlag
    init(_ flag: OnceFlag) { self.flag = flag }
    func channelActive(context: ChannelHandlerContext) {
        self.flag.set()
        context.fireChannelActive()
        // Its work is done: the connection's reads do not pass through it.
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
