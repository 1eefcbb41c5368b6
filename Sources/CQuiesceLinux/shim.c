#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include "quiesce_linux.h"

int quiesce_syncfs(int fd) { return syncfs(fd); }

long quiesce_copy_file_range(int src, long long *src_off, int dst, long long *dst_off, unsigned long length) {
    off64_t s = *src_off, d = *dst_off;
    ssize_t n = copy_file_range(src, &s, dst, &d, length, 0);
    *src_off = s;
    *dst_off = d;
    return (long)n;
}

long long quiesce_seek_data(int fd, long long offset) { return lseek(fd, offset, SEEK_DATA); }
long long quiesce_seek_hole(int fd, long long offset) { return lseek(fd, offset, SEEK_HOLE); }

long quiesce_send_with_fds(int sock, const void *data, unsigned long length, const int *fds, int count) {
    struct iovec iov = {.iov_base = (void *)data, .iov_len = length};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    char control[CMSG_SPACE(sizeof(int) * 64)];
    if (count > 64) { errno = E2BIG; return -1; }
    if (count > 0) {
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * count);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
    }
    // The socket is non-blocking once the agent reads it on its event loop (NIO
    // sets O_NONBLOCK on the shared file description), and this runs there: never
    // wait. EAGAIN means the guard has not read a full queue of requests (it is
    // wedged); the caller reports it (a freeze is refused; a thaw falls back to
    // the agent's own descriptors).
    ssize_t sent;
    do { sent = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return (long)sent;
}

long quiesce_receive(int sock, void *buffer, unsigned long capacity) {
    struct iovec iov = {.iov_base = buffer, .iov_len = capacity};
    char control[CMSG_SPACE(sizeof(int) * 64)];
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n >= 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < count; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    close(fd);
                }
            }
        }
    }
    return (long)n;
}

int quiesce_pidfd_open(int pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

int quiesce_spawn(const char *path, char *const argv[], char *const envp[], int keep_fd, int map_from, int map_to,
                  int stdin_fd, int stdout_fd, int stderr_fd, int new_group, int *pid) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attributes);
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setsigdefault(&attributes, &all);
    if (new_group) {
        flags |= POSIX_SPAWN_SETPGROUP;
        posix_spawnattr_setpgroup(&attributes, 0);
    }
    posix_spawnattr_setflags(&attributes, flags);
    if (stdin_fd >= 0) posix_spawn_file_actions_adddup2(&actions, stdin_fd, 0);
    if (stdout_fd >= 0) posix_spawn_file_actions_adddup2(&actions, stdout_fd, 1);
    if (stderr_fd >= 0) posix_spawn_file_actions_adddup2(&actions, stderr_fd, 2);
    // The kept descriptor becomes 3 (the caller runs /proc/self/fd/3), or
    // `map_from` becomes `map_to`; every other descriptor is closed, so a hook
    // or the guard never holds the agent's (or a test process's) sockets.
    int highest = 2;
    if (keep_fd >= 0) {
        posix_spawn_file_actions_adddup2(&actions, keep_fd, 3);
        highest = 3;
    }
    if (map_from >= 0 && map_to >= 0) {
        posix_spawn_file_actions_adddup2(&actions, map_from, map_to);
        if (map_to > highest) highest = map_to;
    }
    posix_spawn_file_actions_addclosefrom_np(&actions, highest + 1);
    pid_t child = 0;
    int result = posix_spawn(&child, path, &actions, &attributes, argv, envp);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    if (result == 0) *pid = child;
    return result;
}

int quiesce_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }

int quiesce_lock_memory(void) {
#ifdef MCL_ONFAULT
    return mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT);
#else
    return mlockall(MCL_CURRENT | MCL_FUTURE);
#endif
}

int quiesce_pipe(int fds[2], int nonblock) { return pipe2(fds, O_CLOEXEC | (nonblock ? O_NONBLOCK : 0)); }

