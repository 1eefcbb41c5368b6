/*
 * quiesce_plugin.h — the Quiesce plugin ABI, version 1.0.
 *
 * A plugin is a shared object exporting one symbol, `quiesce_plugin_entry`,
 * which returns a pointer to a static `quiesce_plugin` table. Everything that
 * crosses this boundary is protobuf bytes of proto/quiesce/plugin/v1/plugin.proto:
 * `describe` produces a PluginInfo, `plan` turns a PlanRequest into a Plan.
 *
 * The contract (docs/plugin-guide.md):
 *   - A plugin is a pure function of its input. No I/O, no threads, no
 *     sockets, no global state that outlives a call, no signals, no exit().
 *   - Buffers a plugin returns are owned by it until the host hands them back
 *     to `free_buffer`; the host copies them first.
 *   - Calls are made one at a time, from one thread, in a plugin host
 *     subprocess. A call that crashes or overruns its timeout kills that
 *     subprocess: only the plans of this plugin fail.
 *   - A new minor ABI version only appends members to `quiesce_plugin` and
 *     fields to the messages; the host checks the major version and that
 *     `struct_size` covers every member it uses.
 *
 * This header has no dependencies beyond <stddef.h> and <stdint.h>; copy it
 * into your project or point your compiler at Sources/CQuiescePlugin/include.
 */
#ifndef QUIESCE_PLUGIN_H
#define QUIESCE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QUIESCE_PLUGIN_ABI_MAJOR 1
#define QUIESCE_PLUGIN_ABI_MINOR 0
/* major in the high 16 bits, minor in the low 16 bits */
#define QUIESCE_PLUGIN_ABI_VERSION ((uint32_t)((QUIESCE_PLUGIN_ABI_MAJOR << 16) | QUIESCE_PLUGIN_ABI_MINOR))
#define QUIESCE_PLUGIN_ABI_MAJOR_OF(v) ((uint32_t)(v) >> 16)
#define QUIESCE_PLUGIN_ABI_MINOR_OF(v) ((uint32_t)(v) & 0xffffu)

/* The name of the one symbol a plugin exports. */
#define QUIESCE_PLUGIN_ENTRY_SYMBOL "quiesce_plugin_entry"

/* Calls return one of these. On QUIESCE_PLUGIN_OK `out` holds the protobuf
 * answer; on QUIESCE_PLUGIN_ERROR it holds a UTF-8 message for the operator
 * (e.g. "this plugin plans Linux instances; instance i-1 is windows"). */
#define QUIESCE_PLUGIN_OK 0
#define QUIESCE_PLUGIN_ERROR 1

/* Bytes returned by a plugin, released with its own `free_buffer`. */
typedef struct quiesce_buffer {
    uint8_t *data;
    size_t length;
} quiesce_buffer;

typedef struct quiesce_plugin {
    /* QUIESCE_PLUGIN_ABI_VERSION the plugin was built against. */
    uint32_t abi_version;
    /* sizeof(quiesce_plugin) the plugin was built against. */
    uint32_t struct_size;
    /* Writes a serialized quiesce.plugin.v1.PluginInfo to `out`. */
    int32_t (*describe)(quiesce_buffer *out);
    /* Reads a serialized quiesce.plugin.v1.PlanRequest and writes a
     * serialized quiesce.plugin.v1.Plan (or an error message) to `out`. */
    int32_t (*plan)(const uint8_t *request, size_t request_length, quiesce_buffer *out);
    /* Releases a buffer this plugin wrote. */
    void (*free_buffer)(quiesce_buffer *buffer);
} quiesce_plugin;

/* The smallest table this ABI major accepts (every member above). */
#define QUIESCE_PLUGIN_MIN_STRUCT_SIZE ((uint32_t)(offsetof(quiesce_plugin, free_buffer) + sizeof(void (*)(void))))

typedef const quiesce_plugin *(*quiesce_plugin_entry_fn)(void);

/* Every plugin defines this (with default visibility). */
const quiesce_plugin *quiesce_plugin_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* QUIESCE_PLUGIN_H */
