// The VSS requester calls behind quiesce_vss.h. Windows only; never built or run
// here (see README, Windows). The sequence follows Microsoft's "Overview of
// Processing a Backup Under VSS" and qemu-ga's qga/vss-win32/requester.cpp.
#ifdef _WIN32
#include <windows.h>
#include <vss.h>
#include <vswriter.h>
#include <vsbackup.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quiesce_vss.h"

struct quiesce_vss {
    IVssBackupComponents *components;
    IVssAsync *snapshot;  // DoSnapshotSet in flight
    HANDLE frozen;
    HANDLE thaw;
    VSS_ID set;
    bool com;
};

static HRESULT wait_async(IVssAsync *async, DWORD ms) {
    HRESULT hr = async->Wait(ms);
    if (FAILED(hr)) return hr;
    HRESULT status = S_OK;
    hr = async->QueryStatus(&status, NULL);
    if (FAILED(hr)) return hr;
    return status == VSS_S_ASYNC_FINISHED ? S_OK : (status == VSS_S_ASYNC_PENDING ? HRESULT_FROM_WIN32(ERROR_TIMEOUT) : status);
}

static HRESULT finish(IVssAsync *async, DWORD ms) {
    HRESULT hr = wait_async(async, ms);
    async->Release();
    return hr;
}

static void guid_text(const VSS_ID &id, char out[40]) {
    snprintf(out, 40, "%08lx-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x", id.Data1, id.Data2, id.Data3, id.Data4[0], id.Data4[1],
             id.Data4[2], id.Data4[3], id.Data4[4], id.Data4[5], id.Data4[6], id.Data4[7]);
}

extern "C" int32_t quiesce_vss_open(quiesce_vss **out) {
    quiesce_vss *vss = (quiesce_vss *)calloc(1, sizeof *vss);
    if (!vss) return E_OUTOFMEMORY;
    HRESULT hr = CoInitializeEx(NULL, COINIT_MULTITHREADED);
    vss->com = SUCCEEDED(hr);
    if (FAILED(hr) && hr != RPC_E_CHANGED_MODE) { free(vss); return hr; }
    hr = CreateVssBackupComponents(&vss->components);
    if (FAILED(hr)) { quiesce_vss_close(vss); return hr; }
    vss->frozen = CreateEventA(NULL, TRUE, FALSE, QUIESCE_VSS_EVENT_FROZEN);
    vss->thaw = CreateEventA(NULL, TRUE, FALSE, QUIESCE_VSS_EVENT_THAW);
    if (!vss->frozen || !vss->thaw) { quiesce_vss_close(vss); return HRESULT_FROM_WIN32(GetLastError()); }
    *out = vss;
    return S_OK;
}

extern "C" int32_t quiesce_vss_prepare(quiesce_vss *vss, int full, int with_writers, const char *const *volumes, uint32_t volume_count,
                                       const char *const *excluded_writers, uint32_t excluded_count, char set_id[40]) {
    IVssAsync *async = NULL;
    HRESULT hr = vss->components->InitializeForBackup();
    if (FAILED(hr)) return hr;
    hr = vss->components->SetContext(with_writers ? VSS_CTX_BACKUP : VSS_CTX_FILE_SHARE_BACKUP);
    if (FAILED(hr)) return hr;
    hr = vss->components->SetBackupState(true, false, full ? VSS_BT_FULL : VSS_BT_COPY, false);
    if (FAILED(hr)) return hr;
    if (with_writers) {
        hr = vss->components->GatherWriterMetadata(&async);
        if (FAILED(hr) || FAILED(hr = finish(async, INFINITE))) return hr;
        // Writers left out by name or id: DisableWriterInstances needs their instance ids, from the metadata.
        UINT count = 0;
        vss->components->GetWriterMetadataCount(&count);
        for (UINT i = 0; i < count && excluded_count > 0; i++) {
            VSS_ID instance, writer;
            IVssExamineWriterMetadata *metadata = NULL;
            if (FAILED(vss->components->GetWriterMetadata(i, &instance, &metadata))) continue;
            VSS_USAGE_TYPE usage;
            VSS_SOURCE_TYPE source;
            BSTR instance_name = NULL, writer_name = NULL;
            if (SUCCEEDED(metadata->GetIdentity(&instance, &writer, &writer_name, &usage, &source))) {
                char name[256] = {0}, id[40];
                WideCharToMultiByte(CP_UTF8, 0, writer_name, -1, name, sizeof name - 1, NULL, NULL);
                guid_text(writer, id);
                for (uint32_t e = 0; e < excluded_count; e++) {
                    if (strcmp(excluded_writers[e], name) == 0 || _stricmp(excluded_writers[e], id) == 0) {
                        vss->components->DisableWriterInstances(&instance, 1);
                    }
                }
            }
            SysFreeString(instance_name);
            SysFreeString(writer_name);
            metadata->Release();
        }
    }
    hr = vss->components->StartSnapshotSet(&vss->set);
    if (FAILED(hr)) return hr;
    guid_text(vss->set, set_id);
    for (uint32_t i = 0; i < volume_count; i++) {
        WCHAR volume[MAX_PATH];
        MultiByteToWideChar(CP_UTF8, 0, volumes[i], -1, volume, MAX_PATH);
        VSS_ID shadow;
        hr = vss->components->AddToSnapshotSet(volume, GUID_NULL, &shadow);
        if (FAILED(hr)) return hr;
    }
    hr = vss->components->PrepareForBackup(&async);
    if (FAILED(hr) || FAILED(hr = finish(async, INFINITE))) return hr;
    hr = vss->components->GatherWriterStatus(&async);
    if (FAILED(hr) || FAILED(hr = finish(async, INFINITE))) return hr;
    return S_OK;
}

