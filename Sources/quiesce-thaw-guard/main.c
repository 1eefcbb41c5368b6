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
// It runs in its own session, at nice -10, with oom_score_adj -1000 and all its memory
// locked, and after start-up it touches no file: stdin/stdout/stderr are
// /dev/null, so nothing it does can block on a frozen filesystem.
//
// Messages are single packets of text (agent -> guard):
//   PING
//   FREEZE <id> <budget_ms> <syncfs 0|1> [<concurrent> [<expedite 0|1>]]   + N descriptors, freeze order
//     The first <concurrent> descriptors (default 1) are independent
//     filesystems: they are synced together, then frozen together (one thread
//     each, started before the window opens), so the frozen window grows with
//     the slowest, not the sum. The rest follow one by one, in order (stacked
//     filesystems, "/" last). Thawing runs the other way, one by one: the rest
//     in reverse, then the group (a FITHAW takes microseconds, a thread more).
//     <expedite> 1 (default 0): RCU grace periods are expedited while the
//     FIFREEZEs run (see rcu_expedite_begin).
//   THAW <id> <cause>
// and (guard -> agent):
//   READY <pid> <oom_adjusted 0|1> <memory_locked 0|1>
//   PONG <pid> <frozen 0|1> <id|->
//   FROZEN <id> <all 0|1> <budget_ms> <count> <rcu>\n<frozen> <errno> <syncfs_us> <freeze_us>   (one line per mount)
//     <rcu>: expedited, already, normal, unavailable or not-asked (rcu_expedite_begin)
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
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
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
    int concurrent;
    int fds[MAX_MOUNTS];
    int frozen[MAX_MOUNTS];
    uint64_t first_freeze_ns;
    uint64_t deadline_ns;
    uint32_t budget_ms;
};
static struct freeze current;

// FIFREEZE's own cost on an idle filesystem is RCU grace periods, not I/O:
// freeze_super takes the superblock's three write levels (percpu_down_write),
// and each waits for a grace period unless one just passed — ~8-25 ms each
// on a quiet VM, 45-55 ms for an idle 16 MiB ext4 whose last freeze was a
// while ago, against ~0.5 ms with expedited grace periods (measured here).
// Writes are blocked from the first level on, so the application feels two of
// the three. /sys/kernel/rcu_expedited makes every grace period expedited
// (IPIs to the other CPUs instead of waiting for them to pass through a
// quiescent state); the guard sets it for the FIFREEZEs only and puts it back
// before it answers. It is left alone when an administrator set it already,
// or set rcu_normal (real-time systems ask for normal grace periods).
// Both files are opened at start-up: nothing is opened on the freeze path.
//
// Several guards on one kernel (containers, tests, the demo's and the bench's
// in-process fleets) share the knob: the last one out turns it off, not the
// first. flock(2) on the two files (no writes; released by the kernel if a
// guard dies) keeps the count: an exclusive lock on rcu_expedited serializes
// the read-modify-write, and each guard that relies on a 1 that guards set
// holds a shared lock on rcu_normal. A 1 nobody holds that way is an
// administrator's, and is left alone.
static int rcu_expedited_fd = -1, rcu_normal_fd = -1;

static int read_flag(int fd) {
    char text[8];
    ssize_t n = pread(fd, text, sizeof text, 0);
    if (n <= 0) return -1;
    return text[0] == '1' ? 1 : text[0] == '0' ? 0 : -1;
}

// Returns what the reply says; *set is 1 when this freeze must put the knob back.
static const char *rcu_expedite_begin(int asked, int *set) {
    *set = 0;
    if (!asked) return "not-asked";
    if (rcu_expedited_fd < 0) return "unavailable";
    flock(rcu_expedited_fd, LOCK_EX);
    const char *word;
    int value = read_flag(rcu_expedited_fd);
    if (rcu_normal_fd >= 0 && read_flag(rcu_normal_fd) == 1) {
        word = "normal";
    } else if (value == 0) {
        if (pwrite(rcu_expedited_fd, "1", 1, 0) == 1) {
            if (rcu_normal_fd >= 0) flock(rcu_normal_fd, LOCK_SH);
            *set = 1;
            word = "expedited";
        } else {
            word = "unavailable";
        }
    } else if (value == 1) {
        if (rcu_normal_fd >= 0 && flock(rcu_normal_fd, LOCK_EX | LOCK_NB) != 0) {
            // Another guard set it and is still freezing: rely on it too, and count.
            flock(rcu_normal_fd, LOCK_SH);
            *set = 1;
            word = "expedited";
        } else {
            if (rcu_normal_fd >= 0) flock(rcu_normal_fd, LOCK_UN);
            word = "already";
        }
    } else {
        word = "unavailable";
    }
    flock(rcu_expedited_fd, LOCK_UN);
    return word;
}

