"""`quiesce backup --fleet` as an operator runs it: a one-shot engine, real
`quiesce-agent` processes dialling it, an XFS reflink pool and ext4 disks on
loop devices, a fleet file; the report, JSON lines, exit codes, the catalog.
Root only (loop devices, FIFREEZE); everything is unmounted and detached after."""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time

import pytest
from conftest import mount_ext4, reflink_pool, sh, start_agent, undo, write_hooks

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fleet(bin_dir, tmp_path):
    w = tmp_path
    mounts, loops, agents, servers = [], [], [], []
    try:
        q = os.path.join(bin_dir, "quiesce")
        sh(q, "ca", "init", "--dir", str(w / "ca"), "--ip", "127.0.0.1")
        disks = reflink_pool(w, loops, mounts)
        sh("truncate", "-s", "64M", str(disks / "a-3-data.img"))  # a disk whose instance has no agent
        for a in ("a-1", "a-2"):
            sh(q, "ca", "issue", "--dir", str(w / "ca"), "--agent", a)
            mount_ext4(disks / f"{a}-data.img", w / a, loops, mounts)
            write_hooks(w / f"h-{a}", pre="#!/bin/sh\necho pre\n", post="#!/bin/sh\necho post\n")
        os.chmod(w / "h-a-2" / "prescript.sh", 0o755)
        port = free_port()
        rows = []
        for a in ("a-1", "a-2"):
            rows.append(f"  - {{ id: {a}, policy: app, disks: [{a}-data], options: {{ only_mounts: [{w / a}], "
                        f"prescript_path: {w / f'h-{a}' / 'prescript.sh'}, postscript_path: {w / f'h-{a}' / 'postscript.sh'} }} }}")
        rows.append("  - { id: a-3, policy: base, disks: [a-3-data] }")
        (w / "fleet.yaml").write_text(
            f"providers:\n  pool: {{ kind: local, pool: {w / 'pool' / 'q'}, burst: 20, per_second: 50 }}\n"
            "policies:\n  app: { plugin: linux-freeze, wanted: application, minimum: crash }\n"
            "  base: { plugin: crash, wanted: crash }\n"
            "instances:\n" + "\n".join(rows) + "\nrun: { agent_wait_s: 3 }\n")

        class F:
            pass
        f = F()
        f.dir, f.port, f.mounts = w, port, mounts

        def start_agents():
            for a in ("a-1", "a-2"):
                agents.append(start_agent(bin_dir, port, str(w / "ca"), a, str(w / f"h-{a}")))

        def backup(*extra, env=None, fleet_file=True):
            proc = subprocess.Popen(
                [q, "backup", *(["--fleet", str(w / "fleet.yaml")] if fleet_file else []), "--listen", f"127.0.0.1:{port}",
                 "--ca-dir", str(w / "ca"), "--catalog", str(w / "catalog.db"), "--admin-socket", str(w / "admin.sock"), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
            time.sleep(0.5)
            if not agents:
                start_agents()
            out, err = proc.communicate(timeout=120)
            return proc.returncode, out, err

        def serve():
            """`quiesce serve` on the fleet's port, with the fleet's CA and catalog; waits until it listens."""
            proc = subprocess.Popen(
                [q, "serve", "--listen", f"127.0.0.1:{port}", "--ca-dir", str(w / "ca"), "--catalog", str(w / "catalog.db"),
                 "--admin-socket", str(w / "admin.sock"), "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            servers.append(proc)
            line = proc.stdout.readline()
            assert "listening on" in line, line + proc.stderr.read()
            return proc

        def via_engine(*extra, wait=True):
            proc = subprocess.Popen([q, "backup", "--engine", "--fleet", str(w / "fleet.yaml"),
                                     "--admin-socket", str(w / "admin.sock"), *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if not wait:
                return proc
            out, err = proc.communicate(timeout=120)
            return proc.returncode, out, err

        f.backup, f.serve, f.via_engine, f.start_agents = backup, serve, via_engine, start_agents
        yield f
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        undo(agents, mounts, loops)


def test_backup_reports_every_level_with_reasons_and_exit_codes(bin_dir, fleet):
    code, out, err = fleet.backup("--output", "json", "--run-id", "r-json")
    assert code == 2, out + err  # a-2 downgraded, none failed
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "engine"
    report = events[-1]
    assert report["event"] == "report" and report["exit_code"] == 2
    by = {i["instance"]: i for i in report["instances"]}
    assert by["a-1"]["achieved"] == "application" and by["a-1"]["state"] == "succeeded"
    assert by["a-1"]["frozen_ms"] > 0 and by["a-1"]["stall_ms"] >= by["a-1"]["frozen_ms"]
    assert by["a-2"]["achieved"] == "filesystem" and by["a-2"]["reasons"][0].startswith("prescript-wrong-mode")
    # a-3 has no agent; its crash policy accepts a snapshot without one.
    assert by["a-3"]["achieved"] == "crash" and by["a-3"]["state"] == "succeeded"
    assert by["a-3"]["reasons"][0].startswith("agent-not-connected") and by["a-3"]["frozen_ms"] is None
    assert sum(1 for e in events if e["event"] == "finished") == 3
    # The same run id again: no new snapshot groups (idempotency tokens); a table this time.
    code, out, err = fleet.backup("--run-id", "r-json")
    assert code == 2, out + err
    assert "a-2        app      application   filesystem    downgraded" in out or "downgraded" in out
    assert "1 downgraded" in out
    listing = subprocess.run([os.path.join(bin_dir, "quiesce"), "snapshots", "--catalog", str(fleet.dir / "catalog.db"),
                              "--pool", str(fleet.dir / "pool" / "q"), "--output", "json"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert len(json.loads(listing.stdout)) == 3
    # Every filesystem is thawed: writes complete.
    for m in fleet.mounts:
        subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {m}/after"], check=True)


def test_backup_fleet_file_problems_exit_65_with_lines(bin_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  pool: { kind: s3 }\npolicies:\n  app: { plugin: linux-freze }\ninstances:\n  - { id: a, policy: app }\n")
    proc = subprocess.run([os.path.join(bin_dir, "quiesce"), "backup", "--fleet", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 65, proc.stderr
    assert f"{bad}:2:17: providers.pool.kind: expected a provider kind this engine has (ec2, local), found \"s3\"" in proc.stderr
    assert "policies.app.plugin: expected a loaded plugin (crash, linux-freeze, mariadb, windows-vss), found \"linux-freze\"" in proc.stderr
    assert "instances[0].disks: missing" in proc.stderr


def snapshots(bin_dir, fleet, run):
    listing = subprocess.run([os.path.join(bin_dir, "quiesce"), "snapshots", "--catalog", str(fleet.dir / "catalog.db"),
                              "--pool", str(fleet.dir / "pool" / "q"), "--run", run, "--output", "json"],
                             capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)


def test_backup_through_a_running_serve(bin_dir, fleet):
    server = fleet.serve()
    fleet.start_agents()
    code, out, err = fleet.via_engine("--output", "json", "--run-id", "s-json")
    assert code == 2, out + err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "accepted" and events[0]["run"] == "s-json" and events[0]["instances"] == 3
    report = events[-1]
    assert report["event"] == "report" and report["exit_code"] == 2 and report["run"] == "s-json"
    by = {i["instance"]: i for i in report["instances"]}
    assert by["a-1"]["achieved"] == "application" and by["a-1"]["frozen_ms"] > 0
    assert by["a-2"]["achieved"] == "filesystem" and by["a-2"]["reasons"][0].startswith("prescript-wrong-mode")
    assert by["a-3"]["achieved"] == "crash" and by["a-3"]["reasons"][0].startswith("agent-not-connected")
    assert len(snapshots(bin_dir, fleet, "s-json")) == 3

    # Table output, and a second run of an instance already in a running run is refused (75):
    # a-3 has no agent, so the first run waits its 3 s for it.
    first = fleet.via_engine("--run-id", "s-first", wait=False)
    time.sleep(1.0)
    code, out, err = fleet.via_engine("--run-id", "s-second")
    assert code == 75, out + err
    assert "already being backed up by run s-first" in err
    out, err = first.communicate(timeout=60)
    assert first.returncode == 2, out + err
    assert "run s-first started in the engine" in err
    assert "1 downgraded" in out and "a-2" in out

    # --resume through the engine, without the fleet file (the engine reads the run's own): a degraded
    # run whose instances all finished runs nothing again and reports them from the catalog.
    proc = subprocess.run([os.path.join(bin_dir, "quiesce"), "backup", "--engine", "--resume", "s-first", "--output", "json",
                           "--admin-socket", str(fleet.dir / "admin.sock")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert all(any(w.startswith("already-done:") for w in i["warnings"]) for i in report["instances"]), report
    assert len(snapshots(bin_dir, fleet, "s-first")) == 3

    # The client goes away mid-run: the run goes on in the engine and is recorded.
    gone = fleet.via_engine("--run-id", "s-gone", wait=False)
    time.sleep(1.0)
    gone.kill()
    gone.wait()
    deadline = time.time() + 30
    while time.time() < deadline and len(snapshots(bin_dir, fleet, "s-gone")) < 3:
        time.sleep(0.5)
    assert len(snapshots(bin_dir, fleet, "s-gone")) == 3

    # A fleet file with problems: 65 with file:line:column, checked by the engine's plugins.
    bad = fleet.dir / "bad.yaml"
    bad.write_text("providers:\n  pool: { kind: local, pool: /nonexistent-q }\npolicies:\n  app: { plugin: linux-freeze, options: { fs_freze: true } }\n"
                   "instances:\n  - { id: a-1, policy: app, disks: [d] }\n")
    proc = subprocess.run([os.path.join(bin_dir, "quiesce"), "backup", "--engine", "--fleet", str(bad),
                           "--admin-socket", str(fleet.dir / "admin.sock")], capture_output=True, text=True)
    assert proc.returncode == 65, proc.stderr
    assert f"{bad}:4:" in proc.stderr and "fs_freze" in proc.stderr

    # SIGTERM while a run waits for an agent: nothing new starts, the run reports why, the engine exits 0.
    draining = fleet.via_engine("--output", "json", "--run-id", "s-drain", "--agent-wait-s", "30", wait=False)
    time.sleep(1.0)
    server.terminate()
    out, err = draining.communicate(timeout=30)
    assert draining.returncode == 3, out + err
    report = [json.loads(line) for line in out.splitlines()][-1]
    assert all(i["reasons"][0].startswith("run-stopped: the engine is shutting down") for i in report["instances"])
    assert server.wait(timeout=30) == 0
    for m in fleet.mounts:
        subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {m}/after"], check=True)


def test_backup_interrupted_stops_starting_and_records_the_run(bin_dir, fleet):
    # Ctrl-C on a one-shot backup that waits for its agents: nothing new starts, every
    # instance is reported with the reason, the run is recorded as finished, exit 3
    # (some failed). It used to die on the spot and leave the run 'running'.
    w = fleet.dir
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce"), "backup", "--fleet", str(w / "fleet.yaml"), "--listen", f"127.0.0.1:{fleet.port}",
         "--ca-dir", str(w / "ca"), "--catalog", str(w / "catalog.db"), "--admin-socket", str(w / "admin.sock"),
         "--output", "json", "--run-id", "r-int", "--agent-wait-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, out + err
    assert "stopping: instances being backed up finish" in err
    report = [json.loads(line) for line in out.splitlines()][-1]
    assert report["event"] == "report" and report["run"] == "r-int"
    assert len(report["instances"]) == 3
    assert all(i["reasons"][0].startswith("run-stopped: interrupted by SIGINT") for i in report["instances"]), report
    with sqlite3.connect(w / "catalog.db") as db:
        state, finished = db.execute("SELECT state, finished_at FROM runs WHERE id = 'r-int'").fetchone()
    assert finished is not None and state != "running", state


def reconcile(bin_dir, fleet, *extra):
    proc = subprocess.run([os.path.join(bin_dir, "quiesce"), "reconcile", "--catalog", str(fleet.dir / "catalog.db"),
                           "--pool", str(fleet.dir / "pool" / "q"), *extra], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def die_after_creating_a2(fleet, run):
    """One instance at a time (a-1, a-2, a-3); the engine dies right after the provider made a-2's group,
    before anything about it is recorded: a-1 is done, a-2's group exists only at the provider, a-3 never started."""
    text = (fleet.dir / "fleet.yaml").read_text()
    (fleet.dir / "fleet.yaml").write_text(text.replace("run: { agent_wait_s: 3 }", "run: { agent_wait_s: 3, concurrency: 1 }"))
    code, out, err = fleet.backup("--run-id", run, "--output", "json", env={"QUIESCE_TEST_EXIT_AFTER_CREATE": "a-2"})
    assert code == 70, out + err
    done = [json.loads(line) for line in out.splitlines() if '"finished"' in line]
    assert [e["instance"] for e in done] == ["a-1"], out


def test_resume_finishes_an_interrupted_run_without_duplicates(bin_dir, fleet):
    die_after_creating_a2(fleet, "r-res")
    with sqlite3.connect(fleet.dir / "catalog.db") as db:
        assert db.execute("SELECT state FROM runs WHERE id = 'r-res'").fetchone()[0] == "running"  # the engine died
    # reconcile sees the group the engine never recorded.
    code, out, err = reconcile(bin_dir, fleet, "--output", "json")
    assert code == 2, out + err
    orphans = json.loads(out)["orphans"]
    assert [(o["instanceID"], o["runID"], o["taggedLevel"] if "taggedLevel" in o else None, o["action"]) for o in orphans] == [("a-2", "r-res", None, "listed")]

    # --resume: the fleet file the run was started with, a-1 not run again, a-2's group adopted (no second one), a-3 backed up.
    code, out, err = fleet.backup("--resume", "r-res", "--output", "json", fleet_file=False)
    assert code == 2, out + err  # a-2: crash-consistent below its wanted application
    report = [json.loads(line) for line in out.splitlines()][-1]
    by = {i["instance"]: i for i in report["instances"]}
    assert any(w.startswith("already-done: backed up by an earlier attempt of run r-res") for w in by["a-1"]["warnings"]), by["a-1"]
    assert by["a-1"]["achieved"] == "application" and by["a-1"]["state"] == "succeeded"
    assert by["a-2"]["group"] == orphans[0]["groupID"], "a-2's group was made again"
    assert by["a-2"]["achieved"] == "crash" and by["a-2"]["reasons"][0].startswith("adopted-unproven"), by["a-2"]
    assert by["a-3"]["achieved"] == "crash" and by["a-3"]["state"] == "succeeded"
    listed = snapshots(bin_dir, fleet, "r-res")
    assert sorted(g["instanceID"] for g in listed) == ["a-1", "a-2", "a-3"]
    # Exactly one group per instance at the provider for this run, and none left out of the catalog.
    groups = [json.loads((d / "group.json").read_text()) for d in (fleet.dir / "pool" / "q" / "snapshots").iterdir() if (d / "group.json").exists()]
    mine = [g for g in groups if g["tags"].get("quiesce:run") == "r-res"]
    assert sorted(g["tags"]["quiesce:instance"] for g in mine) == ["a-1", "a-2", "a-3"]
    assert reconcile(bin_dir, fleet)[0] == 0
    with sqlite3.connect(fleet.dir / "catalog.db") as db:
        assert db.execute("SELECT state FROM runs WHERE id = 'r-res'").fetchone()[0] == "degraded"

    # Nothing left to resume, and a run the catalog never saw: said plainly.
    code, out, err = fleet.backup("--resume", "r-res", "--run-id", "x")
    assert code == 64 and "--resume: the run's id is its own" in err
    proc = subprocess.run([os.path.join(bin_dir, "quiesce"), "backup", "--resume", "r-nope", "--catalog", str(fleet.dir / "catalog.db")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and 'no run "r-nope" in the catalog' in proc.stderr, proc.stderr
    for m in fleet.mounts:
        subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {m}/after"], check=True)


def test_reconcile_adopts_what_the_catalog_never_recorded(bin_dir, fleet):
    die_after_creating_a2(fleet, "r-orphan")
    code, out, err = reconcile(bin_dir, fleet)
    assert code == 2 and "a-2" in out and "(none: crash)" in out and "quiesce reconcile --adopt" in out, out + err
    code, out, err = reconcile(bin_dir, fleet, "--adopt", "--fleet", str(fleet.dir / "fleet.yaml"))
    assert code == 0 and "1 adopted, 0 not" in out, out + err
    rows = {g["instanceID"]: g for g in snapshots(bin_dir, fleet, "r-orphan")}
    assert rows["a-2"]["achievedLevel"] == 0 and rows["a-2"]["wantedLevel"] == 2  # crash, application
    assert rows["a-2"]["reasons"][0]["code"] == "adopted-unproven"
    assert rows["a-2"]["tags"]["quiesce:level"] == "crash", "the provider's level tag says what was recorded"
    assert reconcile(bin_dir, fleet)[0] == 0
    for m in fleet.mounts:
        subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {m}/after"], check=True)


def test_backup_engine_flag_refuses_one_shot_options_and_says_when_no_engine(bin_dir, tmp_path):
    q = os.path.join(bin_dir, "quiesce")
    (tmp_path / "f.yaml").write_text("x: 1\n")
    proc = subprocess.run([q, "backup", "--engine", "--fleet", str(tmp_path / "f.yaml"), "--catalog", "/x.db"], capture_output=True, text=True)
    assert proc.returncode == 64 and "--catalog: not with --engine" in proc.stderr, proc.stderr
    proc = subprocess.run([q, "backup", "--engine", "--fleet", str(tmp_path / "f.yaml"), "--admin-socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True)
    assert proc.returncode == 69 and "is `quiesce serve` running?" in proc.stderr, proc.stderr
