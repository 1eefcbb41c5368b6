import Foundation
import QuiesceCore
import QuiesceEC2
import Testing

/// AWS's published Signature Version 4 test suite (aws-c-auth's
/// tests/aws-signing-test-suite/v4, the same vectors botocore and every SDK
/// check against): credentials AKIDEXAMPLE, 2015-08-30T12:36:00Z, us-east-1,
/// service "service". Each expected signature is AWS's, not one we computed.
@Suite("SigV4 against AWS's test suite")
struct SigV4Tests {
    static let key = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    static let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    static let base = [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")]

    func sign(_ method: String, _ path: String = "/", query: [(String, String)] = [], headers: [(String, String)] = base, payload: String = empty) -> SigV4.Signed {
        SigV4.sign(method: method, path: path, query: query, headers: headers, payloadSHA256: payload, accessKeyID: Self.key.0,
                   secretAccessKey: Self.key.1, region: "us-east-1", service: "service", amzDate: "20150830T123600Z")
    }

    @Test("get-vanilla: the whole Authorization header, and its canonical request")
    func getVanilla() {
        let signed = self.sign("GET")
        #expect(signed.authorization == "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            + "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")
        #expect(signed.canonicalRequest == "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" + Self.empty)
        #expect(signed.stringToSign.hasPrefix("AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"))
    }

    @Test("get-vanilla-query-order-key-case: the query is sorted before signing")
    func queryOrder() {
        #expect(self.sign("GET", query: [("Param2", "value2"), ("Param1", "value1")]).authorization
            .hasSuffix("Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"))
    }

    @Test("post-vanilla, get-utf8 (the path percent-encoded), get-header-value-trim (values trimmed, inner spaces made one)")
    func moreVectors() {
        #expect(self.sign("POST").authorization.hasSuffix("Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"))
        #expect(self.sign("GET", "/ሴ").authorization.hasSuffix("Signature=8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"))
        let trimmed = self.sign("GET", headers: Self.base + [("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")])
        #expect(trimmed.signedHeaders == "host;my-header1;my-header2;x-amz-date")
        #expect(trimmed.authorization.hasSuffix("Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"))
    }

    @Test("get-vanilla-with-session-token: the token is a signed header")
    func sessionToken() {
        let signed = self.sign("GET", headers: Self.base + [("X-Amz-Security-Token", "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267")])
        #expect(signed.authorization.hasSuffix("SignedHeaders=host;x-amz-date;x-amz-security-token, "
            + "Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"))
    }

    @Test("post-x-www-form-urlencoded: a signed body with its hash in x-amz-content-sha256")
    func formBody() {
        let hash = SigV4.hexSHA256(Data("Param1=value1".utf8))
        #expect(hash == "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e")
        let signed = self.sign("POST", headers: [("Content-Type", "application/x-www-form-urlencoded"), ("Host", "example.amazonaws.com"),
                                                 ("Content-Length", "13"), ("x-amz-content-sha256", hash), ("X-Amz-Date", "20150830T123600Z")],
                               payload: hash)
        #expect(signed.authorization.hasSuffix("SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, "
            + "Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"))
    }

    @Test("one changed byte anywhere changes the signature")
    func tamper() {
        let good = self.sign("GET").authorization
        #expect(self.sign("GET", "/other").authorization != good)
        #expect(SigV4.sign(method: "GET", path: "/", headers: Self.base, payloadSHA256: Self.empty, accessKeyID: Self.key.0,
                           secretAccessKey: Self.key.1 + "x", region: "us-east-1", service: "service", amzDate: "20150830T123600Z").authorization != good)
        #expect(SigV4.amzDate(Date(timeIntervalSince1970: 1_440_938_160)) == "20150830T123600Z")
        #expect(SigV4.encode("a b/~*é") == "a%20b%2F~%2A%C3%A9")
    }
}