static void rcu_expedite_end(int set) {
    if (!set) return;
    flock(rcu_expedited_fd, LOCK_EX);
    // The last guard relying on it turns it off (taking the lock exclusively means nobody else holds it).
    if (rcu_normal_fd < 0 || flock(rcu_normal_fd, LOCK_EX | LOCK_NB) == 0) (void)!pwrite(rcu_expedited_fd, "0", 1, 0);
    if (rcu_normal_fd >= 0) flock(rcu_normal_fd, LOCK_UN);
    flock(rcu_expedited_fd, LOCK_UN);
}

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

// One ioctl (FIFREEZE or FITHAW), or one syncfs, on one descriptor.
struct job {
    int fd;
    unsigned long request;  // FIFREEZE, FITHAW, or 0 for syncfs
    int ok;
    int error;
    uint64_t elapsed_ns;
    uint64_t end_ns;
};

static void *run_job(void *arg) {
    struct job *job = arg;
    uint64_t begin = now_ns();
    if (job->request == 0) {
        job->ok = syncfs(job->fd) == 0;
    } else {
        job->ok = ioctl(job->fd, job->request, 0) == 0;
    }
    job->error = job->ok ? 0 : errno;
    job->end_ns = now_ns();
    job->elapsed_ns = job->end_ns - begin;
    return NULL;
}

// Runs the jobs at once and returns when all have: job 0 on this thread, each
// other on a thread of its own, started beforehand and held at a gate, so that no
// thread is created between the gate opening (stamped in *opened_ns, when given)
// and the jobs' start: that moment begins the frozen window. A thread that cannot
// be started runs its job here instead, after job 0: slower, never skipped.
struct gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int arrived;
    int open;
};
struct gated {
    struct job *job;
    struct gate *gate;
};

static void *run_gated(void *arg) {
    struct gated *g = arg;
    pthread_mutex_lock(&g->gate->lock);
    g->gate->arrived++;
    pthread_cond_broadcast(&g->gate->cond);
    while (!g->gate->open) pthread_cond_wait(&g->gate->cond, &g->gate->lock);
    pthread_mutex_unlock(&g->gate->lock);
    return run_job(g->job);
}

static void run_together(struct job *jobs, int n, uint64_t *opened_ns) {
    pthread_t threads[MAX_MOUNTS];
    int started[MAX_MOUNTS] = {0};
    struct gated gated[MAX_MOUNTS];
    struct gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    int workers = 0;
    // Small stacks: all the guard's memory is locked (mlockall MCL_FUTURE).
    pthread_attr_t attr;
    int have_attr = n > 1 && pthread_attr_init(&attr) == 0;
    if (have_attr) pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 1; i < n && have_attr; i++) {
        gated[i] = (struct gated){.job = &jobs[i], .gate = &gate};
        started[i] = pthread_create(&threads[i], &attr, run_gated, &gated[i]) == 0;
        workers += started[i];
    }
    if (have_attr) pthread_attr_destroy(&attr);
    pthread_mutex_lock(&gate.lock);
    while (gate.arrived < workers) pthread_cond_wait(&gate.cond, &gate.lock);
    if (opened_ns) *opened_ns = now_ns();
    gate.open = 1;
    pthread_cond_broadcast(&gate.cond);
    pthread_mutex_unlock(&gate.lock);
    if (n > 0) run_job(&jobs[0]);
    for (int i = 1; i < n; i++) {
        if (!started[i]) run_job(&jobs[i]);
    }
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(threads[i], NULL);
    }
}

