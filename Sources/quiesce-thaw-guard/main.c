// quiesce-thaw-guard: the process that makes sure a guest never stays frozen
// (ARCHITECTURE.md, invariant 1).
//
// The agent starts it once, at start-up, with one end of a SOCK_SEQPACKET
// socketpair as descriptor 3. The guard is the only process that calls
// FIFREEZE and FITHAW: the agent sends it descriptors it opened on the mounts
// (SCM_RIGHTS) and asks it to freeze them; the guard keeps those descriptors
// and thaws them, in reverse order, when
//   * the agent asks (THAW),
//   * the freeze budget runs out (counted from the first FIFREEZE),
//   * the agent is gone: end-of-file on the socket (SIGKILL included),
//   * it is itself told to stop (SIGTERM, SIGINT, SIGHUP).
// It runs in its own session, with oom_score_adj -1000 and all its memory
// locked, and after start-up it touches no file: stdin/stdout/stderr are
// /dev/null, so nothing it does can block on a frozen filesystem.
//
// Messages are single packets of text (agent -> guard):
//   PING
//   FREEZE <id> <budget_ms> <syncfs 0|1>      + N descriptors, freeze order
//   THAW <id> <cause>
// and (guard -> agent):
//   READY <pid> <oom_adjusted 0|1> <memory_locked 0|1>
//   PONG <pid> <frozen 0|1> <id|->
//   FROZEN <id> <all 0|1> <budget_ms> <count>\n<frozen> <errno> <syncfs_us> <freeze_us>   (one line per mount)
//   THAWED <id> <cause> <frozen_us> <within_budget 0|1> <count>\n<thawed> <errno>         (one line per mount)
//   ERROR <id|-> <reason> <detail>
// A freeze is all-or-nothing: when one mount cannot be frozen (EBUSY: another
// owner holds it), the mounts this freeze already froze are thawed at once and
// the failed one is left alone — it is not ours.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_MOUNTS 64
#define MAX_PACKET 8192

static int sock = 3;
static volatile sig_atomic_t stop_requested = 0;

struct freeze {
    int active;
    char id[128];
    int count;
    int fds[MAX_MOUNTS];
    int frozen[MAX_MOUNTS];
    uint64_t first_freeze_ns;
    uint64_t deadline_ns;
    uint32_t budget_ms;
};
static struct freeze current;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_signal(int number) { (void)number; stop_requested = 1; }

static void send_text(const char *text) {
    // MSG_NOSIGNAL: a vanished agent must not kill the guard mid-thaw.
    (void)send(sock, text, strlen(text), MSG_NOSIGNAL | MSG_DONTWAIT);
}

// Thaws every mount this freeze froze, last frozen first, and reports how.
static void thaw_all(const char *cause) {
    if (!current.active) return;
    char reply[MAX_PACKET];
    int thawed[MAX_MOUNTS];
    int errors[MAX_MOUNTS];
    uint64_t last_thaw = 0;
    for (int i = current.count - 1; i >= 0; i--) {
        thawed[i] = 0;
        errors[i] = 0;
        if (!current.frozen[i]) continue;
        if (ioctl(current.fds[i], FITHAW, 0) == 0) {
            thawed[i] = 1;
        } else {
            errors[i] = errno;
        }
        last_thaw = now_ns();
        current.frozen[i] = 0;
    }
    uint64_t frozen_us = last_thaw > current.first_freeze_ns ? (last_thaw - current.first_freeze_ns) / 1000 : 0;
    int within = last_thaw <= current.deadline_ns;
    int n = snprintf(reply, sizeof reply, "THAWED %s %s %llu %d %d", current.id, cause,
                     (unsigned long long)frozen_us, within, current.count);
    for (int i = 0; i < current.count && n < (int)sizeof reply - 32; i++) {
        n += snprintf(reply + n, sizeof reply - n, "\n%d %d", thawed[i], errors[i]);
        close(current.fds[i]);
    }
    current.active = 0;
    send_text(reply);
}

