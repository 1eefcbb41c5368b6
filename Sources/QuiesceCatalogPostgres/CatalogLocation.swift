import Foundation
import NIOCore
import NIOSSL
import PostgresNIO
import QuiesceCatalog

/// Where a PostgreSQL catalog is: `postgres://USER@HOST[:PORT]/DATABASE[?schema=S&sslmode=require&password_file=F&host=SOCKETDIR]`.
///
/// A password is never taken from the URL (it would show in `ps` and in unit files): it is read
/// from `password_file` or the `PGPASSWORD` environment variable, or the server trusts the user.
public struct CatalogLocation: Sendable, CustomStringConvertible {
    public var user: String
    public var host: String
    public var port: Int
    public var database: String
    public var schema: String
    public var requireTLS: Bool
    public var passwordFile: String?
    /// A directory holding the server's Unix socket (`?host=/var/run/postgresql`).
    public var socketDirectory: String?
    var environmentPassword: String?

    public static func isPostgres(_ text: String) -> Bool { text.hasPrefix("postgres://") || text.hasPrefix("postgresql://") }

    public init(parsing text: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        func bad(_ detail: String) -> CatalogError {
            .unusable(path: Self.redacted(text), detail: "expected postgres://USER@HOST[:PORT]/DATABASE[?schema=NAME&sslmode=disable|require&password_file=PATH]: \(detail)")
        }
        guard Self.isPostgres(text), let components = URLComponents(string: text) else { throw bad("not a URL") }
        if components.password != nil {
            throw bad("a password in the URL would show in process lists; put it in a file (password_file=PATH) or PGPASSWORD")
        }
        self.user = components.user ?? environment["PGUSER"] ?? "postgres"
        self.host = components.host.flatMap { $0.isEmpty ? nil : $0 } ?? "127.0.0.1"
        self.port = components.port ?? 5432
        let database = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : components.path
        guard !database.isEmpty, !database.contains("/") else { throw bad("found no database name after the host") }
        self.database = database
        self.schema = "quiesce"
        self.requireTLS = false
        for item in components.queryItems ?? [] {
            let value = item.value ?? ""
            switch item.name {
            case "schema":
                guard !value.isEmpty, value.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }), value.count <= 63 else {
                    throw bad("schema \"\(value)\" must be letters, digits and _ (at most 63)")
                }
                self.schema = value
            case "sslmode":
                switch value {
                case "disable": self.requireTLS = false
                case "require": self.requireTLS = true
                default: throw bad("sslmode \"\(value)\": expected disable or require")
                }
            case "password_file": self.passwordFile = value
            case "host": self.socketDirectory = value
            default: throw bad("unknown parameter \"\(item.name)\"")
            }
        }
        self.environmentPassword = environment["PGPASSWORD"]
    }

    public func password() throws -> String? {
        if let file = self.passwordFile {
            do {
                let text = try String(contentsOfFile: file, encoding: .utf8)
                return text.trimmingCharacters(in: .newlines)
            } catch {
                throw CatalogError.unusable(path: self.description, detail: "password_file \(file): \(error.localizedDescription)")
            }
        }
        return self.environmentPassword
    }

    /// For one direct connection (the probe when opening).
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        var configuration: PostgresConnection.Configuration
        if let socket = self.socketDirectory {
            configuration = .init(unixSocketPath: socket + "/.s.PGSQL.\(self.port)", username: self.user, password: try self.password(), database: self.database)
        } else {
            let tls: PostgresConnection.Configuration.TLS =
                self.requireTLS ? .require(try NIOSSLContext(configuration: .makeClientConfiguration())) : .disable
            configuration = .init(host: self.host, port: self.port, username: self.user, password: try self.password(), database: self.database, tls: tls)
        }
        configuration.options.connectTimeout = .seconds(10)
        return configuration
    }

    public var description: String {
        "postgres://\(self.user)@\(self.socketDirectory ?? self.host):\(self.port)/\(self.database) (schema \(self.schema))"
    }

    static func redacted(_ text: String) -> String {
        guard var components = URLComponents(string: text) else { return "(catalog URL)" }
        if components.password != nil { components.password = "***" }
        return components.string ?? "(catalog URL)"
    }
}

/// Opens the catalog an operator names: a PostgreSQL URL, or a SQLite file path.
public enum CatalogOpener {
    public static func open(_ spec: String, lease: Duration = .seconds(30)) async throws -> any CatalogStore {
        if CatalogLocation.isPostgres(spec) {
            return try await PostgresCatalog.open(try CatalogLocation(parsing: spec), lease: lease)
        }
        return try SQLiteCatalog(path: spec)
    }
}