// Thaws every mount this freeze froze, last frozen first (the independent
// group last), and reports how.
static void thaw_all(const char *cause) {
    if (!current.active) return;
    char reply[MAX_PACKET];
    int thawed[MAX_MOUNTS];
    int errors[MAX_MOUNTS];
    uint64_t last_thaw = 0;
    for (int i = current.count - 1; i >= 0; i--) {
        thawed[i] = 0;
        errors[i] = 0;
        if (i < current.concurrent || !current.frozen[i]) continue;
        struct job job = {.fd = current.fds[i], .request = FITHAW};
        run_job(&job);
        thawed[i] = job.ok;
        errors[i] = job.error;
        last_thaw = job.end_ns;
        current.frozen[i] = 0;
    }
    // The independent group one after the other on this thread: a FITHAW takes
    // microseconds, less than starting a thread for it would add to the window.
    for (int i = (current.concurrent < current.count ? current.concurrent : current.count) - 1; i >= 0; i--) {
        if (!current.frozen[i]) continue;
        struct job job = {.fd = current.fds[i], .request = FITHAW};
        run_job(&job);
        thawed[i] = job.ok;
        errors[i] = job.error;
        if (job.end_ns > last_thaw) last_thaw = job.end_ns;
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
    int concurrent = 1;
    int expedite = 0;
    char reply[MAX_PACKET];
    int fields = sscanf(args, "%127s %u %d %d %d", id, &budget_ms, &use_syncfs, &concurrent, &expedite);
    if (fields < 3 || nfds <= 0 || concurrent < 1 || concurrent > nfds || (expedite != 0 && expedite != 1)) {
        snprintf(reply, sizeof reply, "ERROR - bad-request expected \"FREEZE <id> <budget_ms> <syncfs> [<concurrent> 1..%d [<expedite 0|1>]]\" with descriptors, found \"%.200s\" with %d", nfds, args, nfds);
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
    current.concurrent = concurrent;
    current.budget_ms = budget_ms;
    current.active = 1;
    uint64_t syncfs_us[MAX_MOUNTS] = {0}, freeze_us[MAX_MOUNTS] = {0};
    int errors[MAX_MOUNTS] = {0};
    int all = 1;
    for (int i = 0; i < nfds; i++) current.fds[i] = fds[i];

    // The independent group: synced together, then frozen together. The
    // budget counts from the moment the first FIFREEZE is issued.
    struct job jobs[MAX_MOUNTS];
    memset(jobs, 0, sizeof jobs);
    for (int i = 0; i < concurrent; i++) jobs[i].fd = fds[i];
    if (use_syncfs) {
        run_together(jobs, concurrent, NULL);
        for (int i = 0; i < concurrent; i++) syncfs_us[i] = jobs[i].elapsed_ns / 1000;
    }
    for (int i = 0; i < concurrent; i++) jobs[i].request = FIFREEZE;
    int rcu_set = 0;
    const char *rcu = rcu_expedite_begin(expedite, &rcu_set);
    run_together(jobs, concurrent, &current.first_freeze_ns);
    current.deadline_ns = current.first_freeze_ns + (uint64_t)budget_ms * 1000000ull;
    for (int i = 0; i < concurrent; i++) {
        current.frozen[i] = jobs[i].ok;
        errors[i] = jobs[i].error;
        freeze_us[i] = jobs[i].elapsed_ns / 1000;
        if (!jobs[i].ok) all = 0;
    }
    // The rest, one by one: each synced just before it is frozen.
    for (int i = concurrent; i < nfds && all; i++) {
        struct job job = {.fd = fds[i]};
        if (use_syncfs) {
            run_job(&job);
            syncfs_us[i] = job.elapsed_ns / 1000;
        }
        job.request = FIFREEZE;
        run_job(&job);
        current.frozen[i] = job.ok;
        errors[i] = job.error;
        freeze_us[i] = job.elapsed_ns / 1000;
        if (!job.ok) all = 0;
    }
    rcu_expedite_end(rcu_set);
    int n = snprintf(reply, sizeof reply, "FROZEN %s %d %u %d %s", id, all, budget_ms, nfds, rcu);
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
    // Ahead of the guest's own work when it wakes: a FIFREEZE or FITHAW delayed behind a
    // busy application is a longer freeze for that application. It runs for milliseconds
    // per backup, so it takes nothing from anyone the rest of the time. Best effort (root).
    (void)!setpriority(PRIO_PROCESS, 0, -10);
    // QUIESCE_GUARD_RCU_DIR points the guard at other files than /sys/kernel's
    // (tests: the real knob is one for the whole machine).
    const char *rcu_dir = getenv("QUIESCE_GUARD_RCU_DIR");
    char rcu_path[512];
    snprintf(rcu_path, sizeof rcu_path, "%s/rcu_expedited", rcu_dir ? rcu_dir : "/sys/kernel");
    rcu_expedited_fd = open(rcu_path, O_RDWR | O_CLOEXEC);
    snprintf(rcu_path, sizeof rcu_path, "%s/rcu_normal", rcu_dir ? rcu_dir : "/sys/kernel");
    rcu_normal_fd = open(rcu_path, O_RDONLY | O_CLOEXEC);
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
