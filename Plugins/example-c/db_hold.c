/*
 * db-hold — an example Quiesce plugin in C, using libprotobuf-c.
 *
 * It holds a database lock across the filesystem freeze through a named hook:
 * the agent starts the hook (say, a mysql client that runs FLUSH TABLES WITH
 * READ LOCK and then prints READY), waits for its ready line, freezes the
 * filesystems, the engine snapshots, then the agent thaws and releases the
 * hold (ending the client, which drops the lock).
 *
 *   quiesce:  hold db (hook "db-hold", pinned)   undo: release
 *             freeze <eligible mounts>           undo: thaw
 *   thaw:     thaw, release
 *
 * Without a usable hook: filesystem-consistent, with the hook's problem as the
 * reason. Without a guard or an eligible mount: crash-consistent.
 *
 * Build: make -C Plugins/example-c   (needs protobuf-c-compiler, libprotobuf-c-dev)
 * Everything here follows docs/plugin-guide.md: pure function, no I/O.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quiesce_plugin.h"
#include "quiesce/plugin/v1/plugin.pb-c.h"

typedef Quiesce__Plugin__V1__Level Level;
#define CRASH QUIESCE__PLUGIN__V1__LEVEL__LEVEL_CRASH
#define FILESYSTEM QUIESCE__PLUGIN__V1__LEVEL__LEVEL_FILESYSTEM
#define APPLICATION QUIESCE__PLUGIN__V1__LEVEL__LEVEL_APPLICATION

static int32_t give(quiesce_buffer *out, const ProtobufCMessage *message) {
    size_t length = protobuf_c_message_get_packed_size(message);
    out->data = malloc(length ? length : 1);
    if (!out->data) return QUIESCE_PLUGIN_ERROR;
    out->length = protobuf_c_message_pack(message, out->data);
    return QUIESCE_PLUGIN_OK;
}

static int32_t refuse(quiesce_buffer *out, const char *text) {
    out->length = strlen(text);
    out->data = malloc(out->length + 1);
    if (!out->data) { out->length = 0; return QUIESCE_PLUGIN_ERROR; }
    memcpy(out->data, text, out->length);
    return QUIESCE_PLUGIN_ERROR;
}

static void free_buffer(quiesce_buffer *buffer) {
    free(buffer->data);
    buffer->data = NULL;
    buffer->length = 0;
}

/* ------------------------------------------------------------------ describe */

