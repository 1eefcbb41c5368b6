#!/usr/bin/env python3
"""What each consistency level gives a MariaDB, shown end to end as a user runs
it (root; called by scripts/prove-mariadb.sh, which builds first).

An XFS reflink pool on a loop device; MariaDB's data directory on a
loop-mounted ext4 disk of that pool, with the binary log on; a writer that never
stops (single-row InnoDB INSERTs with a counter, a MyISAM pair of tables that
one statement updates together, an Aria table); a real quiesce-agent with
examples/mariadb/hold in its hook directory. Then `quiesce backup` (one-shot)
with a crash, a filesystem and two application policies (the mariadb plugin,
BACKUP STAGE and FTWRL), `quiesce restore --as-new` for each group, and a
second MariaDB started on each restored disk (MyISAM tables not repaired on
open). One row per level: the application's stall and the frozen window, CHECK
TABLE of every table, whether the MyISAM pair is equal, what InnoDB's recovery
did, and the restored counter against the marker recorded under the lock.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ["app.counter", "app.pair_a", "app.pair_b", "app.log"]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A mariadbd on a data directory, listening only on a unix socket."""

    def __init__(self, datadir, rundir, install=False, extra=()):
        os.makedirs(rundir, exist_ok=True)
        self.sock, self.err = f"{rundir}/mysql.sock", f"{rundir}/mysql.err"
        self.cnf = f"{rundir}/client.cnf"
        with open(self.cnf, "w") as f:
            f.write(f"[client]\nsocket={self.sock}\nuser=root\n")
        os.chmod(self.cnf, 0o600)
        # A tmpdir of its own: a bootstrap clears the #sql temporary files in its tmpdir.
        os.makedirs(f"{rundir}/tmp", exist_ok=True)
        if install:
            sh("mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
               "--auth-root-authentication-method=socket", "--skip-test-db", f"--tmpdir={rundir}/tmp")
        self.proc = subprocess.Popen(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={self.sock}", "--skip-networking",
             "--user=root", f"--pid-file={rundir}/mysql.pid", f"--log-error={self.err}", f"--tmpdir={rundir}/tmp", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            if self.proc.poll() is not None:
                raise SystemExit(f"prove: mariadbd on {datadir} exited at start:\n{self.log()}")
            if subprocess.run(self.client("SELECT 1"), capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit(f"prove: mariadbd on {datadir} did not answer within 30 s:\n{self.log()}")

    def client(self, sql):
        return ["mariadb", f"--defaults-extra-file={self.cnf}", "--batch", "--skip-column-names", "-e", sql]

    def query(self, sql):
        r = subprocess.run(self.client(sql), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip())
        return r.stdout.strip()

    def log(self):
        try:
            with open(self.err) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the build's bin directory")
    ap.add_argument("--write-seconds", type=float, default=2.0, help="how long the writer runs before the first backup")
    ap.add_argument("--idle-runs", type=int, default=20, help="application runs per mode on the idle database")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("prove: needs root (loop devices, mount, FIFREEZE)")
    q, qa = os.path.join(args.bin, "quiesce"), os.path.join(args.bin, "quiesce-agent")
    # The pool on this machine's disk by default (a database's disk is a disk); POOL_ON=ram puts it in /dev/shm.
    base = {"disk": "/var/tmp", "ram": "/dev/shm"}.get(os.environ.get("POOL_ON", "disk"))
    if base is None:
        raise SystemExit(f"prove: POOL_ON: expected disk or ram, found {os.environ.get('POOL_ON')!r}")
    w = tempfile.mkdtemp(prefix="quiesce-prove-", dir=base)
    mounts, procs, servers = [], [], []

    def mount(image, point):
        # Direct I/O, as a VM's disk with cache=none: the guest's writes reach the image at once,
        # not a page cache on the host that the provider's clone would have to write back first.
        dev = sh("losetup", "--find", "--show", "--direct-io=on", image)
        os.makedirs(point, exist_ok=True)
        try:
            sh("mount", dev, point)
        except subprocess.CalledProcessError:
            subprocess.run(["losetup", "-d", dev])
            raise
        mounts.append((point, dev))
        return point

    def unmount(point):
        for entry in [m for m in mounts if m[0] == point]:
            subprocess.run(["umount", entry[0]])
            subprocess.run(["losetup", "-d", entry[1]])
            mounts.remove(entry)

    try:
        # The pool and the database's disk in it.
        sh("truncate", "-s", "1500M", f"{w}/pool.img")
        sh("mkfs.xfs", "-q", "-m", "reflink=1", f"{w}/pool.img")
        pool = mount(f"{w}/pool.img", f"{w}/pool")
        os.makedirs(f"{pool}/q/disks")
        disk = f"{pool}/q/disks/db-1-data.img"
        sh("truncate", "-s", "512M", disk)
        sh("mkfs.ext4", "-q", "-F", disk)
        data = mount(disk, f"{w}/db")
        print(f"prove: pool {pool}, MariaDB's data on {data} (ext4 image in the pool), work directory {w}", file=sys.stderr)
        server = Server(f"{data}/data", f"{w}/run", install=True, extra=["--log-bin=binlog", "--server-id=1"])
        servers.append(server)
        server.query("""
            CREATE DATABASE app;
            CREATE TABLE app.counter (n INT PRIMARY KEY) ENGINE=InnoDB;
            CREATE TABLE app.pair_a (id INT PRIMARY KEY, n INT, pad VARCHAR(200)) ENGINE=MyISAM;
            CREATE TABLE app.pair_b (id INT PRIMARY KEY, n INT, pad VARCHAR(200)) ENGINE=MyISAM;
            CREATE TABLE app.log (n INT, pad VARCHAR(200)) ENGINE=Aria;
            INSERT INTO app.pair_a VALUES (1, 0, ''); INSERT INTO app.pair_b VALUES (1, 0, '');""")
        server.query("""DELIMITER //
            CREATE PROCEDURE app.work(IN rounds INT)
            BEGIN
              DECLARE i INT DEFAULT 0;
              WHILE i < rounds DO
                SET i = i + 1;
                INSERT INTO app.counter VALUES (i);
                UPDATE app.pair_a a JOIN app.pair_b b ON a.id = b.id SET a.n = i, b.n = i,
                  a.pad = REPEAT('a', i % 200), b.pad = REPEAT('b', i % 200);
                INSERT INTO app.log VALUES (i, REPEAT('x', 100));
              END WHILE;
            END //""")
        server.query("INSERT INTO app.counter VALUES (0)")

        # The agent, with the hold hook in its hook directory.
        hooks = f"{w}/hooks"
        os.makedirs(hooks, mode=0o700)
        shutil.copyfile(f"{ROOT}/examples/mariadb/hold", f"{hooks}/mariadb-hold")
        os.chmod(f"{hooks}/mariadb-hold", 0o700)
        sh(q, "ca", "init", "--dir", f"{w}/ca", "--ip", "127.0.0.1")
        sh(q, "ca", "issue", "--dir", f"{w}/ca", "--agent", "db-1")
        port = free_port()
        agent = subprocess.Popen(
            [qa, "run", "--engine", f"127.0.0.1:{port}", "--cert", f"{w}/ca/agents/db-1.pem", "--key", f"{w}/ca/agents/db-1.key",
             "--ca", f"{w}/ca/ca.pem", "--hook-dir", hooks, "--prescript", f"{hooks}/no-prescript",
             "--postscript", f"{hooks}/no-postscript", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(agent)

        def pct(values, p):
            s = sorted(values)
            return s[max(0, int(-(-len(s) * p // 1)) - 1)] if s else float("nan")

        def extents():
            out = subprocess.run(["filefrag", disk], capture_output=True, text=True).stdout
            m = re.search(r"(\d+) extents? found", out)
            return int(m.group(1)) if m else -1

        def idle_series(label):
            """Application runs on the idle database through a running engine: stall and frozen per mode, and where the stall goes."""
            serve = subprocess.Popen([q, "serve", "--listen", f"127.0.0.1:{port}", "--ca-dir", f"{w}/ca", "--catalog", f"{w}/catalog.db",
                                      "--admin-socket", f"{w}/admin.sock", "--log-level", "error"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(serve)
            if "listening on" not in serve.stdout.readline():
                raise SystemExit("prove: quiesce serve did not start")
            series = {"label": label, "extents_before": extents(), "modes": {}}
            for mode in ("backup-stage", "ftwrl"):
                fleet = f"{w}/fleet-idle-{mode}.yaml"
                with open(fleet, "w") as f:
                    f.write(f"providers:\n  pool: {{ kind: local, pool: {pool}/q }}\npolicies:\n  p: {{ plugin: mariadb, wanted: application, minimum: application }}\n"
                            f"instances:\n  - {{ id: db-1, policy: p, disks: [db-1-data], options: {{ only_mounts: [{data}], "
                            f"defaults_file: {server.cnf}, mode: {mode} }} }}\nrun: {{ agent_wait_s: 30 }}\n")
                samples, steps = [], {}
                for i in range(args.idle_runs):
                    time.sleep(0.2)
                    run_id = f"idle-{label}-{mode}-{i}"
                    r = subprocess.run([q, "backup", "--engine", "--fleet", fleet, "--admin-socket", f"{w}/admin.sock", "--output", "json",
                                        "--run-id", run_id], capture_output=True, text=True, timeout=120)
                    finished = next((json.loads(l) for l in r.stdout.splitlines() if '"event":"finished"' in l.replace(" ", "")), None)
                    if r.returncode != 0 or not finished:
                        raise SystemExit(f"prove: idle run ({mode}) exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
                    samples.append((finished["stall_ms"], finished["frozen_ms"]))
                series["modes"][mode] = samples
            # Where the stall goes: each step's p50 from the catalog (engine clock; .agent: its share on the guest).
            import sqlite3
            db = sqlite3.connect(f"{w}/catalog.db")
            for mode in series["modes"]:
                steps = {}
                for (timings,) in db.execute("SELECT step_timings_us FROM snapshot_groups WHERE run_id LIKE ?", (f"idle-{label}-{mode}-%",)):
                    for step, us in json.loads(timings).items():
                        steps.setdefault(step, []).append(us / 1000)
                series.setdefault("steps", {})[mode] = {k: pct(v, .5) for k, v in steps.items()}
            db.close()
            series["extents_after"] = extents()
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=30)
            return series

        idle_runs = [idle_series("fresh")]

        writer = subprocess.Popen(server.client("CALL app.work(2000000000)"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(writer)
        time.sleep(args.write_seconds)
        if writer.poll() is not None:
            raise SystemExit(f"prove: the writer stopped: {writer.stderr.read()}")

        levels = [
            ("crash", "{ plugin: crash, wanted: crash }", ""),
            ("filesystem", "{ plugin: mariadb, wanted: filesystem, minimum: filesystem }", ""),
            ("application (backup-stage)", "{ plugin: mariadb, wanted: application, minimum: application }", "mode: backup-stage"),
            ("application (ftwrl)", "{ plugin: mariadb, wanted: application, minimum: application }", "mode: ftwrl"),
        ]
        rows = []
        for index, (name, policy, mode) in enumerate(levels):
            options = f"only_mounts: [{data}], defaults_file: {server.cnf}, marker_query: 'SELECT MAX(n) FROM app.counter'"
            if mode:
                options += ", " + mode
            fleet = f"{w}/fleet-{index}.yaml"
            with open(fleet, "w") as f:
                f.write(f"providers:\n  pool: {{ kind: local, pool: {pool}/q }}\npolicies:\n  p: {policy}\n"
                        f"instances:\n  - {{ id: db-1, policy: p, disks: [db-1-data]"
                        + (f", options: {{ {options} }}" if "mariadb" in policy else "") + " }\nrun: { agent_wait_s: 30 }\n")
            r = subprocess.run([q, "backup", "--fleet", fleet, "--listen", f"127.0.0.1:{port}", "--ca-dir", f"{w}/ca",
                                "--catalog", f"{w}/catalog.db", "--admin-socket", f"{w}/admin.sock", "--output", "json",
                                "--run-id", f"prove-{index}"], capture_output=True, text=True, timeout=300)
            finished = next((json.loads(l) for l in r.stdout.splitlines() if '"event":"finished"' in l.replace(" ", "")), None)
            if r.returncode not in (0, 2) or not finished or not finished.get("group"):
                raise SystemExit(f"prove: quiesce backup ({name}) exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
            group = finished["group"]
            out = sh(q, "restore", group, "--as-new", "--catalog", f"{w}/catalog.db", "--pool", f"{pool}/q")
            image = out.split("→")[-1].strip()
            point = mount(image, f"{w}/restored-{index}")
            copy = Server(f"{point}/data", f"{w}/restored-run-{index}", extra=["--myisam-recover-options=OFF", "--log-bin=binlog", "--server-id=1"])
            servers.append(copy)
            checks = {}
            for line in copy.query(f"CHECK TABLE {', '.join(TABLES)} EXTENDED").splitlines():
                table, _, kind, text = (line.split("\t") + ["", "", "", ""])[:4]
                if kind == "status" and text == "OK":
                    checks.setdefault(table, [])
                else:
                    checks.setdefault(table, []).append(f"{kind}: {text}")
            try:
                a, b = copy.query("SELECT a.n, b.n FROM app.pair_a a JOIN app.pair_b b ON a.id = b.id").split("\t")
                pair = "equal" if a == b else f"{a} vs {b}"
            except (RuntimeError, ValueError):
                pair = "unreadable"
            try:
                restored_max = copy.query("SELECT MAX(n) FROM app.counter")
            except RuntimeError:
                restored_max = "unreadable"
            log = copy.log()
            recovery = []
            if re.search(r"Starting crash recovery|redo log|recovery from checkpoint", log, re.IGNORECASE):
                recovery.append("redo replayed")
            # "N transaction(s) which must be rolled back or cleaned up in total M row operations to undo":
            # M rows of uncommitted work are undone (0: only cleanup of a transaction that wrote nothing).
            undo = sum(int(m) for m in re.findall(r"in total (\d+) row operations to undo", log))
            recovery.append(f"{undo} uncommitted row(s) rolled back" if undo else "nothing rolled back")
            recovery_lines = [l.split("] ", 1)[-1] for l in log.splitlines()
                              if re.search(r"row operations to undo|Rolling back trx|Rolled back recovered|To recover:", l)]
            marker = (finished.get("metadata") or {}).get("mariadb.marker", "-")
            rows.append({
                "level": name, "achieved": finished.get("achieved"), "stall_ms": finished.get("stall_ms"),
                "frozen_ms": finished.get("frozen_ms"), "checks": checks, "pair": pair, "recovery": ", ".join(recovery),
                "counter": restored_max, "marker": marker, "why": (finished.get("reasons") or [""])[0],
                "gtid": (finished.get("metadata") or {}).get("mariadb.gtid_binlog_pos", "-"), "recovery_lines": recovery_lines,
            })
            copy.stop()
            servers.remove(copy)
            unmount(point)

        # The stall on the idle database again, after the load: the writer stopped.
        writer.terminate()
        writer.wait()
        idle_runs.append(idle_series("after-load"))

        def ms(v):
            return "-" if v is None else f"{v:.1f}"
        print(f"{'LEVEL':28} {'ACHIEVED':12} {'STALL MS':>9} {'FROZEN MS':>10}  {'CHECK TABLE':34} {'MYISAM PAIR':13} "
              f"{'COUNTER / MARKER':18} INNODB RECOVERY")
        for row in rows:
            bad = [f"{t.split('.')[-1]}: {'; '.join(m)[:80]}" for t, m in row["checks"].items() if m]
            check = "all OK" if not bad else f"{len(bad)} not OK"
            counter = f"{row['counter']} / {row['marker']}"
            print(f"{row['level']:28} {row['achieved'] or '-':12} {ms(row['stall_ms']):>9} {ms(row['frozen_ms']):>10}  {check:34} "
                  f"{row['pair']:13} {counter:18} {row['recovery']}")
        for row in rows:
            for table, messages in row["checks"].items():
                for message in messages:
                    print(f"  {row['level']}: {table}: {message}")
            if row["why"]:
                print(f"  {row['level']}: why: {row['why']}")
        print("STALL: the application's writes blocked, engine clock: the hold's ready line (lock taken) -> the release answered; "
              "FROZEN: first FIFREEZE -> last FITHAW on the guest.")
        print("COUNTER / MARKER: MAX(n) of the InnoDB counter in the restored copy / recorded under the lock (application only).")
        for row in rows:
            for line in row["recovery_lines"][:12]:
                print(f"  {row['level']}: log: {line}")

        print(f"\nIdle database, one data disk, {args.idle_runs} runs per mode through `quiesce backup --engine` (target: stall p50 <= 20 ms):")
        print(f"{'DISK':34} {'MODE':14} {'STALL P50':>10} {'P99':>8} {'FROZEN P50':>11} {'P99':>8}  TARGET")
        order = ["freeze", "freeze.kernel", "snapshot", "thaw", "release-mariadb"]
        for series in idle_runs:
            disk_label = f"{series['label']} ({series['extents_before']}-{series['extents_after']} extents)"
            for mode, samples in series["modes"].items():
                stalls, frozen = [x for x, _ in samples], [y for _, y in samples]
                print(f"{disk_label:34} {mode:14} {pct(stalls, .5):>7.1f} ms {pct(stalls, .99):>5.1f} ms {pct(frozen, .5):>8.1f} ms "
                      f"{pct(frozen, .99):>5.1f} ms  {'met' if pct(stalls, .5) <= 20 else 'NOT met'}")
            for mode, steps in series["steps"].items():
                print(f"  {series['label']} {mode}: p50 ms " + ", ".join(f"{k} {steps[k]:.1f}" for k in order if k in steps))
        print("The stall is the freeze, the snapshot, the thaw and the release; the local provider's snapshot is a reflink clone of the")
        print("disk image, whose time grows with the image's extents (each write after a clone un-shares a piece of it).")
        print(json.dumps({"prove": "mariadb", "rows": rows, "idle": idle_runs}))
    finally:
        for s in servers:
            s.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for point, dev in reversed(list(mounts)):
            subprocess.run(["umount", point])
            subprocess.run(["losetup", "-d", dev])
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
