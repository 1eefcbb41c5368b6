"""The ec2 provider against moto's real server (started here on 127.0.0.1, reset
between tests) behind the fault proxy of ec2_fault_proxy.py, driven through the
`quiesce` CLI as an operator runs it, and cross-checked with a stock client
(`aws ec2 …` from awscli, and boto3 for set-up). Nothing leaves loopback: every
client is given the endpoint, and the instance-metadata lookup is turned off."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import mount_ext4, start_agent, undo, write_hooks  # noqa: E402
from ec2_fault_proxy import FaultProxy  # noqa: E402

boto3 = pytest.importorskip("boto3")
SECRET = "moto-secret-never-printed"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_port():
    port = free_port()
    # Without moto's ~1,200 public AMI snapshots, whose filtering would make every DescribeSnapshots slow.
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto's server did not start")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy(moto_port):
    p = FaultProxy(moto_port)
    yield p
    p.close()


class AWS:
    """moto reset, a profile in a credentials file of the test's own, clients, helpers."""

    def __init__(self, moto_port, proxy, tmp_path, bin_dir):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST"), timeout=10)
        proxy.reset()
        self.moto = f"http://127.0.0.1:{moto_port}"
        self.proxy = proxy
        self.dir = tmp_path
        self.bin = bin_dir
        (tmp_path / "aws").mkdir()
        (tmp_path / "aws" / "credentials").write_text(f"[moto]\naws_access_key_id = AKIAQUIESCETEST01\naws_secret_access_key = {SECRET}\n")
        (tmp_path / "aws" / "config").write_text("[profile moto]\nregion = us-east-1\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws" / "credentials"), "AWS_CONFIG_FILE": str(tmp_path / "aws" / "config"),
                         "AWS_EC2_METADATA_DISABLED": "true", "QUIESCE_HOME": str(tmp_path / "home")})
        self.ec2 = boto3.client("ec2", endpoint_url=self.moto, region_name="us-east-1", aws_access_key_id="AKIAQUIESCETEST01",
                                aws_secret_access_key=SECRET)
        self.ami = "ami-0123456789abcdef0"  # moto checks no AMI, and loads none (MOTO_EC2_LOAD_DEFAULT_AMIS)
        self.outputs = []

    def instance(self, data_volumes=1):
        """A moto instance with a root volume and `data_volumes` more; (instance id, [root, data…])."""
        mappings = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}]
        mappings += [{"DeviceName": f"/dev/sd{chr(ord('f') + n)}", "Ebs": {"VolumeSize": 2}} for n in range(data_volumes)]
        i = self.ec2.run_instances(ImageId=self.ami, MinCount=1, MaxCount=1, BlockDeviceMappings=mappings,
                                   Placement={"AvailabilityZone": "us-east-1a"})["Instances"][0]
        by_device = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in i["BlockDeviceMappings"]}
        return i["InstanceId"], [by_device[m["DeviceName"]] for m in mappings]

    def snapshots(self, **tags):
        filters = [{"Name": f"tag:{k.replace('_', ':')}", "Values": [v]} for k, v in tags.items()]
        return self.ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]

    def fleet(self, rows, policies=None, extra="", provider_extra="", more_providers=""):
        policies = policies or "  base: { plugin: crash, wanted: crash }\n"
        text = (f"providers:\n  aws: {{ kind: ec2, profile: moto, endpoint_url: \"{self.proxy.url}\", poll_ms: 20{provider_extra} }}\n{more_providers}"
                f"policies:\n{policies}instances:\n" + "".join(f"  - {r}\n" for r in rows) + (extra or "run: { agent_wait_s: 0 }\n"))
        path = self.dir / "fleet.yaml"
        path.write_text(text)
        return str(path)

    def quiesce(self, *args, timeout=120):
        proc = subprocess.run([os.path.join(self.bin, "quiesce"), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        self.outputs.append(proc.stdout + proc.stderr)
        return proc

    def backup(self, fleet, *args):
        if not (self.dir / "ca").exists():
            assert self.quiesce("ca", "init", "--dir", str(self.dir / "ca"), "--ip", "127.0.0.1").returncode == 0
        return self.quiesce("backup", "--fleet", fleet, "--catalog", str(self.dir / "catalog.db"), "--ca-dir", str(self.dir / "ca"),
                            "--listen", "127.0.0.1:0", "--admin-socket", str(self.dir / "admin.sock"), *args)

    def store(self, *args):
        return self.quiesce(*args, "--catalog", str(self.dir / "catalog.db"))

    def aws(self, *args):
        """The stock AWS CLI, at moto directly."""
        proc = subprocess.run([sys.executable, "-m", "awscli", "ec2", *args, "--endpoint-url", self.moto, "--region", "us-east-1",
                               "--profile", "moto", "--output", "json"], capture_output=True, text=True, env=self.env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip() else {}


@pytest.fixture
def aws(moto_port, proxy, tmp_path, bin_dir):
    a = AWS(moto_port, proxy, tmp_path, bin_dir)
    yield a
    # Secrets never appear in anything Quiesce printed.
    for out in a.outputs:
        assert SECRET not in out


def report(proc):
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "report", proc.stdout + proc.stderr
    return events, {i["instance"]: i for i in events[-1]["instances"]}


def test_backup_list_show_verify_restore_prune_through_every_command(aws):
    i1, v1 = aws.instance(data_volumes=2)
    i2, v2 = aws.instance(data_volumes=1)
    # A local pool beside the EC2 account: one catalog holds both providers' groups.
    pool = aws.dir / "pool"
    (pool / "disks").mkdir(parents=True)
    (pool / "disks" / "loc-1-root.img").write_bytes(b"local disk" * 1000)
    fleet = aws.fleet([f"{{ id: web-1, policy: base, provider: aws, ec2_instance: {i1} }}",
                       f"{{ id: web-2, policy: base, provider: aws, ec2_instance: {i2}, exclude_boot_volume: true }}",
                       f"{{ id: web-3, policy: base, provider: aws, disks: [{v2[0]}] }}",
                       "{ id: loc-1, policy: base, provider: pool, disks: [loc-1-root] }"],
                      more_providers=f"  pool: {{ kind: local, pool: {pool} }}\n")
    checked = aws.quiesce("check", "--fleet", fleet)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "permission ec2:CreateSnapshots" in checked.stdout and "every check passed" in checked.stdout
    assert "1 disk in the pool" in checked.stdout
    assert f"{i1} (running): 3 volumes" in checked.stdout

    proc = aws.backup(fleet, "--run-id", "r-e2e", "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events, by = report(proc)
    check = next(e for e in events if e["event"] == "check")
    assert check["provider"] == "aws" and check["kind"] == "ec2" and check["failed"] == []
    assert by["web-1"]["disks"] == 3 and by["web-2"]["disks"] == 1 and by["web-3"]["disks"] == 1
    # The stock client sees Quiesce's snapshots with their tags: one per volume, the boot volume of web-2 left out.
    made = aws.aws("describe-snapshots", "--owner-ids", "self", "--filters", "Name=tag:quiesce:run,Values=r-e2e")["Snapshots"]
    assert sorted(s["VolumeId"] for s in made) == sorted(v1 + v2[1:] + v2[:1])
    for s in made:
        tags = {t["Key"]: t["Value"] for t in s["Tags"]}
        assert tags["quiesce:level"] == "crash" and tags["AppConsistent"] == "false" and tags["quiesce:run"] == "r-e2e"
        assert tags["quiesce:token"] == f"r-e2e/{tags['quiesce:instance']}" and tags["quiesce:group"].startswith("eg-")

    listing = aws.store("snapshots", "--output", "json")
    assert listing.returncode == 0, listing.stderr
    groups = {g["instanceID"]: g for g in json.loads(listing.stdout)}
    assert set(groups) == {"web-1", "web-2", "web-3", "loc-1"}
    local = groups.pop("loc-1")
    assert local["provider"] == "pool" and local["providerKind"] == "local" and local["state"] == "ready"
    assert all(g["provider"] == "aws" and g["providerKind"] == "ec2" and g["state"] == "ready" for g in groups.values())
    # The local group through the same commands, found by the provider its run recorded (no --pool).
    assert aws.store("verify", local["id"]).returncode == 0
    restored_local = aws.store("restore", local["id"], "--as-new")
    assert restored_local.returncode == 0 and str(pool / "disks" / f"loc-1-root-restored-{local['id']}.img") in restored_local.stdout
    shown = aws.store("show", groups["web-1"]["id"])
    assert shown.returncode == 0 and f"(provider aws, ec2 {groups['web-1']['id']})" in shown.stdout
    verified = aws.store("verify", groups["web-1"]["id"], "--output", "json")
    assert verified.returncode == 0 and all(r["outcome"] == "ok" for r in json.loads(verified.stdout)), verified.stdout

    restored = aws.store("restore", groups["web-2"]["id"], "--as-new", "--output", "json")
    assert restored.returncode == 0, restored.stderr
    new = json.loads(restored.stdout)
    assert [r["disk"] for r in new] == [v2[1]]
    volume = aws.aws("describe-volumes", "--volume-ids", new[0]["restored_as"])["Volumes"][0]
    tags = {t["Key"]: t["Value"] for t in volume["Tags"]}
    assert volume["AvailabilityZone"] == "us-east-1a" and tags["quiesce:source-volume"] == v2[1]
    assert tags["quiesce:restored-from"] == groups["web-2"]["disks"][0]["snapshotID"]
    assert aws.store("restore", groups["web-2"]["id"], "--in-place").returncode == 1

    # A rerun of the same run id makes nothing new.
    again = aws.backup(fleet, "--run-id", "r-e2e", "--output", "json")
    assert again.returncode == 0
    _, by = report(again)
    assert all(any(w.startswith("already-done") for w in i["warnings"]) for i in by.values()), by
    assert len(aws.snapshots(quiesce_run="r-e2e")) == 5

    pruned = aws.store("prune", "--keep-last", "0", "--instance", "web-1")
    assert pruned.returncode == 0 and "deleted 1" in pruned.stdout, pruned.stdout + pruned.stderr
    assert len(aws.snapshots(quiesce_run="r-e2e")) == 2
    assert len(json.loads(aws.store("snapshots", "--output", "json").stdout)) == 3


def test_throttles_5xx_resets_and_pending_polls_make_no_duplicates_and_fail_nothing(aws):
    instances = [aws.instance(data_volumes=1) for _ in range(4)]
    fleet = aws.fleet([f"{{ id: t-{n}, policy: base, ec2_instance: {i} }}" for n, (i, _) in enumerate(instances)]
                      + [f"{{ id: t-vol, policy: base, disks: [{instances[0][1][1]}] }}"],
                      policies="  base: { plugin: crash, wanted: crash, retries: 3 }\n")
    aws.proxy.throttle_rate = 0.3
    aws.proxy.retry_after = 1
    aws.proxy.pending_polls = 3
    aws.proxy.latency_ms = 3
    aws.proxy.script("CreateSnapshots", "5xx", "throttle", "reset-after", "reset-before")
    aws.proxy.script("CreateSnapshot", "reset-after")
    aws.proxy.script("DescribeSnapshots", "5xx")
    proc = aws.backup(fleet, "--run-id", "r-faults", "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, by = report(proc)
    assert all(i["state"] == "succeeded" for i in by.values()), by
    stats = aws.proxy.stats
    assert stats["throttled"] > 0 and stats["faults"] == {"5xx": 2, "throttle": 1, "reset-after": 2, "reset-before": 1}, stats
    warnings = [w for i in by.values() for w in i["warnings"]]
    assert any("throttled" in w for w in warnings), warnings
    # Zero duplicates: exactly one snapshot per volume per instance, though replies were lost.
    for n, (_, volumes) in enumerate(instances):
        snaps = aws.snapshots(quiesce_run="r-faults", quiesce_instance=f"t-{n}")
        assert sorted(s["VolumeId"] for s in snaps) == sorted(volumes), (n, snaps)
    assert len(aws.snapshots(quiesce_run="r-faults", quiesce_instance="t-vol")) == 1
    # Every group waited out its pending polls and is recorded ready.
    groups = json.loads(aws.store("snapshots", "--run", "r-faults", "--output", "json").stdout)
    assert len(groups) == 5 and all(g["state"] == "ready" for g in groups)


def test_check_names_a_missing_permission_and_a_run_freezes_nothing(aws):
    i1, _ = aws.instance()
    fleet = aws.fleet([f"{{ id: web-1, policy: base, ec2_instance: {i1} }}", "{ id: web-2, policy: base, ec2_instance: i-0000000000000dead }"])
    aws.proxy.deny_actions = {"CreateSnapshots"}
    checked = aws.quiesce("check", "--fleet", fleet, "--output", "json")
    assert checked.returncode == 3, checked.stdout + checked.stderr
    rows = json.loads(checked.stdout)
    denied = next(r for r in rows if r["item"] == "permission ec2:CreateSnapshots + ec2:CreateTags on create")
    assert denied["ok"] == "false" and "UnauthorizedOperation" in denied["detail"]
    missing = next(r for r in rows if r["instance"] == "web-2")
    assert missing["ok"] == "false" and "i-0000000000000dead does not exist" in missing["detail"]
    before = aws.proxy.stats["requests"].get("CreateSnapshots", 0)
    proc = aws.backup(fleet, "--run-id", "r-denied", "--output", "json")
    assert proc.returncode == 3
    _, by = report(proc)
    assert by["web-1"]["reasons"][0].startswith("provider-check: aws permission ec2:CreateSnapshots + ec2:CreateTags on create: missing: UnauthorizedOperation")
    assert aws.proxy.stats["requests"].get("CreateSnapshots", 0) == before + 1  # the check's DryRun only
    assert aws.snapshots(quiesce_run="r-denied") == []
    # Only what prune needs missing (checked on a snapshot of Quiesce's, once there is one): a warning, and the run goes on.
    aws.proxy.deny_actions = set()
    fleet = aws.fleet([f"{{ id: web-1, policy: base, ec2_instance: {i1} }}"])
    checked = aws.quiesce("check", "--fleet", fleet)
    assert checked.returncode == 0 and "not checked yet: no snapshot of Quiesce's exists" in checked.stdout, checked.stdout
    assert aws.backup(fleet, "--run-id", "r-first").returncode == 0
    aws.proxy.deny_actions = {"DeleteSnapshot"}
    checked = aws.quiesce("check", "--fleet", fleet)
    assert checked.returncode == 2 and "warning" in checked.stdout and "ec2:DeleteSnapshot (prune)" in checked.stdout, checked.stdout
    assert aws.backup(fleet, "--run-id", "r-warn").returncode == 0


def test_a_snapshot_made_by_hand_with_a_quiesce_token_is_adopted_not_duplicated(aws):
    _, volumes = aws.instance(data_volumes=0)
    made = aws.aws("create-snapshot", "--volume-id", volumes[0], "--description", "by hand",
                   "--tag-specifications", "ResourceType=snapshot,Tags=[{Key=quiesce:token,Value=r-hand/web-1}]")
    fleet = aws.fleet([f"{{ id: web-1, policy: base, disks: [{volumes[0]}] }}"])
    proc = aws.backup(fleet, "--run-id", "r-hand", "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, by = report(proc)
    assert by["web-1"]["reasons"][0].startswith("adopted-unproven:"), by
    snaps = aws.aws("describe-snapshots", "--owner-ids", "self", "--filters", f"Name=volume-id,Values={volumes[0]}")["Snapshots"]
    assert [s["SnapshotId"] for s in snaps] == [made["SnapshotId"]]
    tags = {t["Key"]: t["Value"] for t in snaps[0]["Tags"]}
    assert tags["quiesce:level"] == "crash" and tags["quiesce:group"].startswith("eg-")
    assert aws.proxy.stats["requests"].get("CreateSnapshot", 0) == 1  # the check's DryRun only


def test_credentials_problems_are_said_with_the_fleet_line_and_no_secret(aws):
    i1, _ = aws.instance()
    fleet = aws.fleet([f"{{ id: web-1, policy: base, ec2_instance: {i1} }}"]).replace("profile: moto", "profile: nope")
    (aws.dir / "fleet.yaml").write_text(open(fleet).read().replace("profile: moto", "profile: nope"))
    proc = aws.backup(str(aws.dir / "fleet.yaml"))
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert "fleet.yaml:2:" in proc.stderr and "providers.aws: provider aws (ec2): no AWS credentials for profile nope" in proc.stderr
    checked = aws.quiesce("check", "--fleet", str(aws.dir / "fleet.yaml"))
    assert checked.returncode == 3 and "configuration" in checked.stdout and "no AWS credentials" in checked.stdout




@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and FIFREEZE")
def test_agents_freeze_loop_disks_and_the_ec2_snapshots_carry_the_proven_level(aws):
    """The fleet run end to end: two real quiesce-agent processes dial a one-shot engine,
    freeze ext4 filesystems on loop devices around CreateSnapshots of the matching moto
    instances; the level each thaw proved is on every snapshot as tags (a-2's prescript
    is group-writable, so it is downgraded to filesystem with the reason)."""
    w = aws.dir
    mounts, loops, agents = [], [], []
    try:
        assert aws.quiesce("ca", "init", "--dir", str(w / "ca"), "--ip", "127.0.0.1").returncode == 0
        rows = []
        for a in ("a-1", "a-2"):
            assert aws.quiesce("ca", "issue", "--dir", str(w / "ca"), "--agent", a).returncode == 0
            mount_ext4(w / f"{a}.img", w / a, loops, mounts)
            hooks = w / f"h-{a}"
            write_hooks(hooks)
            instance, _ = aws.instance(data_volumes=1)
            rows.append(f"{{ id: {a}, policy: app, ec2_instance: {instance}, options: {{ only_mounts: [{w / a}], "
                        f"prescript_path: {hooks / 'prescript.sh'}, postscript_path: {hooks / 'postscript.sh'} }} }}")
        os.chmod(w / "h-a-2" / "prescript.sh", 0o770)
        port = free_port()
        fleet = aws.fleet(rows, policies="  app: { plugin: linux-freeze, wanted: application, minimum: filesystem }\n",
                          extra="run: { agent_wait_s: 20 }\n")
        proc = subprocess.Popen([os.path.join(aws.bin, "quiesce"), "backup", "--fleet", fleet, "--listen", f"127.0.0.1:{port}",
                                 "--ca-dir", str(w / "ca"), "--catalog", str(w / "catalog.db"), "--admin-socket", str(w / "admin.sock"),
                                 "--run-id", "r-agents", "--output", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=aws.env)
        for a in ("a-1", "a-2"):
            agents.append(start_agent(aws.bin, port, str(w / "ca"), a, str(w / f"h-{a}")))
        out, err = proc.communicate(timeout=120)
        aws.outputs.append(out + err)
        assert proc.returncode == 2, out + err
        events = [json.loads(line) for line in out.splitlines()]
        by = {i["instance"]: i for i in events[-1]["instances"]}
        assert by["a-1"]["achieved"] == "application" and by["a-1"]["frozen_ms"] > 0 and by["a-1"]["disks"] == 2
        assert by["a-2"]["achieved"] == "filesystem" and by["a-2"]["reasons"][0].startswith("prescript-wrong-mode")
        for a, level, app in (("a-1", "application", "true"), ("a-2", "filesystem", "false")):
            snaps = aws.aws("describe-snapshots", "--owner-ids", "self", "--filters", "Name=tag:quiesce:run,Values=r-agents",
                            f"Name=tag:quiesce:instance,Values={a}")["Snapshots"]
            assert len(snaps) == 2
            for s in snaps:
                tags = {t["Key"]: t["Value"] for t in s["Tags"]}
                assert tags["quiesce:level"] == level and tags["AppConsistent"] == app, tags
            if level == "filesystem":
                assert tags["quiesce:reason"].startswith("prescript-wrong-mode")
        # Every filesystem is thawed: writes complete.
        for m in mounts:
            subprocess.run(["timeout", "5", "sh", "-c", f"echo x > {m}/after"], check=True)
    finally:
        undo(agents, mounts, loops)