static int32_t describe(quiesce_buffer *out) {
    static Quiesce__Plugin__V1__OptionValue d_hook = QUIESCE__PLUGIN__V1__OPTION_VALUE__INIT,
                                            d_ready = QUIESCE__PLUGIN__V1__OPTION_VALUE__INIT,
                                            d_ready_timeout = QUIESCE__PLUGIN__V1__OPTION_VALUE__INIT,
                                            d_freeze_timeout = QUIESCE__PLUGIN__V1__OPTION_VALUE__INIT,
                                            d_only = QUIESCE__PLUGIN__V1__OPTION_VALUE__INIT;
    static Quiesce__Plugin__V1__StringList empty_list = QUIESCE__PLUGIN__V1__STRING_LIST__INIT;
    d_hook.value_case = QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_STRING_VALUE;
    d_hook.string_value = "db-hold";
    d_ready.value_case = QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_STRING_VALUE;
    d_ready.string_value = "READY";
    d_ready_timeout.value_case = QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_INT_VALUE;
    d_ready_timeout.int_value = 3000;
    d_freeze_timeout.value_case = QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_INT_VALUE;
    d_freeze_timeout.int_value = 2000;
    d_only.value_case = QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_LIST_VALUE;
    d_only.list_value = &empty_list;

    static Quiesce__Plugin__V1__OptionSpec hook = QUIESCE__PLUGIN__V1__OPTION_SPEC__INIT, ready = QUIESCE__PLUGIN__V1__OPTION_SPEC__INIT,
                                           ready_timeout = QUIESCE__PLUGIN__V1__OPTION_SPEC__INIT,
                                           freeze_timeout = QUIESCE__PLUGIN__V1__OPTION_SPEC__INIT,
                                           only = QUIESCE__PLUGIN__V1__OPTION_SPEC__INIT;
    hook.name = "hook";
    hook.type = QUIESCE__PLUGIN__V1__OPTION_TYPE__OPTION_TYPE_STRING;
    hook.description = "The hook in the agent's hook directory that takes the lock and prints the ready line.";
    hook.default_value = &d_hook;
    ready.name = "ready_line";
    ready.type = QUIESCE__PLUGIN__V1__OPTION_TYPE__OPTION_TYPE_STRING;
    ready.description = "The line the hook prints once the lock is held.";
    ready.default_value = &d_ready;
    ready_timeout.name = "ready_timeout_ms";
    ready_timeout.type = QUIESCE__PLUGIN__V1__OPTION_TYPE__OPTION_TYPE_DURATION_MS;
    ready_timeout.description = "How long taking the lock may take (it blocks the application's writes).";
    ready_timeout.default_value = &d_ready_timeout;
    ready_timeout.minimum = 100;
    ready_timeout.maximum = 60000;
    freeze_timeout.name = "freeze_timeout_ms";
    freeze_timeout.type = QUIESCE__PLUGIN__V1__OPTION_TYPE__OPTION_TYPE_DURATION_MS;
    freeze_timeout.description = "How long the freeze, the thaw and the release may each take.";
    freeze_timeout.default_value = &d_freeze_timeout;
    freeze_timeout.minimum = 100;
    freeze_timeout.maximum = 60000;
    only.name = "only_mounts";
    only.type = QUIESCE__PLUGIN__V1__OPTION_TYPE__OPTION_TYPE_STRING_LIST;
    only.description = "Freeze only these mount points (empty: every eligible mount).";
    only.default_value = &d_only;

    static Quiesce__Plugin__V1__OptionSpec *options[] = {&hook, &ready, &ready_timeout, &freeze_timeout, &only};
    static char *platforms[] = {"linux"};
    static Level levels[] = {CRASH, FILESYSTEM, APPLICATION};
    Quiesce__Plugin__V1__PluginInfo info = QUIESCE__PLUGIN__V1__PLUGIN_INFO__INIT;
    info.name = "db-hold";
    info.version = "0.1.0";
    info.description = "Example in C: hold a database lock (a named hook) across the filesystem freeze.";
    info.author = "Quiesce examples";
    info.n_platforms = 1;
    info.platforms = platforms;
    info.n_levels = 3;
    info.levels = levels;
    info.n_options = sizeof options / sizeof options[0];
    info.options = options;
    return give(out, &info.base);
}

/* ------------------------------------------------------------------ plan */

static const Quiesce__Plugin__V1__OptionValue *option(const Quiesce__Plugin__V1__Policy *policy, const char *name) {
    for (size_t i = 0; i < policy->n_options; i++)
        if (strcmp(policy->options[i]->key, name) == 0) return policy->options[i]->value;
    return NULL;
}

static const char *string_option(const Quiesce__Plugin__V1__Policy *policy, const char *name, const char *fallback) {
    const Quiesce__Plugin__V1__OptionValue *value = option(policy, name);
    return value && value->value_case == QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_STRING_VALUE ? value->string_value : fallback;
}

static int64_t int_option(const Quiesce__Plugin__V1__Policy *policy, const char *name, int64_t fallback) {
    const Quiesce__Plugin__V1__OptionValue *value = option(policy, name);
    return value && value->value_case == QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_INT_VALUE ? value->int_value : fallback;
}

static int listed(const Quiesce__Plugin__V1__Policy *policy, const char *name, const char *mount, int empty_means) {
    const Quiesce__Plugin__V1__OptionValue *value = option(policy, name);
    if (!value || value->value_case != QUIESCE__PLUGIN__V1__OPTION_VALUE__VALUE_LIST_VALUE || value->list_value->n_values == 0)
        return empty_means;
    for (size_t i = 0; i < value->list_value->n_values; i++)
        if (strcmp(value->list_value->values[i], mount) == 0) return 1;
    return 0;
}

