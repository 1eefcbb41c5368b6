import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import QuiesceCore
import QuiescePKI

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
    public static func agentListener(
        address: ListenAddress, identity: TLSFiles, limits: SessionLimits = .defaults,
        onStreamError: (@Sendable (_ peer: String, _ error: any Error) -> Void)? = nil
    ) -> HTTP2ServerTransport.Posix {
        var config = HTTP2ServerTransport.Posix.Config.defaults
        if let onStreamError {
            config.channelDebuggingCallbacks.onAcceptHTTP2Stream = { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(StreamErrorReporter(report: onStreamError))
                }
            }
        }
        config.rpc.maxRequestPayloadSize = limits.maxMessageBytes
        // Agents ping every 10 s; the server pings an idle connection after 30 s
        // and drops it if 10 s pass without an answer.
        config.connection.keepalive = .init(
            time: .seconds(30), timeout: .seconds(10),
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
    public static func agentDialer(engine: ListenAddress, identity: TLSFiles)
        -> HTTP2ClientTransport.Posix
    {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.connection.keepalive = .init(time: .seconds(10), timeout: .seconds(5), allowWithoutCalls: true)
        // Every freeze and thaw answer waits on this flush (see agentListener).
        config.connection.flushCoalescing = nil
        // The agent runs its own backoff between sessions; the transport's
        // reconnection inside one client is kept short.
        config.backoff = .init(initial: .milliseconds(100), max: .seconds(2), multiplier: 1.6, jitter: 0.2)
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

    /// The admin API listener on a unix socket.
    public static func adminListener(socketPath: String) -> HTTP2ServerTransport.Posix {
        HTTP2ServerTransport.Posix(address: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
    }

    /// The CLI's connection to the admin socket.
    public static func adminDialer(socketPath: String) -> HTTP2ClientTransport.Posix {
        try! HTTP2ClientTransport.Posix(target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
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
