"""`quiesce backup --fleet` as an operator runs it: a one-shot engine, real
`quiesce-agent` processes dialling it, an XFS reflink pool and ext4 disks on
loop devices, a fleet file; the report, JSON lines, exit codes, the catalog.
Root only (loop devices, FIFREEZE); everything is unmounted and detached after."""
import json
import os
import socket
import subprocess
import time

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fleet(bin_dir, tmp_path):
    w = tmp_path
    mounts, loops, agents = [], [], []
    try:
        q = os.path.join(bin_dir, "quiesce")
        sh(q, "ca", "init", "--dir", str(w / "ca"), "--ip", "127.0.0.1")
        pool_img = w / "pool.img"
        sh("truncate", "-s", "400M", str(pool_img))
        sh("mkfs.xfs", "-q", "-m", "reflink=1", str(pool_img))
        pool_loop = sh("losetup", "--find", "--show", str(pool_img))
        loops.append(pool_loop)
        (w / "pool").mkdir()
        sh("mount", pool_loop, str(w / "pool"))
        mounts.append(str(w / "pool"))
        disks = w / "pool" / "q" / "disks"
        disks.mkdir(parents=True)
        sh("truncate", "-s", "64M", str(disks / "a-3-data.img"))  # a disk whose instance has no agent
        for a in ("a-1", "a-2"):
            sh(q, "ca", "issue", "--dir", str(w / "ca"), "--agent", a)
            img = disks / f"{a}-data.img"
            sh("truncate", "-s", "64M", str(img))
            sh("mkfs.ext4", "-q", "-F", str(img))
            dev = sh("losetup", "--find", "--show", str(img))
            loops.append(dev)
            (w / a).mkdir()
            sh("mount", dev, str(w / a))
            mounts.append(str(w / a))
            hooks = w / f"h-{a}"
            hooks.mkdir(mode=0o700)
            for name, text in (("prescript.sh", "#!/bin/sh\necho pre\n"), ("postscript.sh", "#!/bin/sh\necho post\n")):
                (hooks / name).write_text(text)
                os.chmod(hooks / name, 0o700)
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
                agents.append(subprocess.Popen(
                    [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{port}",
                     "--cert", str(w / "ca" / "agents" / f"{a}.pem"), "--key", str(w / "ca" / "agents" / f"{a}.key"),
                     "--ca", str(w / "ca" / "ca.pem"), "--prescript", str(w / f"h-{a}" / "prescript.sh"),
                     "--postscript", str(w / f"h-{a}" / "postscript.sh"), "--hook-dir", str(w / f"h-{a}"), "--log-level", "error"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def backup(*extra):
            proc = subprocess.Popen(
                [q, "backup", "--fleet", str(w / "fleet.yaml"), "--listen", f"127.0.0.1:{port}", "--ca-dir", str(w / "ca"),
                 "--catalog", str(w / "catalog.db"), "--admin-socket", str(w / "admin.sock"), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            if not agents:
                start_agents()
            out, err = proc.communicate(timeout=120)
            return proc.returncode, out, err

        f.backup = backup
        yield f
    finally:
        for p in agents:
            p.terminate()
            p.wait(timeout=10)
        for m in reversed(mounts):
            subprocess.run(["fsfreeze", "--unfreeze", m], capture_output=True)
            subprocess.run(["umount", "-l", m], capture_output=True)
        for d in reversed(loops):
            subprocess.run(["losetup", "-d", d], capture_output=True)


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
    assert f"{bad}:2:17: providers.pool.kind: expected a provider kind this engine has (local), found \"s3\"" in proc.stderr
    assert "policies.app.plugin: expected a loaded plugin (crash, linux-freeze), found \"linux-freze\"" in proc.stderr
    assert "instances[0].disks: missing" in proc.stderr
