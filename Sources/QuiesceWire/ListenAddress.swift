import GRPCNIOTransportHTTP2

/// A host and port as operators write them: `127.0.0.1:7443`, `[::1]:7443`,
/// `engine.example.com:7443`.
public struct ListenAddress: Sendable, Hashable, CustomStringConvertible {
    public enum Host: Sendable, Hashable {
        case ipv4(String)
        case ipv6(String)
        case name(String)
    }

    public var host: Host
    public var port: Int

    public init(host: Host, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT`, `[IPv6]:PORT`; the error says what was expected.
    public init(parsing text: String) throws {
        func fail(_ why: String) -> WireError {
            .invalidAddress("expected HOST:PORT (e.g. 127.0.0.1:7443 or [::1]:7443), found \"\(text)\": \(why)")
        }
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw fail("missing ']'") }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw fail("missing ':PORT' after ']'") }
            portPart = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw fail("missing ':PORT'") }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            if hostPart.contains(":") { throw fail("IPv6 addresses go in brackets") }
        }
        guard let port = Int(portPart), (0...65535).contains(port) else { throw fail("port must be 0–65535") }
        guard !hostPart.isEmpty else { throw fail("empty host") }
        let host = String(hostPart)
        if host.contains(":") {
            self.host = .ipv6(host)
        } else if host.split(separator: ".").count == 4, host.split(separator: ".").allSatisfy({ UInt8($0) != nil }) {
            self.host = .ipv4(host)
        } else {
            self.host = .name(host)
        }
        self.port = port
    }

    public var hostText: String {
        switch self.host {
        case .ipv4(let h), .ipv6(let h), .name(let h): h
        }
    }

    public var description: String {
        if case .ipv6(let h) = self.host { return "[\(h)]:\(self.port)" }
        return "\(self.hostText):\(self.port)"
    }

    /// The address a listener bound (port 0 resolved); nil for one that is not IP (a unix socket).
    public init?(bound: GRPCNIOTransportCore.SocketAddress) {
        if let v4 = bound.ipv4 {
            self.init(host: .ipv4(v4.host), port: v4.port)
        } else if let v6 = bound.ipv6 {
            self.init(host: .ipv6(v6.host), port: v6.port)
        } else {
            return nil
        }
    }

    var grpcAddress: GRPCNIOTransportCore.SocketAddress {
        switch self.host {
        case .ipv4(let h): .ipv4(host: h, port: self.port)
        case .ipv6(let h): .ipv6(host: h, port: self.port)
        case .name(let h): .ipv4(host: h == "localhost" ? "127.0.0.1" : h, port: self.port)
        }
    }

    var grpcTarget: any ResolvableTarget {
        switch self.host {
        case .ipv4(let h): ResolvableTargets.IPv4.ipv4(address: h, port: self.port)
        case .ipv6(let h): ResolvableTargets.IPv6.ipv6(address: h, port: self.port)
        case .name(let h): ResolvableTargets.DNS.dns(host: h, port: self.port)
        }
    }
}

public enum WireError: Error, CustomStringConvertible, Sendable {
    case invalidAddress(String)

    public var description: String {
        switch self {
        case .invalidAddress(let detail): detail
        }
    }
}
