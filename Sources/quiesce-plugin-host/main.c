/*
 * quiesce-plugin-host — loads one plugin and answers the engine over a pipe.
 *
 *   quiesce-plugin-host PATH      (stdin: requests, stdout: replies)
 *
 * The engine starts one host per plugin, so a plugin that crashes, hangs or
 * corrupts its memory fails only its own plans: the engine kills the host at
 * the call's timeout and starts a new one for the next call. The host is C so
 * that it brings no runtime of its own; a Swift plugin brings the Swift runtime.
 *
 * Frames, both directions: one kind byte, a little-endian u32 length, payload.
 *   host → engine, once at start:
 *     'H'  loaded: u32 abi_version, u32 struct_size, then PluginInfo bytes
 *     'E'  failed: "<code>\n<detail>" — code is one of not-found,
 *          not-a-shared-object, load-failed, no-entry-symbol, entry-null,
 *          abi-mismatch, struct-too-small, missing-function, describe-failed
 *   engine → host:  'P' PlanRequest bytes        host → engine:  'P' Plan bytes,
 *                                                                'R' the plugin's error text
 *   engine → host:  'Q' or end-of-file: exit 0.
 *
 * The plugin's stdout cannot corrupt the stream: the reply pipe is moved off
 * descriptor 1, which then points at stderr (which the engine keeps the tail of).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "quiesce_plugin.h"

#define MAX_FRAME (16u << 20)

static int in_fd = -1, out_fd = -1;

static int write_all(int fd, const void *buffer, size_t length) {
    const uint8_t *p = buffer;
    while (length > 0) {
        ssize_t n = write(fd, p, length);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        length -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *buffer, size_t length) {
    uint8_t *p = buffer;
    while (length > 0) {
        ssize_t n = read(fd, p, length);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) return -1;
        p += n;
        length -= (size_t)n;
    }
    return 0;
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; p[2] = (v >> 16) & 0xff; p[3] = (v >> 24) & 0xff;
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int send_frame(char kind, const void *a, size_t a_length, const void *b, size_t b_length) {
    uint8_t header[5];
    header[0] = (uint8_t)kind;
    put_u32(header + 1, (uint32_t)(a_length + b_length));
    if (write_all(out_fd, header, 5) != 0) return -1;
    if (a_length && write_all(out_fd, a, a_length) != 0) return -1;
    if (b_length && write_all(out_fd, b, b_length) != 0) return -1;
    return 0;
}

static void fail(const char *code, const char *format, ...) __attribute__((format(printf, 2, 3), noreturn));
static void fail(const char *code, const char *format, ...) {
    char text[2048];
    int used = snprintf(text, sizeof text, "%s\n", code);
    va_list args;
    va_start(args, format);
    vsnprintf(text + used, sizeof text - (size_t)used, format, args);
    va_end(args);
    send_frame('E', text, strlen(text), NULL, 0);
    _exit(0);
}

/* Copies a plugin buffer and hands the original back to the plugin. */
static uint8_t *take(const quiesce_plugin *plugin, quiesce_buffer *buffer, size_t *length) {
    *length = buffer->length;
    uint8_t *copy = malloc(buffer->length ? buffer->length : 1);
    if (!copy) { fprintf(stderr, "quiesce-plugin-host: out of memory\n"); _exit(70); }
    if (buffer->length) {
        if (!buffer->data) { free(copy); return NULL; }
        memcpy(copy, buffer->data, buffer->length);
    }
    plugin->free_buffer(buffer);
    return copy;
}

static const char *classify_dlopen(const char *path, const char *error) {
    struct stat info;
    if (stat(path, &info) != 0) return "not-found";
    if (!S_ISREG(info.st_mode)) return "not-a-shared-object";
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        unsigned char magic[4] = {0};
        ssize_t n = read(fd, magic, 4);
        close(fd);
        if (n != 4 || memcmp(magic, "\x7f" "ELF", 4) != 0) return "not-a-shared-object";
    }
    if (error && (strstr(error, "invalid ELF header") || strstr(error, "file too short") || strstr(error, "ELF file")))
        return "not-a-shared-object";
    return "load-failed";
}

