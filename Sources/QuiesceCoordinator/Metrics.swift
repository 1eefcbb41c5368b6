import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import QuiesceCore
import QuiesceEngine

/// What `quiesce serve --metrics-listen` exposes to Prometheus (text format 0.0.4 at `/metrics`):
///
/// | metric | labels |
/// |---|---|
/// | `quiesce_runs_total` | `outcome` (succeeded, degraded, failed) |
/// | `quiesce_instances_total` | `state` (succeeded, downgraded, failed) |
/// | `quiesce_groups_total` | `level` (crash, filesystem, application) |
/// | `quiesce_frozen_seconds` | histogram of the guest's frozen window |
/// | `quiesce_stall_seconds` | histogram of the application's stall |
/// | `quiesce_provider_calls_total` | `provider`, `call`, `result` (ok, throttled, error) |
/// | `quiesce_provider_call_seconds` | histogram, `provider`, `call` |
/// | `quiesce_retries_total` | attempts after the first, over all instances |
/// | `quiesce_retention_deleted_total` | groups retention deleted |
/// | `quiesce_schedule_firings_total` | `schedule`, `result` (started, skipped-overlap, refused) |
/// | `quiesce_sessions_connected` | agents with a live session, read at each scrape |
public final class EngineMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    let frozen: DurationHistogram
    let stall: DurationHistogram
    let retries: Counter
    let pruned: Counter
    let sessions: Gauge

    static let windowBuckets: [Duration] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000].map { .milliseconds($0) }
    static let callBuckets: [Duration] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000].map { .milliseconds($0) }

    public init() {
        self.frozen = self.registry.makeDurationHistogram(
            descriptor: Self.name("frozen", "seconds", "The filesystems' frozen window, measured on the guest (first FIFREEZE to last FITHAW)."),
            labels: [], buckets: Self.windowBuckets)
        self.stall = self.registry.makeDurationHistogram(
            descriptor: Self.name("stall", "seconds", "The application's stall: from the first step that blocked it to the last."),
            labels: [], buckets: Self.windowBuckets)
        self.retries = self.registry.makeCounter(descriptor: Self.name("retries", "total", "Attempts after the first, over all instances."), labels: [])
        self.pruned = self.registry.makeCounter(descriptor: Self.name("retention_deleted", "total", "Snapshot groups deleted by retention."), labels: [])
        self.sessions = self.registry.makeGauge(descriptor: Self.name("sessions_connected", "", "Agents with a live session."), labels: [])
    }

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "quiesce", metricName: metric, unitName: unit, helpText: help)
    }

    /// A run's report: its outcome, its instances' states and levels, their windows and retries, what retention deleted.
    public func record(_ report: RunReport) {
        self.registry.makeCounter(descriptor: Self.name("runs", "total", "Fleet runs by outcome."),
                                  labels: [("outcome", report.runState.rawValue)]).increment()
        for outcome in report.instances {
            self.registry.makeCounter(descriptor: Self.name("instances", "total", "Instances backed up, by state."),
                                      labels: [("state", outcome.state.rawValue)]).increment()
            if let level = outcome.achieved, outcome.groupID != nil {
                self.registry.makeCounter(descriptor: Self.name("groups", "total", "Snapshot groups recorded, by the level their thaw reply proved."),
                                          labels: [("level", level.name)]).increment()
            }
            if let frozen = outcome.frozen { self.frozen.record(frozen) }
            if let stall = outcome.stall { self.stall.record(stall) }
            if outcome.attempts > 1 { self.retries.increment(by: Int64(outcome.attempts - 1)) }
            if !outcome.pruned.isEmpty { self.pruned.increment(by: Int64(outcome.pruned.count)) }
        }
    }

    public func record(_ firing: Scheduler.Firing) {
        let (schedule, result): (String, String) = switch firing {
        case .started(let name, _, _): (name, "started")
        case .skippedOverlap(let name, _): (name, "skipped-overlap")
        case .refused(let name, _): (name, "refused")
        }
        self.registry.makeCounter(descriptor: Self.name("schedule_firings", "total", "Schedule firings, by what became of them."),
                                  labels: [("schedule", schedule), ("result", result)]).increment()
    }

    /// One provider's counters and timings, by call, made once: a create inside a frozen window
    /// then only bumps an atomic and records into a histogram, never looks anything up.
    struct ProviderMeters: Sendable {
        static let calls = ["create", "wait-ready", "describe", "list", "delete", "restore", "tag", "check", "prepare"]
        static let results = ["ok", "throttled", "error"]
        let counters: [String: Counter]
        let timings: [String: DurationHistogram]

        init(provider: String, registry: PrometheusCollectorRegistry) {
            var counters: [String: Counter] = [:], timings: [String: DurationHistogram] = [:]
            for call in Self.calls {
                for result in Self.results {
                    counters[call + "/" + result] = registry.makeCounter(
                        descriptor: EngineMetrics.name("provider_calls", "total", "Calls to snapshot providers, by result."),
                        labels: [("provider", provider), ("call", call), ("result", result)])
                }
                timings[call] = registry.makeDurationHistogram(
                    descriptor: EngineMetrics.name("provider_call", "seconds", "How long provider calls took."),
                    labels: [("provider", provider), ("call", call)], buckets: EngineMetrics.callBuckets)
            }
            self.counters = counters
            self.timings = timings
        }

        func record(_ call: String, _ result: String, _ elapsed: Duration) {
            self.counters[call + "/" + result]?.increment()
            self.timings[call]?.record(elapsed)
        }
    }

    /// The exposition, with the gauges read now.
    public func exposition(sessions: Int) -> String {
        self.sessions.set(Double(sessions))
        return self.registry.emitToString()
    }

    /// Wraps a provider so its calls are counted and timed under the fleet's `name` for it.
    public func metered(_ provider: any SnapshotProvider, name: String) -> any SnapshotProvider {
        MeteredProvider(base: provider, meters: ProviderMeters(provider: name, registry: self.registry))
    }
}

