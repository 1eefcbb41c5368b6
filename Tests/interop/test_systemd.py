"""The systemd units in examples/systemd, as an operator installs them: checked by
`systemd-analyze verify` and `security --offline`, then their ExecStart lines run as
systemd would run them (systemd is not PID 1 here), with only the paths and
addresses moved into a scratch directory and onto loopback. The engine starts
with its fleet's schedule, serves metrics and JSON logs, the agent connects, a
run goes through, and SIGTERM (their KillSignal) stops both cleanly."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from conftest import sh, wait_for

UNITS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "systemd")
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit(name):
    """The [Service] section's settings (a key given twice keeps every value)."""
    settings, section = {}, None
    for raw in open(os.path.join(UNITS, name)).read().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def moved(text, moves):
    for old, new in moves:
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("name", ["quiesce-engine.service", "quiesce-agent.service"])
def test_units_verify_and_are_hardened(bin_dir, tmp_path, name):
    # verify checks the ExecStart binary exists: point it at the build.
    text = moved(open(os.path.join(UNITS, name)).read(), [("/usr/local/bin/", bin_dir + "/")])
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if name in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)], capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert level, security.stdout + security.stderr
    exposure = float(level.group(1))
    print(f"measured: {name} exposure {exposure} (systemd-analyze security; 0 best, 10 worst)")
    # The engine needs no privilege at all; the agent is root by necessity (FIFREEZE, the seed's scripts).
    assert exposure <= (2.0 if "engine" in name else 7.5), security.stdout
    settings = unit(name)
    if "engine" in name:
        for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "CapabilityBoundingSet", "RestrictAddressFamilies", "MemoryDenyWriteExecute"):
            assert key in settings, key
        assert settings["User"] == ["quiesce"] and settings["ProtectSystem"] == ["strict"]
    else:
        assert settings["KillMode"] == ["mixed"] and settings["OOMScoreAdjust"] == ["-1000"] and settings["LimitMEMLOCK"] == ["infinity"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent's unit runs as root")
def test_units_command_lines_run_the_service(bin_dir, tmp_path):
    q = os.path.join(bin_dir, "quiesce")
    state, run, etc = tmp_path / "var-lib-quiesce", tmp_path / "run-quiesce", tmp_path / "etc-quiesce"
    for d in (state, run, etc):
        d.mkdir(mode=0o700)
    engine_port, enrol_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "QUIESCE_HOME": str(state)}
    sh(q, "ca", "init", "--dir", str(state / "ca"), "--ip", "127.0.0.1")
    sh(q, "ca", "issue", "--dir", str(state / "ca"), "--agent", "svc-1")
    for src, dst in (("agents/svc-1.pem", "agent.pem"), ("agents/svc-1.key", "agent.key"), ("ca.pem", "ca.pem")):
        shutil.copy(state / "ca" / src, etc / dst)
    pool = state / "pool"
    (pool / "disks").mkdir(parents=True)
    with open(pool / "disks" / "svc-1-data.img", "wb") as f:
        f.truncate(1 << 20)
    (etc / "fleet.yaml").write_text(
        f"providers:\n  pool: {{ kind: local, pool: {pool} }}\n"
        "policies:\n  base: { plugin: crash, wanted: crash, retention: { keep_last: 3 } }\n"
        "instances:\n  - { id: svc-1, policy: base, disks: [svc-1-data] }\n"
        "schedules:\n  nightly: { cron: \"30 2 * * *\", time_zone: Europe/Berlin }\n")
    moves = [("/usr/local/bin/", bin_dir + "/"), ("/var/lib/quiesce", str(state)), ("/run/quiesce", str(run)), ("/etc/quiesce", str(etc)),
             ("0.0.0.0:7443", f"127.0.0.1:{engine_port}"), ("0.0.0.0:7444", f"127.0.0.1:{enrol_port}"),
             ("127.0.0.1:9464", f"127.0.0.1:{metrics_port}"), ("engine.example.com:7443", f"127.0.0.1:{engine_port}")]
    engine_unit, agent_unit = unit("quiesce-engine.service"), unit("quiesce-agent.service")
    for setting in engine_unit.get("Environment", []):
        key, _, value = setting.partition("=")
        env[key] = moved(value, moves)
    assert env["QUIESCE_HOME"] == str(state)
    engine = subprocess.Popen(shlex.split(moved(engine_unit["ExecStart"][0], moves)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    agent = None
    try:
        line = engine.stdout.readline()
        assert "listening on" in line and "1 schedule (nightly next at" in line and f"metrics on http://127.0.0.1:{metrics_port}/metrics" in line, \
            line + engine.stderr.read()
        agent = subprocess.Popen(shlex.split(moved(agent_unit["ExecStart"][0], moves)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        admin = ["--admin-socket", str(run / "admin.sock")]

        def connected():
            out = subprocess.run([q, "agents", *admin, "--output", "json"], capture_output=True, text=True).stdout
            return '"svc-1"' in out
        assert wait_for(connected, timeout=20), "the agent did not connect"
        proc = subprocess.run([q, "backup", "--engine", "--fleet", str(etc / "fleet.yaml"), *admin, "--run-id", "svc-run", "--output", "json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'quiesce_runs_total{outcome="succeeded"} 1' in metrics, metrics
        assert 'quiesce_groups_total{level="crash"} 1' in metrics
        assert re.search(r'quiesce_provider_calls_total\{provider="pool",call="create",result="ok"\} 1', metrics), metrics
        assert "quiesce_sessions_connected 1" in metrics
        assert "quiesce_frozen_seconds_bucket" in metrics
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/other", timeout=5)
        assert missing.value.code == 404
        # SIGTERM, as `systemctl stop` sends it (KillSignal), within TimeoutStopSec.
        agent.send_signal(15)
        assert agent.wait(timeout=int(agent_unit["TimeoutStopSec"][0])) in (0, -15, 143)
        engine.send_signal(15)
        assert engine.wait(timeout=int(engine_unit["TimeoutStopSec"][0])) == 0
        # --log-format json: every line of the engine's log is one JSON object.
        logs = [json.loads(line) for line in engine.stderr.read().splitlines() if line.strip()]
        assert logs and all({"ts", "level", "logger", "message"} <= set(entry) for entry in logs), logs[:3]
        assert any(entry.get("run") == "svc-run" and entry["message"] == "run finished" for entry in logs), logs
    finally:
        for p in (agent, engine):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