int main(int argc, char **argv) {
    if (argc != 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: quiesce-plugin-host PATH\n"
                        "Loads one Quiesce plugin and answers the engine on stdin/stdout (started by the engine).\n");
        return 64;
    }
    const char *path = argv[1];

    /* Keep the protocol off descriptors 0 and 1. */
    in_fd = fcntl(0, F_DUPFD_CLOEXEC, 10);
    out_fd = fcntl(1, F_DUPFD_CLOEXEC, 10);
    if (in_fd < 0 || out_fd < 0) { perror("quiesce-plugin-host: dup"); return 71; }
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd >= 0) { dup2(null_fd, 0); close(null_fd); }
    dup2(2, 1);
    signal(SIGPIPE, SIG_IGN);

    dlerror();
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        const char *error = dlerror();
        fail(classify_dlopen(path, error), "%s", error ? error : "dlopen failed");
    }
    dlerror();
    void *symbol = dlsym(library, QUIESCE_PLUGIN_ENTRY_SYMBOL);
    if (!symbol) {
        const char *error = dlerror();
        fail("no-entry-symbol", "the library does not export %s (%s)", QUIESCE_PLUGIN_ENTRY_SYMBOL, error ? error : "not found");
    }
    quiesce_plugin_entry_fn entry;
    memcpy(&entry, &symbol, sizeof entry);
    const quiesce_plugin *plugin = entry();
    if (!plugin) fail("entry-null", "%s() returned NULL", QUIESCE_PLUGIN_ENTRY_SYMBOL);
    /* Read the two leading fields first: they are the same in every ABI version. */
    uint32_t abi = plugin->abi_version, size = plugin->struct_size;
    if (QUIESCE_PLUGIN_ABI_MAJOR_OF(abi) != QUIESCE_PLUGIN_ABI_MAJOR)
        fail("abi-mismatch", "the plugin was built for plugin ABI %u.%u; this engine speaks ABI %u.%u (majors must match)",
             QUIESCE_PLUGIN_ABI_MAJOR_OF(abi), QUIESCE_PLUGIN_ABI_MINOR_OF(abi), QUIESCE_PLUGIN_ABI_MAJOR, QUIESCE_PLUGIN_ABI_MINOR);
    if (size < QUIESCE_PLUGIN_MIN_STRUCT_SIZE)
        fail("struct-too-small", "struct_size is %u bytes; ABI %u.%u needs at least %u (abi_version, struct_size, describe, plan, free_buffer)",
             size, QUIESCE_PLUGIN_ABI_MAJOR, QUIESCE_PLUGIN_ABI_MINOR, QUIESCE_PLUGIN_MIN_STRUCT_SIZE);
    if (!plugin->describe || !plugin->plan || !plugin->free_buffer)
        fail("missing-function", "describe, plan and free_buffer must all be set (describe %s, plan %s, free_buffer %s)",
             plugin->describe ? "set" : "NULL", plugin->plan ? "set" : "NULL", plugin->free_buffer ? "set" : "NULL");

    quiesce_buffer buffer = {0};
    int32_t code = plugin->describe(&buffer);
    size_t length;
    uint8_t *info = take(plugin, &buffer, &length);
    if (!info) fail("describe-failed", "describe returned a NULL buffer with a non-zero length");
    if (code != QUIESCE_PLUGIN_OK)
        fail("describe-failed", "describe returned %d: %.*s", code, (int)(length > 1000 ? 1000 : length), (const char *)info);
    uint8_t header[8];
    put_u32(header, abi);
    put_u32(header + 4, size);
    if (send_frame('H', header, 8, info, length) != 0) return 0;
    free(info);

    for (;;) {
        uint8_t frame_header[5];
        if (read_all(in_fd, frame_header, 5) != 0) return 0;
        uint32_t frame_length = get_u32(frame_header + 1);
        if (frame_header[0] == 'Q') return 0;
        if (frame_header[0] != 'P' || frame_length > MAX_FRAME) {
            fprintf(stderr, "quiesce-plugin-host: unexpected frame %c of %u bytes\n", frame_header[0], frame_length);
            return 65;
        }
        uint8_t *request = malloc(frame_length ? frame_length : 1);
        if (!request || read_all(in_fd, request, frame_length) != 0) return 0;
        quiesce_buffer reply = {0};
        code = plugin->plan(request, frame_length, &reply);
        free(request);
        uint8_t *bytes = take(plugin, &reply, &length);
        if (!bytes) {
            const char *text = "plan returned a NULL buffer with a non-zero length";
            if (send_frame('R', text, strlen(text), NULL, 0) != 0) return 0;
            continue;
        }
        if (send_frame(code == QUIESCE_PLUGIN_OK ? 'P' : 'R', bytes, length, NULL, 0) != 0) return 0;
        free(bytes);
    }
}
