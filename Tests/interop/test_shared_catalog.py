"""Two engines, one fleet, one PostgreSQL catalog: two one-shot `quiesce backup` processes with the
same run id, real `quiesce-agent` processes that know both engines, an XFS reflink pool and ext4
disks on loop devices. No instance is backed up twice and none is left out — also when one engine
dies right after its provider made a group (its agents fail over, its unit is taken over once its
lease runs out, and the group it made is adopted, not made again). Root only; needs the PostgreSQL
server scripts/test.sh starts (QUIESCE_TEST_POSTGRES)."""
import json
import os
import socket
import subprocess
import time
import uuid

import pytest
from conftest import mount_ext4, reflink_pool, sh, undo, write_hooks

PG = os.environ.get("QUIESCE_TEST_POSTGRES")
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices"),
              pytest.mark.skipif(PG is None, reason="needs QUIESCE_TEST_POSTGRES (scripts/test.sh starts a server)")]

AGENTS = ("a-1", "a-2", "a-3", "a-4")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"no engine listening on {port}")


@pytest.fixture
def shared(bin_dir, tmp_path):
    w = tmp_path
    mounts, loops, agents, engines = [], [], [], []
    schema = "t_" + uuid.uuid4().hex[:10]
    url = f"{PG}?schema={schema}"
    try:
        q = os.path.join(bin_dir, "quiesce")
        sh(q, "ca", "init", "--dir", str(w / "ca"), "--ip", "127.0.0.1")
        disks = reflink_pool(w, loops, mounts)
        rows = []
        for a in AGENTS:
            sh(q, "ca", "issue", "--dir", str(w / "ca"), "--agent", a)
            mount_ext4(disks / f"{a}-data.img", w / a, loops, mounts)
            write_hooks(w / f"h-{a}")
            rows.append(f"  - {{ id: {a}, policy: app, disks: [{a}-data], options: {{ only_mounts: [{w / a}], "
                        f"prescript_path: {w / f'h-{a}' / 'prescript.sh'}, postscript_path: {w / f'h-{a}' / 'postscript.sh'} }} }}")
        (w / "fleet.yaml").write_text(
            f"providers:\n  pool: {{ kind: local, pool: {w / 'pool' / 'q'}, burst: 20, per_second: 50 }}\n"
            "policies:\n  app: { plugin: linux-freeze, wanted: application, minimum: crash }\n"
            "instances:\n" + "\n".join(rows) + "\nrun: { agent_wait_s: 10, concurrency: 1 }\n")
        ports = {"A": free_port(), "B": free_port()}

        class S:
            pass
        s = S()
        s.dir, s.url, s.ports = w, url, ports

        def engine(name, run, env=None):
            proc = subprocess.Popen(
                [q, "backup", "--fleet", str(w / "fleet.yaml"), "--listen", f"127.0.0.1:{ports[name]}", "--ca-dir", str(w / "ca"),
                 "--catalog", url, "--catalog-lease", "3", "--admin-socket", str(w / f"admin-{name}.sock"), "--run-id", run,
                 "--output", "json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
            engines.append(proc)
            return proc

        def start_agents():
            """a-1 and a-2 dial engine A first, a-3 and a-4 engine B; each fails over to the other."""
            for a in AGENTS:
                first, second = ("A", "B") if a in ("a-1", "a-2") else ("B", "A")
                agents.append(subprocess.Popen(
                    [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{ports[first]}",
                     "--engine", f"127.0.0.1:{ports[second]}", "--reconnect-max", "1",
                     "--cert", str(w / "ca" / "agents" / f"{a}.pem"), "--key", str(w / "ca" / "agents" / f"{a}.key"),
                     "--ca", str(w / "ca" / "ca.pem"), "--prescript", str(w / f"h-{a}" / "prescript.sh"),
                     "--postscript", str(w / f"h-{a}" / "postscript.sh"), "--hook-dir", str(w / f"h-{a}"), "--log-level", "error"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def groups_of(run):
            """The provider's groups for `run`, from the pool itself."""
            found = []
            for d in (w / "pool" / "q" / "snapshots").iterdir():
                if (d / "group.json").exists():
                    g = json.loads((d / "group.json").read_text())
                    if g["tags"].get("quiesce:run") == run:
                        found.append(g)
            return found

        def quiesce(*args):
            proc = subprocess.run([q, *args], capture_output=True, text=True)
            return proc.returncode, proc.stdout, proc.stderr

        s.engine, s.start_agents, s.groups_of, s.quiesce, s.wait_listening = engine, start_agents, groups_of, quiesce, wait_listening
        yield s
    finally:
        for p in engines:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        undo(agents, mounts, loops)
        subprocess.run(["psql", PG, "-q", "-c", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], capture_output=True)


def report_of(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]


def test_two_engines_share_a_run_without_duplicates(shared):
    a, b = shared.engine("A", "s-1"), shared.engine("B", "s-1")
    shared.wait_listening(shared.ports["A"], a)
    shared.wait_listening(shared.ports["B"], b)
    shared.start_agents()
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, out_a + err_a + out_b + err_b
    done_a = {i["instance"] for i in report_of(out_a)["instances"]}
    done_b = {i["instance"] for i in report_of(out_b)["instances"]}
    assert done_a and done_b, f"one engine did everything: A {done_a}, B {done_b}"
    assert not done_a & done_b and done_a | done_b == set(AGENTS), (done_a, done_b)
    assert report_of(out_a)["other_engines"] == len(done_b)
    for report in (report_of(out_a), report_of(out_b)):
        assert all(i["achieved"] == "application" for i in report["instances"]), report
    assert sorted(g["tags"]["quiesce:instance"] for g in shared.groups_of("s-1")) == sorted(AGENTS)
    code, out, err = shared.quiesce("snapshots", "--catalog", shared.url, "--run", "s-1", "--output", "json")
    assert code == 0, err
    assert sorted(g["instanceID"] for g in json.loads(out)) == sorted(AGENTS)
    # The same run id again, one engine: every instance is gone over again and found done by its token.
    again = shared.engine("A", "s-1")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, out + err
    by = {i["instance"]: i for i in report_of(out)["instances"]}
    assert set(by) == set(AGENTS), by.keys()
    assert all(any(w.startswith("already-done") for w in i["warnings"]) for i in by.values()), by
    assert len(shared.groups_of("s-1")) == len(AGENTS)


def test_an_engine_killed_mid_run_leaves_its_work_to_the_other(shared):
    # A dies right after its provider made a-2's group, before recording it or thawing (its agent's guard thaws).
    a = shared.engine("A", "s-kill", env={"QUIESCE_TEST_EXIT_AFTER_CREATE": "a-2"})
    b = shared.engine("B", "s-kill")
    shared.wait_listening(shared.ports["A"], a)
    shared.wait_listening(shared.ports["B"], b)
    shared.start_agents()
    out_a, err_a = a.communicate(timeout=120)
    assert a.returncode == 70, out_a + err_a
    assert [json.loads(l)["instance"] for l in out_a.splitlines() if '"finished"' in l] == ["a-1"], out_a
    out_b, err_b = b.communicate(timeout=180)
    assert b.returncode == 2, out_b + err_b  # a-2: adopted crash-consistent, below its wanted level
    report = report_of(out_b)
    by = {i["instance"]: i for i in report["instances"]}
    assert set(by) == {"a-2", "a-3", "a-4"}, by.keys()
    assert any(w.startswith("taken-over: engine ") for w in by["a-2"]["warnings"]), by["a-2"]
    assert by["a-2"]["reasons"][0].startswith("adopted-unproven"), by["a-2"]
    assert by["a-3"]["achieved"] == "application" and by["a-4"]["achieved"] == "application"
    # Exactly one group per instance at the provider: a-2's was adopted, not made again.
    made = shared.groups_of("s-kill")
    assert sorted(g["tags"]["quiesce:instance"] for g in made) == sorted(AGENTS), [g["id"] for g in made]
    assert by["a-2"]["group"] in [g["id"] for g in made]
    # The catalog has every instance once and the run finished, by B, from both engines' outcomes.
    code, out, err = shared.quiesce("snapshots", "--catalog", shared.url, "--run", "s-kill", "--output", "json")
    assert code == 0, err
    assert sorted(g["instanceID"] for g in json.loads(out)) == sorted(AGENTS)
    state = subprocess.run(["psql", PG, "-tA", "-c", f"SELECT state FROM {shared.url.split('schema=')[1]}.runs WHERE id = 's-kill'"],
                           capture_output=True, text=True)
    assert state.stdout.strip() == "degraded", state.stdout + state.stderr
    code, out, err = shared.quiesce("reconcile", "--catalog", shared.url, "--pool", str(shared.dir / "pool" / "q"))
    assert code == 0, out + err
    for a_ in AGENTS:
        subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {shared.dir / a_}/after"], check=True)


def test_an_unreachable_or_malformed_catalog_is_said_plainly(bin_dir, tmp_path):
    q = os.path.join(bin_dir, "quiesce")
    port = free_port()
    proc = subprocess.run([q, "snapshots", "--catalog", f"postgres://postgres@127.0.0.1:{port}/postgres"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "cannot open" in proc.stderr, proc.stderr
    proc = subprocess.run([q, "snapshots", "--catalog", "postgres://postgres:hunter2@127.0.0.1/postgres"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "password_file" in proc.stderr and "hunter2" not in proc.stderr, proc.stderr
