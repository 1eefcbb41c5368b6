// The agent's VSS requester on Windows: the calls of a snapshot set, each
// returning the HRESULT (0: S_OK). Built only on Windows (Package.swift adds
// this target there); the Linux agent's VSS side is the simulator.
//
// NOT BUILT OR RUN YET: this machine cannot build Windows code. See README, Windows.
//
// The hold of writes while the engine snapshots needs a VSS provider whose
// CommitSnapshots signals QUIESCE_VSS_EVENT_FROZEN and waits (at most 10 s) for
// QUIESCE_VSS_EVENT_THAW, as qemu-ga's qga/vss-win32 provider does with its own
// events. That provider is not written.
#ifndef QUIESCE_VSS_H
#define QUIESCE_VSS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QUIESCE_VSS_EVENT_FROZEN "Global\\QuiesceVssFrozen"
#define QUIESCE_VSS_EVENT_THAW "Global\\QuiesceVssThaw"

typedef struct quiesce_vss quiesce_vss;

typedef struct {
    char name[256];
    char writer_id[40];
    char instance_id[40];
    // VSS_WRITER_STATE (1 STABLE … 12 FAILED_AT_BACKUP_COMPLETE).
    uint32_t state;
    // The writer's failure HRESULT (VSS_E_WRITERERROR_*), 0 when none.
    int32_t failure;
} quiesce_vss_writer;

// CoInitializeEx, CreateVssBackupComponents.
int32_t quiesce_vss_open(quiesce_vss **out);

// InitializeForBackup → SetContext → SetBackupState(COPY | FULL) → GatherWriterMetadata
// → DisableWriterInstances(excluded) → StartSnapshotSet → AddToSnapshotSet (each volume,
// e.g. "C:\\") → PrepareForBackup → GatherWriterStatus. `with_writers` 0: no writer takes
// part (VSS_CTX_FILE_SHARE_BACKUP). `set_id` receives the set's GUID as text.
int32_t quiesce_vss_prepare(quiesce_vss *vss, int full, int with_writers, const char *const *volumes, uint32_t volume_count,
                            const char *const *excluded_writers, uint32_t excluded_count, char set_id[40]);

// GatherWriterStatus, then each writer's GetWriterStatus.
int32_t quiesce_vss_writers(quiesce_vss *vss, quiesce_vss_writer *out, uint32_t capacity, uint32_t *count);

// DoSnapshotSet, asynchronously: returns 0 once the provider signals that writes are
// held (QUIESCE_VSS_EVENT_FROZEN), or DoSnapshotSet's failure; `wait_ms` bounds the wait.
int32_t quiesce_vss_do_snapshot_set(quiesce_vss *vss, uint32_t wait_ms);

// Signals QUIESCE_VSS_EVENT_THAW and waits for DoSnapshotSet to finish: its HRESULT
// (VSS_E_HOLD_WRITES_TIMEOUT when the provider's hold ran out first).
int32_t quiesce_vss_release(quiesce_vss *vss, uint32_t wait_ms);

// BackupComplete (waited for).
int32_t quiesce_vss_backup_complete(quiesce_vss *vss);

// AbortBackup; safe at any point after open.
void quiesce_vss_abort(quiesce_vss *vss);

// Releases the requester and its events.
void quiesce_vss_close(quiesce_vss *vss);

// The Volume Shadow Copy service: 1 running, 0 stopped, -1 disabled or absent.
int32_t quiesce_vss_service_state(void);

#ifdef __cplusplus
}
#endif

#endif
