// Thin wrappers over Linux ioctls and calls that Swift cannot name directly
// (macros from <linux/fs.h>, variadic ioctl). Each returns 0 or -1 with errno.
#ifndef QUIESCE_LINUX_H
#define QUIESCE_LINUX_H

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

/// Makes `dst` share `src`'s extents (reflink). EOPNOTSUPP/EXDEV/EINVAL: not possible here.
static inline int quiesce_ficlone(int dst, int src) { return ioctl(dst, FICLONE, src); }

/// Freezes the filesystem holding `fd` (EBUSY: already frozen by someone).
static inline int quiesce_fifreeze(int fd) { return ioctl(fd, FIFREEZE, 0); }

/// Thaws the filesystem holding `fd` (EINVAL: it was not frozen).
static inline int quiesce_fithaw(int fd) { return ioctl(fd, FITHAW, 0); }

/// Flushes the filesystem holding `fd`.
int quiesce_syncfs(int fd);

/// Copies up to `length` bytes in the kernel, advancing both offsets; returns bytes copied or -1.
long quiesce_copy_file_range(int src, long long *src_off, int dst, long long *dst_off, unsigned long length);

/// lseek SEEK_DATA / SEEK_HOLE; -1 with ENXIO past the last data.
long long quiesce_seek_data(int fd, long long offset);
long long quiesce_seek_hole(int fd, long long offset);

/// Sends one SOCK_SEQPACKET message with `count` descriptors attached (SCM_RIGHTS).
long quiesce_send_with_fds(int sock, const void *data, unsigned long length, const int *fds, int count);

/// Receives one message; descriptors that came with it are closed (the agent never expects any).
long quiesce_receive(int sock, void *buffer, unsigned long capacity);

/// A pidfd for `pid` (readable when the process exits), or -1.
int quiesce_pidfd_open(int pid);

/// Starts `path` with posix_spawn. `keep_fd` (>= 0) becomes descriptor 3 in
/// the child (run a script as /proc/self/fd/3); `map_from`/`map_to` (>= 0)
/// dup2s one more descriptor. All other descriptors above 2 are closed. stdin/stdout/stderr
/// become the given descriptors. `new_group` puts the child in a process
/// group of its own. Returns 0 and sets *pid, or an errno value.
int quiesce_spawn(const char *path, char *const argv[], char *const envp[], int keep_fd, int map_from, int map_to,
                  int stdin_fd, int stdout_fd, int stderr_fd, int new_group, int *pid);

/// pipe2 with O_CLOEXEC (and O_NONBLOCK when `nonblock`).
int quiesce_pipe(int fds[2], int nonblock);

/// Unblocks SIGINT, SIGTERM and SIGHUP in the calling thread (a parent may have started us with them blocked).
void quiesce_unblock_stop_signals(void);

/// Whether the directory `fd` is the root of a mount (statx STATX_ATTR_MOUNT_ROOT): 1, 0, or -1 with errno.
int quiesce_is_mount_root(int fd);

/// Makes this process a child subreaper: orphaned descendants are re-parented to it.
int quiesce_set_child_subreaper(void);

/// Locks current and future memory, faulting pages in only when first used.
int quiesce_lock_memory(void);

/// Asks the kernel to SIGKILL this process when the thread that forked it exits (a test's
/// helper must not outlive a test run that crashed). 0 on success, -1 with errno.
int quiesce_die_with_parent(void);

// Dirty + Writeback (KiB) from meminfo's text (/proc/meminfo, or a node's file
// whose lines start "Node N "): 0 and *kib set, or -1 when either line is
// missing or malformed.
int quiesce_parse_dirty_kib(const char *text, unsigned long length, unsigned long long *kib);
// The same, read from /proc/meminfo now (~0.1 ms; procfs, no disk).
int quiesce_read_dirty_kib(unsigned long long *kib);
// Opens /sys/devices/system/node/node*/meminfo (each NUMA node's share of the
// same counters; its lines start "Node N "), up to `capacity`: the count opened.
int quiesce_open_node_meminfo(int *fds, int capacity);
// Dirty + Writeback (KiB) summed over descriptors from quiesce_open_node_meminfo,
// re-read from offset 0 (sysfs generates the text on each read; ~0.015 ms for
// one node against ~0.09 ms to open and read /proc/meminfo): 0, or -1.
int quiesce_read_node_dirty_kib(const int *fds, int count, unsigned long long *kib);

#endif
