// swift-tools-version:6.1
import PackageDescription

// The module split follows ../shared/ARCHITECTURE.md: `QuiesceCore` holds types
// with no I/O; each part that touches sockets, certificates or the guest has its
// own module; the two executables only parse arguments and call into them.
let package = Package(
    name: "quiesce",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "quiesce", targets: ["quiesce"]),
        .executable(name: "quiesce-agent", targets: ["quiesce-agent"]),
        .executable(name: "quiesce-bench", targets: ["quiesce-bench"]),
        .executable(name: "quiesce-thaw-guard", targets: ["quiesce-thaw-guard"]),
        .executable(name: "quiesce-reference-agent", targets: ["quiesce-reference-agent"]),
        .executable(name: "quiesce-plugin-host", targets: ["quiesce-plugin-host"]),
        // The built-in plugins, loaded with dlopen like any third party's.
        .library(name: "quiesce-plugin-crash", type: .dynamic, targets: ["QuiescePluginCrash"]),
        .library(name: "quiesce-plugin-linux-freeze", type: .dynamic, targets: ["QuiescePluginLinuxFreeze"]),
        .library(name: "quiesce-plugin-mariadb", type: .dynamic, targets: ["QuiescePluginMariaDB"]),
        .library(name: "quiesce-plugin-windows-vss", type: .dynamic, targets: ["QuiescePluginWindowsVSS"]),
        // The plugin ABI header and the Swift kit, for plugin authors.
        .library(name: "CQuiescePlugin", targets: ["CQuiescePlugin"]),
        .library(name: "QuiescePluginKit", targets: ["QuiescePluginKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
    ],
    targets: [
        // Types, levels, versions and errors. No I/O.
        .target(name: "QuiesceCore"),
        // Generated protobuf messages and gRPC stubs (committed; scripts/gen-proto.sh).
        .target(
            name: "QuiesceProto",
            dependencies: [
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            ],
            exclude: ["MANIFEST"]
        ),
        // The plugin ABI (C header only): a versioned table, protobuf bytes across it.
        .target(name: "CQuiescePlugin"),
        // Generated messages of proto/quiesce/plugin/v1 (no gRPC: plugins link only SwiftProtobuf).
        .target(
            name: "QuiescePluginProto",
            dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
        // Writing a plugin in Swift: the C table from a protocol, option readers, step builders.
        .target(name: "QuiescePluginKit", dependencies: ["CQuiescePlugin", "QuiescePluginProto"]),
        .target(name: "QuiescePluginCrash", dependencies: ["CQuiescePlugin", "QuiescePluginKit"], path: "Plugins/crash"),
        .target(name: "QuiescePluginLinuxFreeze", dependencies: ["CQuiescePlugin", "QuiescePluginKit"], path: "Plugins/linux-freeze"),
        .target(name: "QuiescePluginMariaDB", dependencies: ["CQuiescePlugin", "QuiescePluginKit"], path: "Plugins/mariadb"),
        .target(name: "QuiescePluginWindowsVSS", dependencies: ["CQuiescePlugin", "QuiescePluginKit"], path: "Plugins/windows-vss"),
        // Loads one plugin with dlopen and answers over a pipe (C, no runtime of its own).
        .executableTarget(
            name: "quiesce-plugin-host", dependencies: ["CQuiescePlugin"],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // The engine's side of plugins: host processes, discovery, option and plan validation.
        .target(
            name: "QuiescePlugins",
            dependencies: ["QuiesceCore", "QuiescePluginProto", "CQuiesceLinux", .product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
        // Fleet files (YAML): providers, policies, instances, checked with file, line and field.
        .target(
            name: "QuiesceFleet",
            dependencies: ["QuiesceCore", "QuiescePlugins", .product(name: "Yams", package: "Yams")]
        ),
        // Linux calls Swift cannot name directly (FICLONE, FIFREEZE, SEEK_DATA …).
        .target(name: "CQuiesceLinux"),
        // The `local` snapshot provider: disk images in a pool, reflink or sparse copy.
        .target(
            name: "QuiesceLocalProvider",
            dependencies: ["QuiesceCore", "CQuiesceLinux", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // The `ec2` snapshot provider: the EC2 Query API signed with SigV4 (our own code on
        // swift-crypto), over async-http-client; credentials as every AWS tool reads them.
        .target(
            name: "QuiesceEC2",
            dependencies: [
                "QuiesceCore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // Every provider kind in one place: each parses and checks its own fleet-file
        // block and builds `any SnapshotProvider`; also the in-memory provider.
        .target(
            name: "QuiesceProviders",
            dependencies: ["QuiesceCore", "QuiesceFleet", "QuiesceLocalProvider", "QuiesceEC2", "QuiesceCatalog"]
        ),
        // The catalog: every run, group, disk snapshot, level and reason (SQLite via GRDB).
        .target(
            name: "QuiesceCatalog",
            dependencies: ["QuiesceCore", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        // The catalog several engines share: PostgreSQL (postgres-nio), runs held by leases.
        .target(
            name: "QuiesceCatalogPostgres",
            dependencies: [
                "QuiesceCore", "QuiesceCatalog", .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"), .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // Snapshots as an operator sees them: the catalog joined with the provider
        // (list, show, restore, prune, verify).
        .target(
            name: "QuiesceInventory",
            dependencies: ["QuiesceCore", "QuiesceCatalog", "QuiesceLocalProvider", "QuiesceProviders"]
        ),
        // The engine's CA: key pairs, certificates, on-disk layout.
        .target(
            name: "QuiescePKI",
            dependencies: [
                "QuiesceCore",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // gRPC transports secured with mutual TLS, and the session protocol's shared rules.
        .target(
            name: "QuiesceWire",
            dependencies: [
                "QuiesceCore", "QuiesceProto", "QuiescePKI",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // The engine: session registry, command dispatch, admin API.
        .target(
            name: "QuiesceEngine",
            dependencies: [
                "QuiesceCore", "QuiesceProto", "QuiescePKI", "QuiesceWire", "QuiescePlugins", "QuiescePluginProto",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "X509", package: "swift-certificates"),
            ]
        ),
        // The guest agent: session client, facts, command handlers.
        .target(
            name: "QuiesceAgent",
            dependencies: [
                "QuiesceCore", "QuiesceProto", "QuiescePKI", "QuiesceWire", "CQuiesceLinux",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // Fleet runs: per instance facts → plan → provider slot → quiesce → snapshot → thaw → record.
        .target(
            name: "QuiesceCoordinator",
            dependencies: [
                "QuiesceCore", "QuiesceEngine", "QuiesceFleet", "QuiescePlugins", "QuiescePluginProto", "QuiesceCatalog",
                "QuiesceLocalProvider", "QuiesceProto", "QuiesceProviders",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // `quiesce demo`: a throw-away fleet on loopback.
        .target(
            name: "QuiesceDemo",
            dependencies: [
                "QuiesceCore", "QuiescePKI", "QuiesceEngine", "QuiesceAgent", "QuiesceWire", "QuiesceCoordinator", "QuiesceFleet",
                "QuiescePlugins", "QuiesceLocalProvider", "QuiesceCatalog",
            ]
        ),
        .executableTarget(
            name: "quiesce",
            dependencies: [
                "QuiesceCore", "QuiescePKI", "QuiesceEngine", "QuiesceWire", "QuiesceDemo", "QuiesceInventory",
                "QuiesceCatalog", "QuiesceLocalProvider", "QuiescePlugins", "QuiescePluginProto", "QuiesceProto", "QuiesceFleet",
                "QuiesceCoordinator", "QuiesceProviders", "QuiesceEC2", "QuiesceCatalogPostgres",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "quiesce-agent",
            dependencies: [
                "QuiesceCore", "QuiesceAgent", "QuiesceWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The thaw guard (C, no runtime): owns every FIFREEZE/FITHAW of the agent and
        // thaws when the agent dies, the budget runs out or it is asked. Installed
        // next to quiesce-agent.
        .executableTarget(name: "quiesce-thaw-guard"),
        // bench-freeze's reference rows: a one-byte freeze agent in C (not part of the product).
        .executableTarget(name: "quiesce-reference-agent"),
        // Load generators for scripts/bench-*.sh.
        .executableTarget(
            name: "quiesce-bench",
            dependencies: [
                "QuiesceCore", "QuiescePKI", "QuiesceAgent", "QuiesceWire", "QuiesceLocalProvider", "QuiesceCatalog",
                "QuiesceEngine", "QuiesceProto", "CQuiesceLinux", "QuiescePlugins", "QuiescePluginProto", "QuiesceDemo",
                "QuiesceCoordinator", "QuiesceFleet", "QuiesceProviders",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            ]
        ),
        // Real loop devices and filesystems for tests (root only).
        .target(name: "QuiesceTestSupport", dependencies: ["QuiesceCore"], path: "Tests/Support"),
        .testTarget(name: "QuiesceCoreTests", dependencies: ["QuiesceCore", "QuiesceTestSupport"]),
        .testTarget(name: "QuiesceFleetTests", dependencies: ["QuiesceCore", "QuiesceFleet", "QuiescePlugins"]),
        .testTarget(name: "QuiescePluginsTests", dependencies: ["QuiesceCore", "QuiescePlugins", "QuiescePluginProto", "QuiesceTestSupport"]),
        .testTarget(name: "QuiescePKITests", dependencies: ["QuiescePKI"]),
        .testTarget(
            name: "QuiesceCatalogTests",
            dependencies: ["QuiesceCore", "QuiesceCatalog", "QuiesceCatalogPostgres", "QuiesceTestSupport", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        .testTarget(
            name: "QuiesceInventoryTests",
            dependencies: ["QuiesceCore", "QuiesceCatalog", "QuiesceLocalProvider", "QuiesceInventory", "QuiesceTestSupport"]
        ),
        .testTarget(name: "QuiesceLocalProviderTests", dependencies: ["QuiesceCore", "QuiesceLocalProvider", "CQuiesceLinux", "QuiesceTestSupport"]),
        .testTarget(
            name: "QuiesceEngineTests",
            dependencies: [
                "QuiesceCore", "QuiesceProto", "QuiescePKI", "QuiesceWire", "QuiesceEngine", "QuiesceAgent", "QuiesceTestSupport",
                "QuiescePlugins", "QuiescePluginProto", "QuiesceCoordinator", "QuiesceFleet", "QuiesceCatalog", "QuiesceLocalProvider",
                "QuiesceProviders", "QuiesceCatalogPostgres",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "QuiesceProvidersTests",
            dependencies: ["QuiesceCore", "QuiesceEC2", "QuiesceProviders", "QuiesceFleet", "QuiesceCatalog"]
        ),
        .testTarget(
            name: "QuiesceAgentTests",
            dependencies: ["QuiesceCore", "QuiesceProto", "QuiesceAgent", "QuiesceTestSupport"]
        ),
    ]
)

// Windows only: the agent's VSS requester (C++ over IVssBackupComponents) behind
// WindowsVssBackend. Never built on Linux; see README, Windows.
#if os(Windows)
package.targets.append(.target(name: "CQuiesceVSS", linkerSettings: [.linkedLibrary("vssapi"), .linkedLibrary("ole32"), .linkedLibrary("advapi32")]))
if let agent = package.targets.first(where: { $0.name == "QuiesceAgent" }) { agent.dependencies.append("CQuiesceVSS") }
#endif

