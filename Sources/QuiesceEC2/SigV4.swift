import Crypto
import Foundation

/// AWS Signature Version 4 (the header form), written from AWS's description of
/// the algorithm and checked against its published test suite
/// (Tests/QuiesceProvidersTests/SigV4Tests.swift): canonical request → string
/// to sign → a key derived from the secret, the date, the region and the
/// service → HMAC-SHA256.
public enum SigV4 {
    public struct Signed: Sendable, Equatable {
        /// The `Authorization` header's value.
        public var authorization: String
        public var signedHeaders: String
        public var canonicalRequest: String
        public var stringToSign: String
    }

    /// "20150830T123600Z", UTC.
    public static func amzDate(_ date: Date) -> String {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
        return String(format: "%04d%02d%02dT%02d%02d%02dZ", c.year!, c.month!, c.day!, c.hour!, c.minute!, c.second!)
    }

    /// Signs a request whose headers already hold `host` and `x-amz-date` (and
    /// `x-amz-security-token` with temporary credentials): every header given is signed.
    /// - Parameters:
    ///   - path: the path as sent, not yet encoded ("/" for EC2's Query API).
    ///   - query: the query parameters, not yet encoded, in any order.
    ///   - payloadSHA256: hex SHA-256 of the body.
    public static func sign(method: String, path: String, query: [(String, String)] = [], headers: [(String, String)], payloadSHA256: String,
                            accessKeyID: String, secretAccessKey: String, region: String, service: String, amzDate: String) -> Signed {
        let day = String(amzDate.prefix(8))
        // Header names lower-cased, values trimmed and inner runs of spaces made one; same names joined by commas.
        var merged: [String: [String]] = [:]
        for (name, value) in headers {
            merged[name.lowercased(), default: []].append(value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " "))
        }
        let names = merged.keys.sorted()
        let canonicalHeaders = names.map { "\($0):\(merged[$0]!.joined(separator: ","))\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let encodedQuery: [(String, String)] = query.map { (encode($0.0), encode($0.1)) }
        let sortedQuery = encodedQuery.sorted { (a: (String, String), b: (String, String)) -> Bool in a.0 == b.0 ? a.1 < b.1 : a.0 < b.0 }
        let canonicalQuery = sortedQuery.map { "\($0.0)=\($0.1)" }.joined(separator: "&")
        let segments: [String] = path.split(separator: "/", omittingEmptySubsequences: false).map { encode(String($0)) }
        let canonicalPath = path.isEmpty ? "/" : segments.joined(separator: "/")
        let canonicalRequest = [method, canonicalPath, canonicalQuery, canonicalHeaders, signedHeaders, payloadSHA256].joined(separator: "\n")
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = ["AWS4-HMAC-SHA256", amzDate, scope, hexSHA256(Data(canonicalRequest.utf8))].joined(separator: "\n")
        var key = SymmetricKey(data: Data(("AWS4" + secretAccessKey).utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Data(HMAC<SHA256>.authenticationCode(for: Data(part.utf8), using: key)))
        }
        let signature = hex(Data(HMAC<SHA256>.authenticationCode(for: Data(stringToSign.utf8), using: key)))
        return Signed(
            authorization: "AWS4-HMAC-SHA256 Credential=\(accessKeyID)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)",
            signedHeaders: signedHeaders, canonicalRequest: canonicalRequest, stringToSign: stringToSign)
    }

    public static func hexSHA256(_ data: Data) -> String { hex(Data(SHA256.hash(data: data))) }

    static func hex(_ data: Data) -> String { data.map { String(format: "%02x", $0) }.joined() }

    /// RFC 3986 percent-encoding: everything but A–Z a–z 0–9 - _ . ~, as SigV4 and the Query API want.
    public static func encode(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }
}
