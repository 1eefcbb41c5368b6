#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
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
