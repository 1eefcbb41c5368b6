#!/usr/bin/env python3
"""One instance with two disks backed up through the product as an operator
runs it — `quiesce backup` and a real `quiesce-agent` process over mutual TLS —
side by side with the raw floor on the same two disks in the same run.

  raw floor:   in this process, FIFREEZE both mounts, FICLONE both images, FITHAW
               both (nothing else: sources and targets are opened before, as the
               local provider arms its create); with the kernel's normal RCU grace periods and
               with them expedited (/sys/kernel/rcu_expedited, as the thaw guard does)
  one-shot:    `quiesce backup --fleet` (engine in the process) a few times: the
               frozen window and how long the run waited for the agent to dial in
  via engine:  `quiesce serve` + `quiesce backup --engine` N times

FROZEN is what the application feels: first FIFREEZE -> last FITHAW, measured on
the guest (the thaw reply's frozen_us; for the floor, this process's clock).
Called by scripts/bench-fleet.sh with the pool mount and the build's bin dir.
"""
import argparse
import fcntl
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

FIFREEZE, FITHAW, FICLONE = 0xC0045877, 0xC0045878, 0x40049409
RCU = "/sys/kernel/rcu_expedited"


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def pct(values, p):
    """Nearest rank: the smallest value with at least p of the samples at or below it."""
    s = sorted(values)
    return s[max(0, int(-(-len(s) * p // 1)) - 1)] if s else float("nan")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Floor:
    """FIFREEZE all, FICLONE all, FITHAW all in this process: one window per call, in ms."""

    def __init__(self, mounts, images, scratch):
        self.fds = [os.open(m, os.O_RDONLY | os.O_DIRECTORY) for m in mounts]
        self.images, self.scratch, self.count = images, scratch, 0
        self.rcu = os.open(RCU, os.O_RDWR) if os.path.exists(RCU) else None

    def window(self, expedite):
        if expedite and self.rcu is None:
            raise SystemExit(f"bench: {RCU} is missing; no expedited floor on this kernel")
        self.count += 1
        # Sources open and targets made before the window, as the local provider arms its create:
        # inside it, the FICLONEs alone.
        clones = [f"{self.scratch}/floor-{self.count}-{j}.img" for j in range(len(self.images))]
        pairs = [(os.open(image, os.O_RDONLY), os.open(clone, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
                 for image, clone in zip(self.images, clones)]
        set_rcu = expedite and os.pread(self.rcu, 4, 0)[:1] == b"0"
        t0 = time.perf_counter()
        if set_rcu:
            os.pwrite(self.rcu, b"1", 0)
        try:
            for fd in self.fds:
                fcntl.ioctl(fd, FIFREEZE, 0)
        finally:
            if set_rcu:
                os.pwrite(self.rcu, b"0", 0)
        try:
            for src, dst in pairs:
                fcntl.ioctl(dst, FICLONE, src)
        finally:
            for fd in reversed(self.fds):
                fcntl.ioctl(fd, FITHAW, 0)
        window = (time.perf_counter() - t0) * 1000
        for pair in pairs:
            for fd in pair:
                os.close(fd)
        for c in clones:
            os.unlink(c)
        return window

    def close(self):
        for fd in self.fds + ([self.rcu] if self.rcu is not None else []):
            os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="a directory on XFS with reflink")
    ap.add_argument("--bin", required=True, help="the build's bin directory (quiesce, quiesce-agent)")
    ap.add_argument("--runs", type=int, default=100, help="windows per row")
    ap.add_argument("--one-shot", type=int, default=5, help="one-shot `quiesce backup` runs")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between windows (the floor's too)")
    args = ap.parse_args()

    w = os.path.join(args.pool, f"bench-cli-{os.getpid()}")
    os.makedirs(w)
    q, qa = os.path.join(args.bin, "quiesce"), os.path.join(args.bin, "quiesce-agent")
    mounts, loops, procs = [], [], []
    try:
        disks = os.path.join(w, "pool", "disks")
        os.makedirs(disks)
        images = []
        for d in ("a", "b"):
            img = os.path.join(disks, f"cli-1-{d}.img")
            sh("truncate", "-s", "16M", img)
            sh("mkfs.ext4", "-q", "-F", img)
            dev = sh("losetup", "--find", "--show", "--direct-io=on", img)
            loops.append(dev)
            m = os.path.join(w, f"mnt-{d}")
            os.makedirs(m)
            sh("mount", dev, m)
            mounts.append(m)
            images.append(img)
        sh(q, "ca", "init", "--dir", f"{w}/ca", "--ip", "127.0.0.1")
        sh(q, "ca", "issue", "--dir", f"{w}/ca", "--agent", "cli-1")
        hooks = os.path.join(w, "hooks")
        os.makedirs(hooks, mode=0o700)
        port = free_port()
        with open(f"{w}/fleet.yaml", "w") as f:
            f.write(f"providers:\n  pool: {{ kind: local, pool: {w}/pool, burst: 20, per_second: 50 }}\n"
                    "policies:\n  fs: { plugin: linux-freeze, wanted: filesystem, minimum: crash }\n"
                    f"instances:\n  - {{ id: cli-1, policy: fs, disks: [cli-1-a, cli-1-b], options: {{ only_mounts: [{mounts[0]}, {mounts[1]}] }} }}\n"
                    "run: { agent_wait_s: 30 }\n")
        common = ["--ca-dir", f"{w}/ca", "--catalog", f"{w}/catalog.db", "--admin-socket", f"{w}/admin.sock"]
        agent = subprocess.Popen(
            [qa, "run", "--engine", f"127.0.0.1:{port}", "--cert", f"{w}/ca/agents/cli-1.pem", "--key", f"{w}/ca/agents/cli-1.key",
             "--ca", f"{w}/ca/ca.pem", "--prescript", f"{hooks}/pre.sh", "--postscript", f"{hooks}/post.sh", "--hook-dir", hooks,
             "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(agent)

        def frozen_of(out):
            """The frozen window (ms) and the agent wait (ms) from a run's JSON lines."""
            frozen = wait = None
            for line in out.splitlines():
                event = json.loads(line)
                if event.get("event") == "finished":
                    if event.get("achieved") != "filesystem":
                        raise SystemExit(f"bench: expected a filesystem-consistent group, found {line}")
                    frozen = event.get("frozen_ms")
                elif event.get("event") == "report":
                    wait = event.get("agent_wait_ms", 0)
            if frozen is None:
                raise SystemExit(f"bench: no frozen window in the run's output:\n{out}")
            return float(frozen), float(wait or 0)

        # One-shot runs: each starts an engine, waits for the agent to dial in, backs up, stops.
        oneshot, waits = [], []
        for i in range(args.one_shot):
            r = subprocess.run([q, "backup", "--fleet", f"{w}/fleet.yaml", "--listen", f"127.0.0.1:{port}", "--output", "json",
                                "--run-id", f"oneshot-{i}", *common], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise SystemExit(f"bench: quiesce backup exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
            frozen, wait = frozen_of(r.stdout)
            oneshot.append(frozen)
            waits.append(wait)
            time.sleep(args.pause)

        # Through a running engine.
        serve = subprocess.Popen([q, "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "error", *common],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(serve)
        line = serve.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"bench: quiesce serve did not start: {line}")
        # The floor's windows and the product's alternate, so both rows meet the same moments of this noisy machine.
        raw = Floor(mounts, images, os.path.join(w, "pool"))
        engine, expedited = [], []
        for i in range(args.runs):
            time.sleep(args.pause)
            expedited.append(raw.window(True))
            time.sleep(args.pause)
            r = subprocess.run([q, "backup", "--engine", "--fleet", f"{w}/fleet.yaml", "--output", "json", "--run-id", f"engine-{i}",
                                "--admin-socket", f"{w}/admin.sock"], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise SystemExit(f"bench: quiesce backup --engine exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
            engine.append(frozen_of(r.stdout)[0])

        normal = []
        for i in range(max(5, args.runs // 4)):
            time.sleep(args.pause)  # as far apart as the product's windows: a grace period from a recent freeze is not reused
            normal.append(raw.window(False))
        raw.close()

        rows = [("raw floor, normal RCU grace periods", normal), ("raw floor, RCU expedited (as the guard)", expedited),
                ("quiesce backup --engine + quiesce-agent", engine), ("quiesce backup (one-shot) + quiesce-agent", oneshot)]
        print(f"{'ONE INSTANCE, TWO DISKS':44} {'RUNS':>5} {'FROZEN P50':>11} {'P99':>9} {'MAX':>9}")
        for name, v in rows:
            print(f"{name:44} {len(v):>5} {pct(v, .5):>8.2f} ms {pct(v, .99):>6.2f} ms {max(v):>6.2f} ms")
        print(f"one-shot runs waited for the agent to dial in: p50 {pct(waits, .5) / 1000:.2f} s, max {max(waits) / 1000:.2f} s "
              f"(quiesce-agent --reconnect-max-known, default 2 s)")
        # Where the product's window goes, from the catalog (engine clock; .agent: the agent's share; .kernel: the guard's FIFREEZE).
        import sqlite3
        db = sqlite3.connect(f"{w}/catalog.db")
        steps = {}
        for (timings,) in db.execute("SELECT step_timings_us FROM snapshot_groups WHERE run_id LIKE 'engine-%'"):
            for step, us in json.loads(timings).items():
                steps.setdefault(step, []).append(us / 1000)
        db.close()
        order = ["freeze", "freeze.agent", "freeze.kernel", "snapshot", "thaw", "thaw.agent"]
        print("quiesce backup --engine, p50 / p99 ms: " + ", ".join(
            f"{k} {pct(steps[k], .5):.2f} / {pct(steps[k], .99):.2f}" for k in order if k in steps))
        f50, f99 = pct(expedited, .5), pct(expedited, .99)
        p50, p99 = pct(engine, .5), pct(engine, .99)
        targets = [("frozen p50 <= floor p50 + 1 ms", p50, f50 + 1), ("frozen p99 <= floor p99 + 2 ms", p99, f99 + 2)]
        print(f"\n{'TARGET (quiesce backup --engine, real agent)':44} {'FIGURE':>9} {'TARGET':>11} MET")
        for name, figure, bound in targets:
            print(f"{name:44} {figure:>6.2f} ms {'<= %.2f' % bound:>8} ms {'yes' if figure <= bound else 'NO'}")
        print(json.dumps({"bench": "backup-cli", "floor_p50": f50, "floor_p99": f99, "frozen_p50": p50, "frozen_p99": p99,
                          "normal_floor_p50": pct(normal, .5), "oneshot_wait_p50_ms": pct(waits, .5)}))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for m in mounts:
            subprocess.run(["umount", m])
        for dev in loops:
            subprocess.run(["losetup", "-d", dev])
        subprocess.run(["rm", "-rf", w])


if __name__ == "__main__":
    main()
