import Foundation
import QuiesceCore
import QuiescePluginProto
import QuiescePlugins
import QuiesceTestSupport
import Testing

/// One C source, many broken plugins (-D picks the fault). Each valid one
/// describes itself with a name given by -DNAME.
private let brokenSource = #"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "quiesce_plugin.h"

#ifdef NO_ENTRY
int quiesce_plugin_entry_misspelled(void) { return 0; }
#else
static int32_t give(quiesce_buffer *out, const void *bytes, size_t length) {
    out->data = malloc(length ? length : 1);
    memcpy(out->data, bytes, length);
    out->length = length;
    return QUIESCE_PLUGIN_OK;
}

static void free_buffer(quiesce_buffer *buffer) { free(buffer->data); buffer->data = NULL; buffer->length = 0; }

/* PluginInfo{name=NAME, version="1", levels=[crash]} */
static int32_t describe(quiesce_buffer *out) {
#ifdef GARBAGE_INFO
    static const unsigned char junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02};
    return give(out, junk, sizeof junk);
#else
    unsigned char info[128];
    size_t n = 0, name = strlen(NAME);
    info[n++] = 0x0a; info[n++] = (unsigned char)name; memcpy(info + n, NAME, name); n += name;
    info[n++] = 0x12; info[n++] = 1; info[n++] = '1';
    info[n++] = 0x2a; info[n++] = 1; info[n++] = 0;
    return give(out, info, n);
#endif
}

