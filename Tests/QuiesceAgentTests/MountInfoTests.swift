import Foundation
import QuiesceAgent
import Testing

@Suite("mountinfo parsing")
struct MountInfoTests {
    @Test("fields, optional tags and octal escapes")
    func parse() throws {
        let text = """
            22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
            36 22 7:3 / /mnt/with\\040space rw,noatime shared:5 master:2 - xfs /dev/loop3 rw,attr2
            40 22 0:21 / /run ro,nosuid - tmpfs tmpfs ro,size=10m
            """
        let entries = try MountInfoEntry.parse(text)
        #expect(entries.count == 3)
        #expect(entries[0].mountPoint == "/" && entries[0].fsType == "ext4" && entries[0].source == "/dev/vda")
        #expect(entries[1].mountPoint == "/mnt/with space")
        #expect(entries[1].deviceNumber == "7:3")
        #expect(entries[1].fsType == "xfs")
        #expect(!entries[1].readOnly)
        #expect(entries[2].readOnly)
    }

    @Test("a malformed line is an error naming the line and the expected shape")
    func malformed() {
        do {
            _ = try MountInfoEntry.parse("22 1 254:0 / / rw - ext4 /dev/vda rw\nthis is not a mount line\n")
            Issue.record("parsed a malformed line")
        } catch {
            #expect("\(error)".contains("line 2"))
            #expect("\(error)".contains("expected 'ID PARENT"))
        }
    }
}