extern "C" int32_t quiesce_vss_writers(quiesce_vss *vss, quiesce_vss_writer *out, uint32_t capacity, uint32_t *count) {
    IVssAsync *async = NULL;
    HRESULT hr = vss->components->GatherWriterStatus(&async);
    if (FAILED(hr) || FAILED(hr = finish(async, INFINITE))) return hr;
    UINT total = 0;
    hr = vss->components->GetWriterStatusCount(&total);
    if (FAILED(hr)) return hr;
    *count = 0;
    for (UINT i = 0; i < total && *count < capacity; i++) {
        VSS_ID instance, writer;
        BSTR name = NULL;
        VSS_WRITER_STATE state;
        HRESULT failure;
        if (FAILED(vss->components->GetWriterStatus(i, &instance, &writer, &name, &state, &failure))) continue;
        quiesce_vss_writer *w = &out[(*count)++];
        memset(w, 0, sizeof *w);
        WideCharToMultiByte(CP_UTF8, 0, name, -1, w->name, sizeof w->name - 1, NULL, NULL);
        guid_text(writer, w->writer_id);
        guid_text(instance, w->instance_id);
        w->state = (uint32_t)state;
        w->failure = (int32_t)failure;
        SysFreeString(name);
    }
    vss->components->FreeWriterStatus();
    return S_OK;
}

extern "C" int32_t quiesce_vss_do_snapshot_set(quiesce_vss *vss, uint32_t wait_ms) {
    ResetEvent(vss->frozen);
    ResetEvent(vss->thaw);
    HRESULT hr = vss->components->DoSnapshotSet(&vss->snapshot);
    if (FAILED(hr)) return hr;
    // The provider signals "frozen" from CommitSnapshots; DoSnapshotSet ending first is its failure.
    DWORD started = GetTickCount();
    while (WaitForSingleObject(vss->frozen, 10) != WAIT_OBJECT_0) {
        HRESULT status = S_OK;
        if (SUCCEEDED(vss->snapshot->QueryStatus(&status, NULL)) && status != VSS_S_ASYNC_PENDING) {
            return status == VSS_S_ASYNC_FINISHED ? VSS_E_UNEXPECTED : status;
        }
        if (GetTickCount() - started > wait_ms) return VSS_E_FLUSH_WRITES_TIMEOUT;
    }
    return S_OK;
}

extern "C" int32_t quiesce_vss_release(quiesce_vss *vss, uint32_t wait_ms) {
    if (!vss->snapshot) return VSS_E_BAD_STATE;
    SetEvent(vss->thaw);
    HRESULT hr = finish(vss->snapshot, wait_ms);
    vss->snapshot = NULL;
    return hr;
}

extern "C" int32_t quiesce_vss_backup_complete(quiesce_vss *vss) {
    IVssAsync *async = NULL;
    HRESULT hr = vss->components->BackupComplete(&async);
    if (FAILED(hr)) return hr;
    return finish(async, INFINITE);
}

extern "C" void quiesce_vss_abort(quiesce_vss *vss) {
    if (vss->snapshot) {
        SetEvent(vss->thaw);
        vss->snapshot->Cancel();
        vss->snapshot->Release();
        vss->snapshot = NULL;
    }
    if (vss->components) vss->components->AbortBackup();
}

extern "C" void quiesce_vss_close(quiesce_vss *vss) {
    if (!vss) return;
    if (vss->components) vss->components->Release();
    if (vss->frozen) CloseHandle(vss->frozen);
    if (vss->thaw) CloseHandle(vss->thaw);
    if (vss->com) CoUninitialize();
    free(vss);
}

extern "C" int32_t quiesce_vss_service_state(void) {
    SC_HANDLE manager = OpenSCManagerA(NULL, NULL, SC_MANAGER_CONNECT);
    if (!manager) return -1;
    SC_HANDLE service = OpenServiceA(manager, "VSS", SERVICE_QUERY_STATUS | SERVICE_QUERY_CONFIG);
    int32_t state = -1;
    if (service) {
        SERVICE_STATUS status;
        // VSS is demand-start: "stopped" is its idle state, and it starts on the first requester.
        QUERY_SERVICE_CONFIGA config;
        DWORD needed = 0;
        BOOL disabled = QueryServiceConfigA(service, &config, sizeof config, &needed) && config.dwStartType == SERVICE_DISABLED;
        if (!disabled && QueryServiceStatus(service, &status)) state = 1;
        CloseServiceHandle(service);
    }
    CloseServiceHandle(manager);
    return state;
}
#endif