static void do_freeze(char *args, int *fds, int nfds) {
    char id[128];
    unsigned budget_ms = 0;
    int use_syncfs = 1;
    char reply[MAX_PACKET];
    if (sscanf(args, "%127s %u %d", id, &budget_ms, &use_syncfs) != 3 || nfds <= 0) {
        snprintf(reply, sizeof reply, "ERROR - bad-request expected \"FREEZE <id> <budget_ms> <syncfs>\" with descriptors, found \"%.200s\" with %d", args, nfds);
        send_text(reply);
        for (int i = 0; i < nfds; i++) close(fds[i]);
        return;
    }
    if (current.active) {
        snprintf(reply, sizeof reply, "ERROR %s already-frozen freeze %s is in progress", id, current.id);
        send_text(reply);
        for (int i = 0; i < nfds; i++) close(fds[i]);
        return;
    }
    memset(&current, 0, sizeof current);
    snprintf(current.id, sizeof current.id, "%s", id);
    current.count = nfds;
    current.budget_ms = budget_ms;
    current.active = 1;
    uint64_t syncfs_us[MAX_MOUNTS] = {0}, freeze_us[MAX_MOUNTS] = {0};
    int errors[MAX_MOUNTS] = {0};
    int all = 1;
    for (int i = 0; i < nfds; i++) {
        current.fds[i] = fds[i];
        if (!all) continue;
        uint64_t t0 = now_ns();
        if (use_syncfs) syncfs(fds[i]);
        uint64_t t1 = now_ns();
        if (current.first_freeze_ns == 0) {
            current.first_freeze_ns = t1;
            current.deadline_ns = t1 + (uint64_t)budget_ms * 1000000ull;
        }
        if (ioctl(fds[i], FIFREEZE, 0) == 0) {
            current.frozen[i] = 1;
        } else {
            errors[i] = errno;
            all = 0;
        }
        uint64_t t2 = now_ns();
        syncfs_us[i] = (t1 - t0) / 1000;
        freeze_us[i] = (t2 - t1) / 1000;
    }
    int n = snprintf(reply, sizeof reply, "FROZEN %s %d %u %d", id, all, budget_ms, nfds);
    for (int i = 0; i < nfds && n < (int)sizeof reply - 64; i++) {
        n += snprintf(reply + n, sizeof reply - n, "\n%d %d %llu %llu", current.frozen[i], errors[i],
                      (unsigned long long)syncfs_us[i], (unsigned long long)freeze_us[i]);
    }
    if (!all) {
        // All or nothing: undo what this attempt froze; never touch the mount
        // that failed (EBUSY means another owner froze it). The THAWED that
        // follows the FROZEN says so.
        send_text(reply);
        thaw_all("aborted");
        return;
    }
    send_text(reply);
}

static void handle_packet(char *text, int *fds, int nfds) {
    char reply[512];
    if (strcmp(text, "PING") == 0) {
        snprintf(reply, sizeof reply, "PONG %d %d %s", (int)getpid(), current.active, current.active ? current.id : "-");
        send_text(reply);
        for (int i = 0; i < nfds; i++) close(fds[i]);
    } else if (strncmp(text, "FREEZE ", 7) == 0) {
        do_freeze(text + 7, fds, nfds);
    } else if (strncmp(text, "THAW ", 5) == 0) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        char id[128], cause[32];
        if (sscanf(text + 5, "%127s %31s", id, cause) != 2) {
            snprintf(reply, sizeof reply, "ERROR - bad-request expected \"THAW <id> <cause>\", found \"%.200s\"", text);
            send_text(reply);
        } else if (!current.active || strcmp(id, current.id) != 0) {
            snprintf(reply, sizeof reply, "ERROR %s not-frozen %s", id, current.active ? current.id : "-");
            send_text(reply);
        } else {
            thaw_all(cause);
        }
    } else {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        snprintf(reply, sizeof reply, "ERROR - unknown-request expected PING, FREEZE or THAW, found \"%.100s\"", text);
        send_text(reply);
    }
}

int main(int argc, char **argv) {
    if (argc > 1) sock = atoi(argv[1]);
    // Its own session: a terminal's ^C or the agent's process group being
    // signalled does not reach the guard.
    setsid();
    int oom_ok = 0;
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        oom_ok = write(oom, "-1000", 5) == 5;
        close(oom);
    }
    int locked = mlockall(MCL_CURRENT | MCL_FUTURE) == 0;
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        close(null);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGHUP, &action, NULL);
    signal(SIGPIPE, SIG_IGN);

    char ready[128];
    snprintf(ready, sizeof ready, "READY %d %d %d", (int)getpid(), oom_ok, locked);
    send_text(ready);

    static char buffer[MAX_PACKET + 1];
    for (;;) {
        if (stop_requested) {
            thaw_all("guard");
            return 0;
        }
        int timeout = -1;
        if (current.active) {
            uint64_t now = now_ns();
            if (now >= current.deadline_ns) {
                thaw_all("budget");
                continue;
            }
            uint64_t left_ms = (current.deadline_ns - now + 999999) / 1000000;
            timeout = left_ms > 60000 ? 60000 : (int)left_ms;
        }
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        int ready_count = poll(&pfd, 1, timeout);
        if (ready_count < 0) {
            if (errno == EINTR) continue;
            thaw_all("guard");
            return 1;
        }
        if (ready_count == 0) continue;  // budget check at the top of the loop
        char control[CMSG_SPACE(sizeof(int) * MAX_MOUNTS)];
        struct iovec iov = {.iov_base = buffer, .iov_len = MAX_PACKET};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) {
            // End-of-file (or a broken socket): the agent is gone.
            thaw_all("guard");
            return 0;
        }
        buffer[n] = 0;
        int fds[MAX_MOUNTS];
        int nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < count && nfds < MAX_MOUNTS; i++) memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            }
        }
        if (msg.msg_flags & MSG_CTRUNC) {
            for (int i = 0; i < nfds; i++) close(fds[i]);
            send_text("ERROR - too-many-mounts a freeze may name at most 64 mounts");
            continue;
        }
        handle_packet(buffer, fds, nfds);
    }
}