/// A provider whose every call is counted (`ok`, `throttled`, `error`) and timed.
struct MeteredProvider: SnapshotProvider {
    let base: any SnapshotProvider
    let meters: EngineMetrics.ProviderMeters

    var kind: String { self.base.kind }
    var capabilities: ProviderCapabilities { self.base.capabilities }

    func measured<T>(_ call: String, _ body: () async throws -> T) async throws -> T {
        let began = ContinuousClock.now
        do {
            let result = try await body()
            self.meters.record(call, "ok", .now - began)
            return result
        } catch let error as ProviderError {
            if case .throttled = error { self.meters.record(call, "throttled", .now - began) } else {
                self.meters.record(call, "error", .now - began)
            }
            throw error
        } catch {
            self.meters.record(call, "error", .now - began)
            throw error
        }
    }

    func createGroup(_ request: CreateGroupRequest) async throws -> SnapshotGroup { try await self.measured("create") { try await self.base.createGroup(request) } }
    /// Arming and finishing are timed as calls of their own; the capture is the `create`.
    func armCreate(_ request: CreateGroupRequest) async throws -> any ArmedCreate {
        MeteredCreate(base: try await self.measured("arm") { try await self.base.armCreate(request) }, provider: self)
    }
    func waitUntilReady(_ groupID: String, timeout: Duration) async throws -> SnapshotGroup {
        try await self.measured("wait-ready") { try await self.base.waitUntilReady(groupID, timeout: timeout) }
    }
    func describe(_ groupID: String) async throws -> SnapshotGroup { try await self.measured("describe") { try await self.base.describe(groupID) } }
    func list(tags: [String: String]) async throws -> [SnapshotGroup] { try await self.measured("list") { try await self.base.list(tags: tags) } }
    func delete(_ groupID: String) async throws { try await self.measured("delete") { try await self.base.delete(groupID) } }
    func restore(_ groupID: String, disk: String, to target: RestoreTarget) async throws -> String {
        try await self.measured("restore") { try await self.base.restore(groupID, disk: disk, to: target) }
    }
    func tag(_ groupID: String, _ tags: [String: String]) async throws -> SnapshotGroup { try await self.measured("tag") { try await self.base.tag(groupID, tags) } }
    func check(_ targets: [ProviderTarget]) async -> [ProviderCheckItem] {
        let began = ContinuousClock.now
        let items = await self.base.check(targets)
        self.meters.record("check", items.contains { !$0.ok && $0.blocking } ? "error" : "ok", .now - began)
        return items
    }
    func prepare(_ requests: [PrepareRequest]) async throws -> [String: PreparedGroup] {
        try await self.measured("prepare") { try await self.base.prepare(requests) }
    }
    func waitUntilReady(_ groupIDs: [String], timeout: Duration) async -> [String: Result<SnapshotGroup, ProviderError>] {
        let began = ContinuousClock.now
        let results = await self.base.waitUntilReady(groupIDs, timeout: timeout)
        self.meters.record("wait-ready", results.values.contains { if case .failure = $0 { true } else { false } } ? "error" : "ok", .now - began)
        return results
    }
}

struct MeteredCreate: ArmedCreate {
    let base: any ArmedCreate
    let provider: MeteredProvider

    func capture() async throws { try await self.provider.measured("create") { try await self.base.capture() } }
    func finish() async throws -> SnapshotGroup { try await self.provider.measured("finish") { try await self.base.finish() } }
    func abandon() async { await self.base.abandon() }
}

/// `GET /metrics` over plain HTTP/1.1 (what Prometheus scrapes), nothing else: 404 for other
/// paths, 405 for other methods. Meant for loopback or a scrape network, like node_exporter.
public final class MetricsServer: Sendable {
    let channel: any Channel
    public var address: String { self.channel.localAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?" }

    public static func start(host: String, port: Int, body: @escaping @Sendable () async -> String) async throws -> MetricsServer {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMap {
                    channel.pipeline.addHandler(MetricsHandler(body: body))
                }
            }
            .bind(host: host, port: port).get()
        return MetricsServer(channel: channel)
    }

    init(channel: any Channel) { self.channel = channel }

    public func close() async { try? await self.channel.close() }
}

final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let body: @Sendable () async -> String
    var head: HTTPRequestHead?

    init(body: @escaping @Sendable () async -> String) { self.body = body }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?").first.map(String.init) ?? head.uri
            let loop = context.eventLoop
            let bound = NIOLoopBound((context, self), eventLoop: loop)
            if head.method != .GET && head.method != .HEAD {
                bound.value.1.respond(bound.value.0, status: .methodNotAllowed, text: "only GET\n", keepAlive: head.isKeepAlive)
            } else if path != "/metrics" {
                bound.value.1.respond(bound.value.0, status: .notFound, text: "Quiesce's metrics are at /metrics\n", keepAlive: head.isKeepAlive)
            } else {
                let body = self.body
                let keepAlive = head.isKeepAlive
                Task {
                    let text = await body()
                    loop.execute { bound.value.1.respond(bound.value.0, status: .ok, text: text, keepAlive: keepAlive, contentType: "text/plain; version=0.0.4; charset=utf-8") }
                }
            }
        }
    }

    func respond(_ context: ChannelHandlerContext, status: HTTPResponseStatus, text: String, keepAlive: Bool, contentType: String = "text/plain; charset=utf-8") {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(text.utf8.count)")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
        if !keepAlive { done.whenComplete { [channel = context.channel] _ in channel.close(promise: nil) } }
    }
}
