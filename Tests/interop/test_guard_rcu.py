"""quiesce-thaw-guard expedites RCU grace periods for its FIFREEZEs only.

FIFREEZE of an idle filesystem costs grace periods (freeze_super's three
percpu write locks), tens of milliseconds on a quiet VM; the guard sets
/sys/kernel/rcu_expedited for the ioctls and puts it back before it answers.
The real knob is one for the whole machine (other tests freeze meanwhile), so
these tests point the guard at files of their own with QUIESCE_GUARD_RCU_DIR,
driving it over its real socket protocol with a real loop-mounted ext4.
Root only (loop devices, FIFREEZE); everything is thawed and unmounted after."""
import array
import os
import socket
import subprocess

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and FIFREEZE")


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def mount(tmp_path):
    img = tmp_path / "disk.img"
    sh("truncate", "-s", "64M", str(img))
    sh("mkfs.ext4", "-q", "-F", str(img))
    dev = sh("losetup", "--find", "--show", str(img))
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        sh("mount", dev, str(point))
        yield str(point)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(point)], capture_output=True)
        subprocess.run(["umount", str(point)])
        subprocess.run(["losetup", "-d", dev])


class Guard:
    def __init__(self, bin_dir, rcu_dir):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.pop("QUIESCE_GUARD_RCU_DIR", None)
        if rcu_dir is not None:
            env["QUIESCE_GUARD_RCU_DIR"] = str(rcu_dir)
        self.proc = subprocess.Popen([os.path.join(bin_dir, "quiesce-thaw-guard"), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.sock = ours
        self.sock.settimeout(10)
        assert self.recv().startswith("READY ")

    def recv(self):
        return self.sock.recv(8192).decode()

    def freeze(self, fid, path, expedite):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.sock.sendmsg([f"FREEZE {fid} 5000 0 1 {expedite}".encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
        return self.recv()

    def thaw(self, fid):
        self.sock.send(f"THAW {fid} command".encode())
        return self.recv()

    def close(self):
        self.sock.close()  # end-of-file: the guard thaws anything left and exits
        self.proc.wait(timeout=10)


def knobs(tmp_path, expedited, normal):
    d = tmp_path / "rcu"
    d.mkdir(exist_ok=True)
    (d / "rcu_expedited").write_text(f"{expedited}\n")
    (d / "rcu_normal").write_text(f"{normal}\n")
    return d


def head(reply):
    return reply.split("\n")[0].split(" ")


def test_expedites_for_the_freeze_and_puts_the_knob_back(bin_dir, tmp_path, mount):
    d = knobs(tmp_path, 0, 0)
    guard = Guard(bin_dir, d)
    try:
        reply = guard.freeze("f1", mount, 1)
        assert head(reply)[:3] == ["FROZEN", "f1", "1"] and head(reply)[5] == "expedited", reply
        # Put back before the guard answered: nothing stays expedited while frozen.
        assert (d / "rcu_expedited").read_text() == "0\n"
        assert guard.thaw("f1").startswith("THAWED f1 command ")
    finally:
        guard.close()


def test_leaves_the_knob_alone_when_set_already_or_rcu_normal_or_not_asked(bin_dir, tmp_path, mount):
    for expedited, normal, ask, word in ((1, 0, 1, "already"), (0, 1, 1, "normal"), (0, 0, 0, "not-asked")):
        d = knobs(tmp_path, expedited, normal)
        guard = Guard(bin_dir, d)
        try:
            reply = guard.freeze("f2", mount, ask)
            assert head(reply)[5] == word, (expedited, normal, ask, reply)
            assert (d / "rcu_expedited").read_text() == f"{expedited}\n"
            assert guard.thaw("f2").startswith("THAWED f2 command ")
        finally:
            guard.close()


def test_no_knob_is_not_an_error(bin_dir, tmp_path, mount):
    guard = Guard(bin_dir, tmp_path / "no-such-dir")
    try:
        reply = guard.freeze("f3", mount, 1)
        assert head(reply)[:3] == ["FROZEN", "f3", "1"] and head(reply)[5] == "unavailable", reply
        assert guard.thaw("f3").startswith("THAWED f3 command ")
    finally:
        guard.close()


def test_bad_expedite_value_is_refused(bin_dir, tmp_path, mount):
    guard = Guard(bin_dir, knobs(tmp_path, 0, 0))
    try:
        reply = guard.freeze("f4", mount, 7)
        assert reply.startswith("ERROR - bad-request expected \"FREEZE <id> <budget_ms> <syncfs> [<concurrent> 1..1 [<expedite 0|1>]]\""), reply
    finally:
        guard.close()


def test_guards_on_one_kernel_share_the_knob_and_the_last_one_out_turns_it_off(bin_dir, tmp_path, mount):
    """Another guard is in its FIFREEZEs (it set the knob and holds its shared lock on rcu_normal, as
    the guard does): this guard relies on the 1 too and leaves it on when it finishes, for the other
    to turn off. Without the count, the first guard out turned it off under the other's feet."""
    import fcntl
    d = knobs(tmp_path, 1, 0)
    other = os.open(d / "rcu_normal", os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_SH)
    guard = Guard(bin_dir, d)
    try:
        reply = guard.freeze("f5", mount, 1)
        assert head(reply)[5] == "expedited", reply
        assert (d / "rcu_expedited").read_text() == "1\n", "turned off while another guard still relies on it"
        assert guard.thaw("f5").startswith("THAWED f5 command ")
        # The other guard gone (its lock with it): the next freeze finds an administrator's 1 and leaves it.
        fcntl.flock(other, fcntl.LOCK_UN)
        reply = guard.freeze("f6", mount, 1)
        assert head(reply)[5] == "already" and (d / "rcu_expedited").read_text() == "1\n", reply
        assert guard.thaw("f6").startswith("THAWED f6 command ")
    finally:
        os.close(other)
        guard.close()