static int32_t plan(const uint8_t *request, size_t length, quiesce_buffer *out) {
    (void)request; (void)length;
#if defined(CRASH_PLAN)
    raise(SIGSEGV);
#elif defined(HANG_PLAN)
    for (;;) pause();
#elif defined(REFUSE_PLAN)
    const char *text = "no database on this instance";
    give(out, text, strlen(text));
    return QUIESCE_PLUGIN_ERROR;
#elif defined(GARBAGE_PLAN)
    static const unsigned char junk[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    return give(out, junk, sizeof junk);
#elif defined(INVALID_PLAN)
    /* Plan{expected=filesystem, quiesce=[Step{id="f", action=freeze{"/x"}}]}: no timeout, no undo, no on_failure, no thaw. */
    static const unsigned char invalid[] = {0x10, 0x01, 0x2a, 0x0b, 0x0a, 0x01, 'f', 0x1a, 0x06, 0x12, 0x04, 0x0a, 0x02, '/', 'x'};
    return give(out, invalid, sizeof invalid);
#elif defined(PRINTS)
    /* Breaks the no-I/O rule; the host keeps the protocol off descriptor 1, so it only reaches stderr. */
    printf("debug output from a plugin\n");
    fflush(stdout);
    return give(out, "", 0); /* an empty Plan: crash-consistent, no steps */
#endif
    return give(out, "", 0);
}

static const quiesce_plugin table = {
#ifdef WRONG_ABI
    .abi_version = (2u << 16) | 3u,
#else
    .abi_version = QUIESCE_PLUGIN_ABI_VERSION,
#endif
#ifdef SMALL_STRUCT
    .struct_size = 8,
#else
    .struct_size = sizeof(quiesce_plugin),
#endif
    .describe = describe,
#ifdef NULL_PLAN
    .plan = NULL,
#else
    .plan = plan,
#endif
    .free_buffer = free_buffer,
};

const quiesce_plugin *quiesce_plugin_entry(void) { return &table; }
#endif
"""#

@Suite("Broken plugins: clear errors, and the engine lives on", .serialized)
struct BrokenPluginTests {
    static let variants: [(file: String, defines: [String])] = [
        ("no-entry", ["NO_ENTRY"]),
        ("wrong-abi", ["WRONG_ABI", "NAME=\"wrong-abi\""]),
        ("small-struct", ["SMALL_STRUCT", "NAME=\"small-struct\""]),
        ("null-plan", ["NULL_PLAN", "NAME=\"null-plan\""]),
        ("garbage-info", ["GARBAGE_INFO", "NAME=\"garbage-info\""]),
        ("segfaults", ["CRASH_PLAN", "NAME=\"segfaults\""]),
        ("hangs", ["HANG_PLAN", "NAME=\"hangs\""]),
        ("refuses", ["REFUSE_PLAN", "NAME=\"refuses\""]),
        ("garbage-plan", ["GARBAGE_PLAN", "NAME=\"garbage-plan\""]),
        ("invalid-plan", ["INVALID_PLAN", "NAME=\"invalid-plan\""]),
        ("prints", ["PRINTS", "NAME=\"prints\""]),
        ("crash-again", ["NAME=\"crash\""]),  // a second plugin named crash
        ("world-writable", ["NAME=\"world-writable\""]),  // valid, but chmod 0666 below
    ]

    @Test("not ELF, no symbol, wrong ABI, small struct, NULL function, undecodable info, duplicate name: each a clear load error")
    func loadErrors() async throws {
        let directory = try await makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let registry = await PluginFixtures.registry([directory] + [directory + "/missing-dir"])
        defer { Task { await registry.shutdown() } }
        let failures = Dictionary(registry.failures.map { (URL(fileURLWithPath: $0.path).lastPathComponent, $0) }, uniquingKeysWith: { a, _ in a })

        #expect(failures["not-elf.so"]?.code == .notASharedObject, "\(registry.failures)")
        #expect(failures["not-elf.so"]?.description.contains("/not-elf.so") == true)
        #expect(failures["no-entry.so"]?.code == .noEntrySymbol)
        #expect(failures["no-entry.so"]?.detail.contains("does not export quiesce_plugin_entry") == true)
        let abi = try #require(failures["wrong-abi.so"])
        #expect(abi.code == .abiMismatch && abi.detail.contains("built for plugin ABI 2.3") && abi.detail.contains("speaks ABI 1.0"), "\(abi)")
        #expect(failures["small-struct.so"]?.code == .structTooSmall)
        #expect(failures["small-struct.so"]?.detail.contains("struct_size is 8 bytes") == true)
        #expect(failures["null-plan.so"]?.code == .missingFunction)
        #expect(failures["garbage-info.so"]?.code == .undecodableInfo)
        #expect(failures["garbage-info.so"]?.detail.contains("not a quiesce.plugin.v1.PluginInfo") == true)
        let duplicate = try #require(failures["crash-again.so"])
        #expect(duplicate.code == .duplicateName && duplicate.detail.contains("libquiesce-plugin-crash.so"), "\(duplicate)")
        #expect(failures["missing-dir"]?.code == .notFound)
        let writable = try #require(failures["world-writable.so"])
        #expect(writable.code == .unsafePermissions && writable.detail.contains("mode 0666"), "\(writable)")

        // The others loaded: the built-ins first (they come first on the path), and the
        // plugins that only fail when they plan.
        #expect(registry.plugin(named: "crash")?.path.hasSuffix("libquiesce-plugin-crash.so") == true)
        for name in ["linux-freeze", "segfaults", "hangs", "refuses", "garbage-plan", "invalid-plan", "prints"] {
            #expect(registry.plugin(named: name) != nil, "\(name) should have loaded")
        }
        // A failed load leaves no host process behind.
        for file in ["not-elf.so", "no-entry.so", "wrong-abi.so", "garbage-info.so", "crash-again.so"] {
            #expect(PluginFixtures.hostProcesses(for: directory + "/" + file).isEmpty, "a host for \(file) is still running")
        }
    }

    @Test("a plugin that segfaults, hangs, refuses, answers garbage or an invalid plan fails only its own plans")
    func planErrors() async throws {
        let directory = try await makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let registry = await PluginFixtures.registry([directory], timeout: .seconds(5))
        defer { Task { await registry.shutdown() } }
        let linux = try #require(registry.plugin(named: "linux-freeze"))
        let facts = PluginFixtures.facts()
        func plan(_ name: String, timeout: Duration? = nil) async throws -> Plan {
            let plugin = try #require(registry.plugin(named: name), "\(registry.failures)")
            return try await plugin.plan(facts: facts, policy: try PluginFixtures.policy(plugin), timeout: timeout)
        }
        func failure(_ name: String, timeout: Duration? = nil) async -> PluginError? {
            do {
                _ = try await plan(name, timeout: timeout)
                return nil
            } catch let error as PluginError {
                return error
            } catch {
                Issue.record("\(name): \(error)")
                return nil
            }
        }

        let segv = await failure("segfaults")
        #expect(segv?.code == .crashed && segv?.detail.contains("SIGSEGV") == true && segv?.plugin == "segfaults", "\(String(describing: segv))")
        #expect(try await plan("linux-freeze").expected == .application, "another plugin still plans")
        // The next call gets a new host, and fails the same way.
        #expect(await failure("segfaults")?.code == .crashed)

        let started = ContinuousClock.now
        let hang = await failure("hangs", timeout: .milliseconds(400))
        let waited = ContinuousClock.now - started
        #expect(hang?.code == .timedOut && hang?.detail.contains("within 400 ms") == true, "\(String(describing: hang))")
        #expect(waited < .seconds(3), "the hung call took \(waited)")
        #expect(PluginFixtures.hostProcesses(for: directory + "/hangs.so").isEmpty, "the hung host was not killed")

        let refused = await failure("refuses")
        #expect(refused?.code == .refused && refused?.detail == "no database on this instance")
        #expect(await failure("garbage-plan")?.code == .undecodablePlan)
        let invalid = try #require(await failure("invalid-plan"))
        #expect(invalid.code == .invalidPlan)
        for problem in ["step f has no timeout", "step f has no undo", "step f does not say what its failure means"] {
            #expect(invalid.detail.contains(problem), "\(invalid.detail)")
        }
        // Output on stdout does not corrupt the stream.
        #expect(try await plan("prints").expected == .crash)
        #expect(try await linux.plan(facts: facts, policy: try PluginFixtures.policy(linux)).expected == .application)
    }

    @Test("the host refuses to run without a plugin path, and a missing host is an error for every plugin, not a crash")
    func missingHost() async throws {
        let bare = Process()
        bare.executableURL = URL(fileURLWithPath: PluginFixtures.buildDirectory + "/quiesce-plugin-host")
        bare.standardError = FileHandle.nullDevice
        try bare.run()
        _ = try await blocking { bare.waitUntilExit() }
        #expect(bare.terminationStatus == 64, "usage error")

        let registry = await PluginRegistry.load(searchPath: PluginFixtures.searchPath(), hostExecutable: "/nonexistent/quiesce-plugin-host")
        #expect(registry.plugins.isEmpty)
        #expect(!registry.failures.isEmpty && registry.failures.allSatisfy { $0.code == .hostFailed && $0.detail.contains("is missing") })
    }

    private func makeDirectory() async throws -> String {
        let directory = NSTemporaryDirectory() + "quiesce-broken-plugins-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try "this is not a shared object\n".write(toFile: directory + "/not-elf.so", atomically: true, encoding: .utf8)
        for variant in Self.variants {
            _ = try await PluginFixtures.compile(brokenSource, name: variant.file, in: directory, defines: variant.defines)
        }
        chmod(directory + "/world-writable.so", 0o666)
        return directory
    }
}
