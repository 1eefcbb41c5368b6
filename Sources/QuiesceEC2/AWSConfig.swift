import Foundation

/// An access key, found the way the AWS CLI and SDKs find one. Its description
/// never holds the secret or the session token: only the key id's last four
/// characters and where it came from.
public struct AWSCredentials: Sendable, Equatable, CustomStringConvertible {
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?
    /// "environment", "profile prod in /root/.aws/credentials", …
    public var source: String

    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil, source: String) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
        self.source = source
    }

    public var description: String { "access key …\(self.accessKeyID.suffix(4)) from \(self.source)" }
}

public struct AWSConfigError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Where credentials, the region and the endpoint come from, in the order the AWS
/// CLI uses: a profile named in the fleet file (or `AWS_PROFILE`) from the shared
/// credentials and config files; without a named profile, `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` first, then the `default` profile.
/// The files are `AWS_SHARED_CREDENTIALS_FILE` (~/.aws/credentials) and
/// `AWS_CONFIG_FILE` (~/.aws/config, `[profile NAME]` sections).
public struct AWSConfigResolver: Sendable {
    public var environment: [String: String]

    public init(environment: [String: String] = ProcessInfo.processInfo.environment) { self.environment = environment }

    var home: String { self.environment["HOME"] ?? NSHomeDirectory() }
    var credentialsFile: String { self.environment["AWS_SHARED_CREDENTIALS_FILE"] ?? self.home + "/.aws/credentials" }
    var configFile: String { self.environment["AWS_CONFIG_FILE"] ?? self.home + "/.aws/config" }

    /// - Parameter profile: the fleet file's `profile`, which wins over the environment.
    public func credentials(profile: String?) throws -> AWSCredentials {
        if profile == nil, self.environment["AWS_PROFILE"] == nil,
           let id = self.environment["AWS_ACCESS_KEY_ID"], !id.isEmpty {
            guard let secret = self.environment["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty else {
                throw AWSConfigError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: expected both (and AWS_SESSION_TOKEN for temporary keys)")
            }
            return AWSCredentials(accessKeyID: id, secretAccessKey: secret, sessionToken: self.environment["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 },
                                  source: "environment")
        }
        let name = profile ?? self.environment["AWS_PROFILE"] ?? "default"
        for (file, section) in [(self.credentialsFile, name), (self.configFile, name == "default" ? "default" : "profile \(name)")] {
            guard let values = try Self.section(section, of: file) else { continue }
            guard let id = values["aws_access_key_id"], let secret = values["aws_secret_access_key"] else { continue }
            return AWSCredentials(accessKeyID: id, secretAccessKey: secret, sessionToken: values["aws_session_token"], source: "profile \(name) in \(file)")
        }
        throw AWSConfigError("no AWS credentials for profile \(name): expected aws_access_key_id and aws_secret_access_key in [\(name)] of \(self.credentialsFile) "
            + "or [\(name == "default" ? "default" : "profile \(name)")] of \(self.configFile)"
            + (profile == nil ? ", or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment" : ""))
    }

    /// The fleet file's region, else `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`.
    public func region(given: String?, profile: String?) throws -> String {
        if let given, !given.isEmpty { return given }
        for key in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            if let value = self.environment[key], !value.isEmpty { return value }
        }
        let name = profile ?? self.environment["AWS_PROFILE"] ?? "default"
        if let region = try Self.section(name == "default" ? "default" : "profile \(name)", of: self.configFile)?["region"] { return region }
        throw AWSConfigError("no region: expected `region` in the provider's block, AWS_REGION or AWS_DEFAULT_REGION, or region in profile \(name) of \(self.configFile)")
    }

    /// The fleet file's `endpoint_url`, else `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`, else EC2's public endpoint for the region.
    public func endpoint(given: String?, region: String) -> String {
        if let given, !given.isEmpty { return given }
        for key in ["AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL"] {
            if let value = self.environment[key], !value.isEmpty { return value }
        }
        return "https://ec2.\(region).amazonaws.com"
    }

    /// One `[section]` of an INI file as the AWS tools write it; nil when the file or the section is missing.
    static func section(_ name: String, of file: String) throws -> [String: String]? {
        guard let data = FileManager.default.contents(atPath: file) else { return nil }
        var current: String?
        var values: [String: String]?
        for raw in String(decoding: data, as: UTF8.self).split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                if current == name && values == nil { values = [:] }
                continue
            }
            guard current == name, let equals = line.firstIndex(of: "=") else { continue }
            let key = line[..<equals].trimmingCharacters(in: .whitespaces).lowercased()
            values?[key] = line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces)
        }
        return values
    }
}
