// quiesce-reference-agent: the smallest possible freeze agent, for
// bench-freeze's reference rows only (it is not part of the product).
//
// It answers one client on a unix socket with one byte per request and one per
// reply — no TLS, no HTTP/2, no gRPC, no protobuf, no Swift runtime — so its
// rows show what the process hops themselves cost on this machine:
//
//   quiesce-reference-agent --socket PATH --mount DIR
//       FIFREEZE/FITHAW in this process (qemu-guest-agent's shape, minus JSON).
//   quiesce-reference-agent --socket PATH --mount DIR --guard PATH
//       the real quiesce-thaw-guard issues them, asked over its socketpair with
//       the descriptor passed by SCM_RIGHTS, exactly as quiesce-agent does it
//       (Quiesce's shape, minus the engine link).
//
// Requests: 'F' freeze, 'T' thaw. Replies: 'F' frozen, 'T' thawed, 'E' failed
// (then a text line on stderr says why). Safety: it freezes only --mount; the
// freeze is thawed when the client goes away, after 2 s frozen, or on SIGTERM
// or SIGINT; with --guard the guard also thaws when this process dies.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static int mount_fd = -1;
static int guard_sock = -1;
static volatile sig_atomic_t frozen = 0;
static unsigned long freeze_count = 0;

static void usage(void) {
    fprintf(stderr, "usage: quiesce-reference-agent --socket PATH --mount DIR [--guard PATH-TO-quiesce-thaw-guard]\n");
    exit(2);
}

// In-process mode only: the guard thaws on its own when we die.
static void on_signal(int sig) {
    (void)sig;
    if (frozen && guard_sock < 0) ioctl(mount_fd, FITHAW, 0);
    _exit(1);
}

static int guard_send(const char *text, int pass_fd) {
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    char control[CMSG_SPACE(sizeof(int))];
    if (pass_fd >= 0) {
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &pass_fd, sizeof(int));
    }
    ssize_t n;
    do { n = sendmsg(guard_sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -1 : 0;
}

// Reads one packet from the guard; returns its first word's match with `want`.
static int guard_expect(const char *want, char *packet, size_t size) {
    ssize_t n;
    do { n = recv(guard_sock, packet, size - 1, 0); } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        fprintf(stderr, "quiesce-reference-agent: the guard is gone\n");
        return -1;
    }
    packet[n] = 0;
    if (strncmp(packet, want, strlen(want)) != 0) {
        fprintf(stderr, "quiesce-reference-agent: expected %s from the guard, got: %s\n", want, packet);
        return -1;
    }
    return 0;
}

static int do_freeze(void) {
    if (guard_sock < 0) {
        if (ioctl(mount_fd, FIFREEZE, 0) != 0) {
            fprintf(stderr, "quiesce-reference-agent: FIFREEZE: %s\n", strerror(errno));
            return -1;
        }
        frozen = 1;
        return 0;
    }
    char text[128], packet[1024];
    snprintf(text, sizeof text, "FREEZE ref-%lu 2000 0 1", ++freeze_count);
    if (guard_send(text, mount_fd) != 0 || guard_expect("FROZEN", packet, sizeof packet) != 0) return -1;
    // "FROZEN <id> <all> ...": all must be 1.
    char id[64];
    int all = 0;
    if (sscanf(packet, "FROZEN %63s %d", id, &all) != 2 || all != 1) {
        fprintf(stderr, "quiesce-reference-agent: the guard did not freeze: %s\n", packet);
        return -1;
    }
    frozen = 1;
    return 0;
}

static int do_thaw(void) {
    if (!frozen) return -1;
    frozen = 0;
    if (guard_sock < 0) {
        if (ioctl(mount_fd, FITHAW, 0) != 0) {
            fprintf(stderr, "quiesce-reference-agent: FITHAW: %s\n", strerror(errno));
            return -1;
        }
        return 0;
    }
    char text[128], packet[1024];
    snprintf(text, sizeof text, "THAW ref-%lu command", freeze_count);
    if (guard_send(text, -1) != 0 || guard_expect("THAWED", packet, sizeof packet) != 0) return -1;
    return 0;
}

static int start_guard(const char *path) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return -1;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, pair[1], 3);  // dup2 clears FD_CLOEXEC on 3
    char *argv[] = {(char *)path, "3", NULL};
    pid_t pid;
    int rc = posix_spawn(&pid, path, &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(pair[1]);
    if (rc != 0) {
        fprintf(stderr, "quiesce-reference-agent: cannot start %s: %s\n", path, strerror(rc));
        return -1;
    }
    guard_sock = pair[0];
    char packet[256];
    return guard_expect("READY", packet, sizeof packet);
}

int main(int argc, char **argv) {
    const char *socket_path = NULL, *mount = NULL, *guard = NULL;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--socket") == 0) socket_path = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--mount") == 0) mount = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--guard") == 0) guard = argv[++i];
        else usage();
    }
    if (!socket_path || !mount) usage();
    mount_fd = open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (mount_fd < 0) {
        fprintf(stderr, "quiesce-reference-agent: cannot open %s: %s\n", mount, strerror(errno));
        return 1;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    if (guard && start_guard(guard) != 0) return 1;

    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof address.sun_path) {
        fprintf(stderr, "quiesce-reference-agent: socket path too long: %s\n", socket_path);
        return 1;
    }
    strcpy(address.sun_path, socket_path);
    unlink(socket_path);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 1) != 0) {
        fprintf(stderr, "quiesce-reference-agent: cannot listen on %s: %s\n", socket_path, strerror(errno));
        return 1;
    }
    int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (client < 0) return 1;
    close(listener);
    unlink(socket_path);

    for (;;) {
        // While frozen, wait at most 2 s for the thaw.
        struct pollfd waiting = {.fd = client, .events = POLLIN};
        int ready = poll(&waiting, 1, frozen ? 2000 : -1);
        if (ready < 0 && errno == EINTR) continue;
        if (ready == 0) {
            fprintf(stderr, "quiesce-reference-agent: no thaw within 2 s; thawing\n");
            do_thaw();
            continue;
        }
        char request;
        ssize_t n = read(client, &request, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        char reply = 'E';
        if (request == 'F' && !frozen) reply = do_freeze() == 0 ? 'F' : 'E';
        else if (request == 'T') reply = do_thaw() == 0 ? 'T' : 'E';
        if (write(client, &reply, 1) != 1) break;
    }
    if (frozen) do_thaw();
    return 0;
}