void quiesce_unblock_stop_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int quiesce_is_mount_root(int fd) {
    struct statx info;
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_BASIC_STATS, &info) != 0) return -1;
    if (!(info.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT)) { errno = ENOTSUP; return -1; }
    return (info.stx_attributes & STATX_ATTR_MOUNT_ROOT) ? 1 : 0;
}

// One "Name:   <digits> kB" line's value, or -1. A per-node file
// (/sys/devices/system/node/nodeN/meminfo) prefixes each line with "Node N ".
static int meminfo_field(const char *text, unsigned long length, const char *name, unsigned long long *value) {
    size_t name_length = strlen(name);
    for (unsigned long at = 0; at < length;) {
        const char *line = text + at;
        const char *newline = memchr(line, '\n', length - at);
        unsigned long line_length = newline ? (unsigned long)(newline - line) : length - at;
        at += line_length + 1;
        if (line_length > 5 && memcmp(line, "Node ", 5) == 0) {
            unsigned long skip = 5;
            while (skip < line_length && line[skip] >= '0' && line[skip] <= '9') skip++;
            if (skip == 5 || skip >= line_length || line[skip] != ' ') continue;
            skip++;
            line += skip;
            line_length -= skip;
        }
        if (line_length <= name_length || memcmp(line, name, name_length) != 0) continue;
        unsigned long i = name_length;
        while (i < line_length && line[i] == ' ') i++;
        unsigned long long v = 0;
        int digits = 0;
        while (i < line_length && line[i] >= '0' && line[i] <= '9' && digits < 19) v = v * 10 + (unsigned long long)(line[i++] - '0'), digits++;
        if (digits == 0 || line_length - i != 3 || memcmp(line + i, " kB", 3) != 0) return -1;
        *value = v;
        return 0;
    }
    return -1;
}

int quiesce_parse_dirty_kib(const char *text, unsigned long length, unsigned long long *kib) {
    unsigned long long dirty, writeback;
    if (meminfo_field(text, length, "Dirty:", &dirty) != 0 || meminfo_field(text, length, "Writeback:", &writeback) != 0) return -1;
    *kib = dirty + writeback;
    return 0;
}

// Reads a whole (small, generated) file from offset 0 of an open descriptor.
static long read_whole(int fd, char *buffer, size_t capacity) {
    size_t used = 0;
    while (used < capacity) {
        ssize_t n = pread(fd, buffer + used, capacity - used, (off_t)used);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) break;
        used += (size_t)n;
    }
    return (long)used;
}

int quiesce_read_dirty_kib(unsigned long long *kib) {
    char buffer[8192];
    int fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long used = read_whole(fd, buffer, sizeof buffer);
    close(fd);
    return used < 0 ? -1 : quiesce_parse_dirty_kib(buffer, (unsigned long)used, kib);
}

int quiesce_open_node_meminfo(int *fds, int capacity) {
    int count = 0;
    // Node numbers may have gaps (offline nodes); 1024 is the kernel's MAX_NUMNODES bound.
    char path[64];
    for (int node = 0; node < 1024 && count < capacity; node++) {
        snprintf(path, sizeof path, "/sys/devices/system/node/node%d/meminfo", node);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) fds[count++] = fd;
        else if (errno != ENOENT) break;
    }
    return count;
}

int quiesce_read_node_dirty_kib(const int *fds, int count, unsigned long long *kib) {
    char buffer[8192];
    unsigned long long total = 0;
    if (count <= 0) return -1;
    for (int i = 0; i < count; i++) {
        unsigned long long node = 0;
        long used = read_whole(fds[i], buffer, sizeof buffer);
        if (used < 0 || quiesce_parse_dirty_kib(buffer, (unsigned long)used, &node) != 0) return -1;
        total += node;
    }
    *kib = total;
    return 0;
}

int quiesce_die_with_parent(void) {
#ifdef __linux__
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return -1;
    /* The parent may have gone between fork and here. */
    if (getppid() == 1) raise(SIGKILL);
    return 0;
#else
    return 0;
#endif
}