static int32_t plan(const uint8_t *bytes, size_t length, quiesce_buffer *out) {
    Quiesce__Plugin__V1__PlanRequest *request = quiesce__plugin__v1__plan_request__unpack(NULL, length, bytes);
    if (!request || !request->facts || !request->policy) {
        if (request) quiesce__plugin__v1__plan_request__free_unpacked(request, NULL);
        return refuse(out, "db-hold: cannot decode the PlanRequest");
    }
    const Quiesce__Plugin__V1__InstanceFacts *facts = request->facts;
    const Quiesce__Plugin__V1__Policy *policy = request->policy;
    int32_t result;
    if (strcmp(facts->os_family, "linux") != 0) {
        char text[256];
        snprintf(text, sizeof text, "db-hold plans Linux instances; %s reports os_family \"%s\"", facts->instance_id, facts->os_family);
        result = refuse(out, text);
        quiesce__plugin__v1__plan_request__free_unpacked(request, NULL);
        return result;
    }

    Quiesce__Plugin__V1__Plan p = QUIESCE__PLUGIN__V1__PLAN__INIT;
    p.plugin = "db-hold";
    p.expected = policy->wanted;
    char reason[512] = "";
    char *reasons[1] = {reason};

    /* Eligible mounts. */
    char **mounts = calloc(facts->n_mounts + 1, sizeof *mounts);
    size_t n_mounts = 0;
    for (size_t i = 0; i < facts->n_mounts; i++)
        if (facts->mounts[i]->freezable && listed(policy, "only_mounts", facts->mounts[i]->mount_point, 1))
            mounts[n_mounts++] = facts->mounts[i]->mount_point;

    /* The hook. */
    const char *hook_name = string_option(policy, "hook", "db-hold");
    const Quiesce__Plugin__V1__HookFact *hook = NULL;
    for (size_t i = 0; i < facts->n_hooks; i++)
        if (strcmp(facts->hooks[i]->name, hook_name) == 0) hook = facts->hooks[i];

    if (policy->wanted == CRASH) {
        /* nothing to do */
    } else if (!facts->guard_ready) {
        p.expected = CRASH;
        snprintf(reason, sizeof reason, "guard-missing: the agent's thaw guard is not running");
    } else if (n_mounts == 0) {
        p.expected = CRASH;
        snprintf(reason, sizeof reason, "no-eligible-filesystem: no ext3, ext4 or XFS mount to freeze");
    } else if (policy->wanted == APPLICATION && (!hook || hook->refusal[0] != '\0' || hook->sha256[0] == '\0')) {
        p.expected = FILESYSTEM;
        if (!hook)
            snprintf(reason, sizeof reason, "hook-not-offered: the agent's hook directory has no %s", hook_name);
        else
            snprintf(reason, sizeof reason, "hook-%s: %s (%s)", hook->refusal[0] ? hook->refusal : "unhashed", hook->name, hook->path);
    }
    if (reason[0]) { p.n_reasons = 1; p.reasons = reasons; }

    uint32_t ready_timeout = (uint32_t)int_option(policy, "ready_timeout_ms", 3000);
    uint32_t step_timeout = (uint32_t)int_option(policy, "freeze_timeout_ms", 2000);
    int hold = p.expected == APPLICATION;

    Quiesce__Plugin__V1__HookRef ref = QUIESCE__PLUGIN__V1__HOOK_REF__INIT;
    Quiesce__Plugin__V1__HoldAction hold_action = QUIESCE__PLUGIN__V1__HOLD_ACTION__INIT;
    Quiesce__Plugin__V1__ReleaseAction release_action = QUIESCE__PLUGIN__V1__RELEASE_ACTION__INIT;
    Quiesce__Plugin__V1__FreezeAction freeze_action = QUIESCE__PLUGIN__V1__FREEZE_ACTION__INIT;
    Quiesce__Plugin__V1__ThawAction thaw_action = QUIESCE__PLUGIN__V1__THAW_ACTION__INIT;
    Quiesce__Plugin__V1__Action a_hold = QUIESCE__PLUGIN__V1__ACTION__INIT, a_freeze = QUIESCE__PLUGIN__V1__ACTION__INIT,
                                a_thaw = QUIESCE__PLUGIN__V1__ACTION__INIT, a_release = QUIESCE__PLUGIN__V1__ACTION__INIT;
    Quiesce__Plugin__V1__OnFailure f_hold = QUIESCE__PLUGIN__V1__ON_FAILURE__INIT, f_freeze = QUIESCE__PLUGIN__V1__ON_FAILURE__INIT;
    Quiesce__Plugin__V1__Step s_hold = QUIESCE__PLUGIN__V1__STEP__INIT, s_freeze = QUIESCE__PLUGIN__V1__STEP__INIT,
                              s_thaw = QUIESCE__PLUGIN__V1__STEP__INIT, s_release = QUIESCE__PLUGIN__V1__STEP__INIT;
    Quiesce__Plugin__V1__Step *quiesce[2], *thaw[2];

    if (p.expected >= FILESYSTEM) {
        if (hold) {
            ref.hook_case = QUIESCE__PLUGIN__V1__HOOK_REF__HOOK_NAME;
            ref.name = hook->name;
            ref.sha256 = hook->sha256;
            hold_action.hold_id = "db";
            hold_action.hook = &ref;
            hold_action.ready_line = (char *)string_option(policy, "ready_line", "READY");
            a_hold.kind_case = QUIESCE__PLUGIN__V1__ACTION__KIND_HOLD;
            a_hold.hold = &hold_action;
            /* Without the lock the snapshot is still filesystem-consistent, unless the policy needs more. */
            if (policy->minimum == APPLICATION) {
                f_hold.outcome_case = QUIESCE__PLUGIN__V1__ON_FAILURE__OUTCOME_FAIL;
                f_hold.fail = 1;
            } else {
                f_hold.outcome_case = QUIESCE__PLUGIN__V1__ON_FAILURE__OUTCOME_DOWNGRADE_TO;
                f_hold.downgrade_to = FILESYSTEM;
            }
            f_hold.reason = "db-lock-failed";
            s_hold.id = "hold-db";
            s_hold.description = "take the database lock and keep it until released";
            s_hold.action = &a_hold;
            s_hold.timeout_ms = ready_timeout;
            s_hold.undo = "release-db";
            s_hold.on_failure = &f_hold;
            s_hold.blocking = 1;
            quiesce[p.n_quiesce++] = &s_hold;
        }
        freeze_action.n_mount_points = n_mounts;
        freeze_action.mount_points = mounts;
        a_freeze.kind_case = QUIESCE__PLUGIN__V1__ACTION__KIND_FREEZE;
        a_freeze.freeze = &freeze_action;
        if (policy->minimum >= FILESYSTEM) {
            f_freeze.outcome_case = QUIESCE__PLUGIN__V1__ON_FAILURE__OUTCOME_FAIL;
            f_freeze.fail = 1;
        } else {
            f_freeze.outcome_case = QUIESCE__PLUGIN__V1__ON_FAILURE__OUTCOME_DOWNGRADE_TO;
            f_freeze.downgrade_to = CRASH;
        }
        f_freeze.reason = "freeze-failed";
        s_freeze.id = "freeze";
        s_freeze.description = "flush and freeze the eligible mounts";
        s_freeze.action = &a_freeze;
        s_freeze.timeout_ms = step_timeout;
        s_freeze.undo = "thaw";
        s_freeze.on_failure = &f_freeze;
        s_freeze.blocking = 1;
        quiesce[p.n_quiesce++] = &s_freeze;

        a_thaw.kind_case = QUIESCE__PLUGIN__V1__ACTION__KIND_THAW;
        a_thaw.thaw = &thaw_action;
        s_thaw.id = "thaw";
        s_thaw.description = "thaw the mounts";
        s_thaw.action = &a_thaw;
        s_thaw.timeout_ms = step_timeout;
        s_thaw.blocking = 1;
        thaw[p.n_thaw++] = &s_thaw;
        if (hold) {
            release_action.hold_id = "db";
            a_release.kind_case = QUIESCE__PLUGIN__V1__ACTION__KIND_RELEASE;
            a_release.release = &release_action;
            s_release.id = "release-db";
            s_release.description = "end the hook, which drops the lock";
            s_release.action = &a_release;
            s_release.timeout_ms = step_timeout;
            s_release.blocking = 1;
            thaw[p.n_thaw++] = &s_release;
        }
        p.quiesce = quiesce;
        p.thaw = thaw;
    }
    result = give(out, &p.base);
    free(mounts);
    quiesce__plugin__v1__plan_request__free_unpacked(request, NULL);
    return result;
}

static const quiesce_plugin table = {
    .abi_version = QUIESCE_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(quiesce_plugin),
    .describe = describe,
    .plan = plan,
    .free_buffer = free_buffer,
};

__attribute__((visibility("default"))) const quiesce_plugin *quiesce_plugin_entry(void) { return &table; }
