import Foundation
import QuiesceAgent
import QuiesceTestSupport
import Testing

@Suite("Freeze order")
struct FreezeOrderTests {
    typealias Mount = FreezeOrder.Mount

    @Test("independent filesystems are frozen together, in request order; \"/\" last on its own")
    func independent() {
        let plan = FreezeOrder.plan([
            Mount(path: "/", device: 1, backedBy: []),
            Mount(path: "/data", device: 2, backedBy: []),
            Mount(path: "/logs", device: 3, backedBy: [99]),  // a loop image on a filesystem outside this freeze
        ])
        #expect(plan.order == [1, 2, 0])
        #expect(plan.concurrent == 2)
    }

    @Test("a filesystem stacked on another is frozen before it, one by one, whatever the request order")
    func stacked() {
        // /srv/vm is a loop mount of an image file on /srv; /var is independent.
        let plan = FreezeOrder.plan([
            Mount(path: "/srv", device: 10, backedBy: []),
            Mount(path: "/var", device: 11, backedBy: []),
            Mount(path: "/srv/vm", device: 12, backedBy: [10]),
            Mount(path: "/", device: 1, backedBy: []),
        ])
        #expect(plan.order == [1, 2, 0, 3])
        #expect(plan.concurrent == 1)
        // Three levels, requested bottom-up.
        let deep = FreezeOrder.plan([
            Mount(path: "/a", device: 20, backedBy: []),
            Mount(path: "/a/b", device: 21, backedBy: [20]),
            Mount(path: "/a/b/c", device: 22, backedBy: [21]),
        ])
        #expect(deep.order == [2, 1, 0])
        #expect(deep.concurrent == 1)
    }

    @Test("a mount whose device sysfs cannot describe is never frozen concurrently")
    func unknown() {
        let plan = FreezeOrder.plan([
            Mount(path: "/x", device: 30, backedBy: nil),
            Mount(path: "/y", device: 31, backedBy: []),
            Mount(path: "/z", device: 32, backedBy: []),
        ])
        #expect(plan.order == [1, 2, 0])
        #expect(plan.concurrent == 2)
        #expect(FreezeOrder.plan([Mount(path: "/x", device: 30, backedBy: nil)]) == (order: [0], concurrent: 1))
    }

    @Test("sysfs: a loop device is backed by the filesystem its image lives on", .enabled(if: getuid() == 0, "needs root for loop devices"))
    func sysfsLoop() async throws {
        try await withLoopDevices { loops in
            let (point, _) = try await blocking { try loops.mount("lower", fsType: "ext4", sizeMiB: 32) }
            var mounted = stat()
            #expect(stat(point, &mounted) == 0)
            var directory = stat()
            #expect(stat(loops.directory, &directory) == 0)
            // The image is in the scratch directory: that filesystem backs the loop mount.
            #expect(FreezeOrder.backingFilesystems(ofDevice: UInt64(mounted.st_dev)) == [UInt64(directory.st_dev)])
            #expect(FreezeOrder.backingFilesystems(ofDevice: UInt64(mounted.st_dev), sysfs: loops.directory + "/no-sysfs") == nil)
        }
    }
}
