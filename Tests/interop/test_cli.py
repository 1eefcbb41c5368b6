"""The command-line tools as an operator uses them: the demo, exit codes, and
errors that say what was expected and what was found."""
import json
import os
import subprocess


def run(bin_dir, *args, env=None):
    return subprocess.run([os.path.join(bin_dir, args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_demo_prints_the_fleet_as_json(bin_dir):
    result = run(bin_dir, "quiesce", "demo", "--sessions-only", "--agents", "3", "--output", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [a["instance_id"] for a in report["agents"]] == ["demo-1", "demo-2", "demo-3"]
    for agent in report["agents"]:
        assert agent["facts"]["os_family"] == "linux"
        assert any(m["mount_point"] == "/" for m in agent["facts"]["mounts"])
    assert "all 3 agents connected" in result.stderr  # progress goes to stderr


def test_demo_table_and_cleanup(bin_dir, tmp_path):
    result = run(bin_dir, "quiesce", "demo", "--sessions-only", "--agents", "2", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "INSTANCE" in result.stdout and "demo-2" in result.stdout and "eligible" in result.stdout
    assert os.listdir(tmp_path) == [], "the demo left files behind"


def test_full_demo_shows_three_levels_and_leaves_nothing(bin_dir):
    if os.geteuid() != 0:
        result = run(bin_dir, "quiesce", "demo", "--agents", "1")
        assert "needs root" in result.stderr
        return
    before = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    result = run(bin_dir, "quiesce", "demo", "--output", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    levels = {i["instance"]: i["achieved"] for i in report["instances"]}
    assert levels == {"web-1": "application", "web-2": "application", "db-1": "filesystem", "legacy-1": "crash", "cache-1": "crash",
                      "win-sql-1": "application", "win-mail-1": "filesystem", "win-old-1": "crash"}
    reasons = {i["instance"]: i["reasons"] for i in report["instances"]}
    assert reasons["db-1"][0].startswith("prescript-wrong-mode") and reasons["legacy-1"][0].startswith("no-eligible-filesystem")
    # The simulated Windows instances: VSS writers, and the seed's reasons for each level below application.
    writers = {i["instance"]: i.get("vss_writers", []) for i in report["instances"]}
    assert writers["win-sql-1"] == ["SqlServerWriter STABLE", "Registry Writer STABLE"]
    assert reasons["win-mail-1"] == ["vss-writer-failed: Microsoft Exchange Writer FAILED_AT_FREEZE VSS_E_WRITERERROR_NONRETRYABLE (0x800423F4)"]
    assert reasons["win-old-1"][0].startswith("vss-service-not-running: the Volume Shadow Copy service is stopped")
    groups = {i["instance"]: i.get("consistency_group") for i in report["instances"]}
    assert groups["web-1"] == groups["web-2"] == "web" and groups["db-1"] is None, groups
    assert report["verification"].endswith("checksums match") and report["surprises"] == []
    assert report["elapsed_ms"] < 60000
    assert subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout == before
    with open("/proc/mounts") as mounts:
        assert "quiesce-demo" not in mounts.read()
    table = run(bin_dir, "quiesce", "demo")
    assert table.returncode == 0 and "Every instance reached the level the demo expects" in table.stdout
    assert "Consistency group web: application, one point in time across web-1, web-2" in table.stdout, table.stdout


def test_unreachable_engine_exits_69(bin_dir, tmp_path):
    result = run(bin_dir, "quiesce", "agents", "--admin-socket", str(tmp_path / "none.sock"))
    assert result.returncode == 69
    assert "is `quiesce serve` running?" in result.stderr


def test_usage_errors_exit_64_and_say_what_was_expected(bin_dir, tmp_path):
    result = run(bin_dir, "quiesce", "serve", "--listen", "nonsense", "--ca-dir", str(tmp_path))
    assert result.returncode == 64, result.stderr
    assert 'expected HOST:PORT' in result.stderr and '"nonsense"' in result.stderr
    assert "quiesce serve" in result.stderr  # the usage shown is the subcommand's
    result = run(bin_dir, "quiesce", "ca", "issue", "--dir", str(tmp_path))
    assert result.returncode == 64, result.stderr
    assert "exactly one of --agent ID or --operator NAME" in result.stderr
    result = run(bin_dir, "quiesce", "demo", "--agents", "0")
    assert result.returncode == 64, result.stderr
    agent = ["quiesce-agent", "run", "--engine", "127.0.0.1:1", "--cert", "c", "--key", "k", "--ca", "a"]
    result = run(bin_dir, *agent, "--syncfs", "sometimes")
    assert result.returncode == 64, result.stderr
    assert '--syncfs: expected auto, always or never, found "sometimes"' in result.stderr
    result = run(bin_dir, *agent, "--syncfs-min-dirty-mib", "-1")
    assert result.returncode == 64, result.stderr


def test_ca_errors_name_the_problem(bin_dir, tmp_path):
    ca = str(tmp_path / "ca")
    assert run(bin_dir, "quiesce", "ca", "init", "--dir", ca).returncode == 0
    assert oct(os.stat(os.path.join(ca, "ca.key")).st_mode & 0o777) == "0o600"
    again = run(bin_dir, "quiesce", "ca", "init", "--dir", ca)
    assert again.returncode == 1 and "a CA already exists here; pass --force" in again.stderr
    bad = run(bin_dir, "quiesce", "ca", "issue", "--agent", "../../etc/x", "--dir", ca)
    assert bad.returncode == 1 and 'found "../../etc/x"' in bad.stderr
    with open(os.path.join(ca, "engine.pem"), "w") as f:
        f.write("not a certificate\n")
    serve = run(bin_dir, "quiesce", "serve", "--listen", "127.0.0.1:0", "--ca-dir", ca, "--admin-socket", str(tmp_path / "a.sock"),
                "--catalog", str(tmp_path / "catalog.db"))
    assert serve.returncode == 1
    assert "engine.pem: expected a PEM certificate" in serve.stderr and '"not a certificate"' in serve.stderr


def test_agent_facts_without_an_engine(bin_dir):
    result = run(bin_dir, "quiesce-agent", "facts", "--output", "json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["os_family"] == "linux" and facts["mounts"]


def test_help_reads_well(bin_dir):
    result = run(bin_dir, "quiesce", "--help")
    assert result.returncode == 0
    for word in ("demo", "serve", "agents", "facts", "ca", "Exit codes"):
        assert word in result.stdout


def gone_reader():
    """A pipe whose read end is already closed: whoever writes to it meets EPIPE (or SIGPIPE,
    which subprocess restores to its default in the child, as a shell would)."""
    r, w = os.pipe()
    os.close(r)
    return w


def test_demo_finishes_when_nobody_reads_its_progress(bin_dir):
    # `quiesce demo 2>&1 | head -1` and friends: the progress lines on stderr go nowhere;
    # the command must still finish its work and exit 0, not die of SIGPIPE (-13) or
    # trap on the write error (-4).
    w = gone_reader()
    try:
        result = subprocess.run([os.path.join(bin_dir, "quiesce"), "demo", "--sessions-only", "--agents", "2"],
                                stdout=subprocess.PIPE, stderr=w, text=True, timeout=120)
    finally:
        os.close(w)
    assert result.returncode == 0, f"exit {result.returncode}"
    assert "demo-2" in result.stdout


def test_exit_codes_hold_when_nobody_reads_stderr(bin_dir, tmp_path):
    # Scripts rely on the exit code, also when they threw stderr away early: the error
    # line is lost, the status is not (it was -13, SIGPIPE, for both commands).
    cases = [
        (["quiesce-agent", "run", "--engine", "127.0.0.1:1", "--cert", str(tmp_path / "missing.pem"), "--key", "k", "--ca", "c"], 1),
        (["quiesce", "agents", "--admin-socket", str(tmp_path / "none.sock")], 69),
    ]
    for args, expected in cases:
        w = gone_reader()
        try:
            result = subprocess.run([os.path.join(bin_dir, args[0]), *args[1:]], stdout=subprocess.DEVNULL, stderr=w, timeout=60)
        finally:
            os.close(w)
        assert result.returncode == expected, f"{args[0]} {args[1]}: exit {result.returncode}, expected {expected}"