@Suite("AWS credentials, region and endpoint")
final class AWSConfigTests {
    /// One scratch directory per test, removed when the test ends.
    let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-aws-\(UUID().uuidString.prefix(8))").path
    deinit { try? FileManager.default.removeItem(atPath: self.scratch) }

    func files(_ credentials: String, _ config: String = "") throws -> [String: String] {
        let dir = self.scratch + "/" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try credentials.write(toFile: dir + "/credentials", atomically: true, encoding: .utf8)
        try config.write(toFile: dir + "/config", atomically: true, encoding: .utf8)
        return ["AWS_SHARED_CREDENTIALS_FILE": dir + "/credentials", "AWS_CONFIG_FILE": dir + "/config", "HOME": dir]
    }

    @Test("environment first, a named profile over it, config-file profiles, region order, endpoint order")
    func order() throws {
        var env = try self.files("""
            [default]
            aws_access_key_id = AKIADEFAULT0000
            aws_secret_access_key = defaultsecret
            # a comment
            [prod]
            aws_access_key_id=AKIAPROD00001111
            aws_secret_access_key=prodsecret
            aws_session_token=prodtoken
            """, """
            [default]
            region = eu-west-1
            [profile staging]
            aws_access_key_id = AKIASTAGING2222
            aws_secret_access_key = stagingsecret
            region = ap-south-1
            """)
        #expect(try AWSConfigResolver(environment: env).credentials(profile: nil).accessKeyID == "AKIADEFAULT0000")
        env["AWS_ACCESS_KEY_ID"] = "AKIAENV33333333"
        env["AWS_SECRET_ACCESS_KEY"] = "envsecret"
        let fromEnv = try AWSConfigResolver(environment: env).credentials(profile: nil)
        #expect(fromEnv.accessKeyID == "AKIAENV33333333" && fromEnv.source == "environment")
        let prod = try AWSConfigResolver(environment: env).credentials(profile: "prod")
        #expect(prod.secretAccessKey == "prodsecret" && prod.sessionToken == "prodtoken" && prod.source.hasPrefix("profile prod in"))
        #expect(try AWSConfigResolver(environment: env).credentials(profile: "staging").accessKeyID == "AKIASTAGING2222")
        // Secrets never in a description (logs, errors, JSON all print descriptions).
        #expect(!"\(prod)".contains("prodsecret") && !"\(prod)".contains("prodtoken") && "\(prod)".contains("…1111"))
        #expect(try AWSConfigResolver(environment: env).region(given: nil, profile: "staging") == "ap-south-1")
        #expect(try AWSConfigResolver(environment: env).region(given: nil, profile: nil) == "eu-west-1")
        env["AWS_REGION"] = "us-west-2"
        #expect(try AWSConfigResolver(environment: env).region(given: nil, profile: nil) == "us-west-2")
        #expect(try AWSConfigResolver(environment: env).region(given: "us-east-1", profile: nil) == "us-east-1")
        #expect(AWSConfigResolver(environment: env).endpoint(given: nil, region: "us-east-1") == "https://ec2.us-east-1.amazonaws.com")
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:5000"
        #expect(AWSConfigResolver(environment: env).endpoint(given: nil, region: "us-east-1") == "http://127.0.0.1:5000")
        #expect(AWSConfigResolver(environment: env).endpoint(given: "http://127.0.0.1:1", region: "us-east-1") == "http://127.0.0.1:1")
    }

    @Test("what is missing is said: an unknown profile, a key id without its secret, no region")
    func missing() throws {
        var env = try self.files("[default]\naws_access_key_id = A\n")
        let unknown = #expect(throws: AWSConfigError.self) { try AWSConfigResolver(environment: env).credentials(profile: "nope") }
        #expect("\(unknown!)".contains("no AWS credentials for profile nope") && "\(unknown!)".contains("[profile nope]"))
        let half = #expect(throws: AWSConfigError.self) { try AWSConfigResolver(environment: env).credentials(profile: nil) }
        #expect("\(half!)".contains("expected aws_access_key_id and aws_secret_access_key in [default]"))
        env["AWS_ACCESS_KEY_ID"] = "AKIA"
        let noSecret = #expect(throws: AWSConfigError.self) { try AWSConfigResolver(environment: env).credentials(profile: nil) }
        #expect("\(noSecret!)".contains("AWS_SECRET_ACCESS_KEY is not"))
        let region = #expect(throws: AWSConfigError.self) { try AWSConfigResolver(environment: env).region(given: nil, profile: nil) }
        #expect("\(region!)".contains("no region"))
    }
}

