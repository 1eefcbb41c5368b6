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

#endif