@Suite("EC2 replies")
struct EC2ReplyTests {
    @Test("an error reply is typed: throttles, denials, not found, 5xx; a lost reply is ambiguous")
    func errors() throws {
        let xml = """
            <?xml version="1.0" encoding="UTF-8"?>
            <Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>r-1</RequestID></Response>
            """
        let tree = try #require(XMLTree.parse(Data(xml.utf8)))
        #expect(tree.child("Errors")?.child("Error")?.value("Code") == "RequestLimitExceeded" && tree.value("RequestID") == "r-1")
        let throttle = EC2Error(action: "CreateSnapshots", kind: .api(code: "RequestLimitExceeded", message: "slow", status: 503), retryAfter: .seconds(2))
        guard case .throttled(let after, _) = throttle.providerError else { Issue.record("not a throttle: \(throttle.providerError)"); return }
        #expect(after == .seconds(2))
        let perVolume = EC2Error(action: "CreateSnapshot", kind: .api(code: "SnapshotCreationPerVolumeRateExceeded", message: "", status: 400))
        #expect(perVolume.isThrottle && perVolume.providerError.isRetryable)
        let denied = EC2Error(action: "CreateSnapshots", kind: .api(code: "UnauthorizedOperation", message: "no", status: 403))
        #expect(denied.isDenied && !denied.providerError.isRetryable && "\(denied.providerError)".contains("IAM policy"))
        let missing = EC2Error(action: "DescribeSnapshots", kind: .api(code: "InvalidSnapshot.NotFound", message: "", status: 400))
        #expect(missing.providerError == ProviderError.notFound("EC2 DescribeSnapshots: InvalidSnapshot.NotFound:  [HTTP 400]"))
        let serverError = EC2Error(action: "CreateSnapshot", kind: .api(code: "InternalError", message: "", status: 500))
        #expect(serverError.isTransient && serverError.isAmbiguous)
        let reset = EC2Error(action: "CreateSnapshot", kind: .network("connection reset by peer", sent: true))
        #expect(reset.isAmbiguous && reset.providerError.isRetryable)
        #expect(!EC2Error(action: "X", kind: .network("connection refused", sent: false)).isAmbiguous)
    }

    @Test("a DescribeSnapshots reply: namespaced elements, sets of items, tags")
    func snapshots() throws {
        let xml = """
            <DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
              <requestId>abc</requestId>
              <snapshotSet>
                <item><snapshotId>snap-1</snapshotId><volumeId>vol-1</volumeId><status>completed</status><progress>100%</progress>
                  <startTime>2026-12-06T10:00:00.000Z</startTime><volumeSize>8</volumeSize>
                  <tagSet><item><key>quiesce:group</key><value>eg-1</value></item><item><key>AppConsistent</key><value>true</value></item></tagSet></item>
                <item><snapshotId>snap-2</snapshotId><volumeId>vol-2</volumeId><status>pending</status></item>
              </snapshotSet>
            </DescribeSnapshotsResponse>
            """
        let tree = try #require(XMLTree.parse(Data(xml.utf8)))
        let items = tree.items("snapshotSet")
        #expect(items.count == 2 && items[0].value("snapshotId") == "snap-1" && items[1].value("status") == "pending")
        #expect(items[0].tags == ["quiesce:group": "eg-1", "AppConsistent": "true"])
        #expect(XMLTree.parse(Data("not xml <".utf8)) == nil)
    }
}
