"""The VSS messages, driven by a stock grpcio engine against a real `quiesce-agent run --vss-simulator`.

A third party writing their own engine (or checking ours) sees exactly this: the agent plays a
Windows instance from a scenario file, answers VssFreeze once the volumes' writes are held (a real
FIFREEZE of loop-mounted filesystems the test made, through the thaw guard), and VssThaw with how
the hold ended and every writer's state. Needs root (loop devices, FIFREEZE)."""
import json
import os
import queue
import subprocess
import threading
import time

import grpc
import pytest

from conftest import mount_ext4, serve_agent_service, undo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and FIFREEZE")


class InteractiveEngine:
    """A grpcio server playing the engine: the test sends commands and reads their results;
    heartbeats go out every 200 ms, as the real engine's do while frozen."""

    def __init__(self, stubs, engine):
        self.stubs = stubs
        self.hello = queue.Queue()
        self.commands = queue.Queue()
        self.results = {}
        self.results_ready = threading.Condition()
        self.next_id = 100
        outer = self

        class Service(stubs.session_pb2_grpc.AgentServiceServicer):
            def Session(self, request_iterator, context):
                first = next(request_iterator)
                outer.hello.put(first)

                def read():
                    try:
                        for message in request_iterator:
                            if message.WhichOneof("kind") == "result":
                                with outer.results_ready:
                                    outer.results[message.result.command_id] = message.result
                                    outer.results_ready.notify_all()
                    except grpc.RpcError:
                        pass  # the session ended (the test closed it, or the agent went away): nothing more to read

                threading.Thread(target=read, daemon=True).start()
                reply = stubs.session_pb2.EngineMessage()
                reply.hello.protocol.major = 1
                reply.hello.session_id = "py-vss"
                reply.hello.heartbeat_interval_ms = 200
                yield reply
                sequence = 0
                while context.is_active():
                    try:
                        command = outer.commands.get(timeout=0.2)
                    except queue.Empty:
                        sequence += 1
                        beat = stubs.session_pb2.EngineMessage()
                        beat.heartbeat.sequence = sequence
                        yield beat
                        continue
                    if command is None:
                        return
                    yield command

        self.server, self.port = serve_agent_service(stubs, engine, Service())

    def call(self, fill, timeout=15.0):
        """Sends one command (`fill` sets its action) and waits for its result."""
        self.next_id += 1
        command = self.stubs.session_pb2.EngineMessage()
        command.command.id = self.next_id
        command.command.deadline_ms = int(timeout * 1000)
        fill(command.command)
        self.commands.put(command)
        deadline = time.monotonic() + timeout
        with self.results_ready:
            while self.next_id not in self.results:
                left = deadline - time.monotonic()
                assert left > 0, f"no answer to command {self.next_id}"
                self.results_ready.wait(left)
            return self.results[self.next_id]

    def stop(self):
        self.commands.put(None)
        self.server.stop(0)


def write_blocks(path, within=0.3):
    """True when a small write to `path` does not finish within `within` seconds (the volume is held)."""
    writer = subprocess.Popen(["sh", "-c", f"echo x > '{path}' && sync '{path}'"])
    try:
        writer.wait(timeout=within)
        return False
    except subprocess.TimeoutExpired:
        return writer


@pytest.fixture
def windows(stubs, engine, bin_dir, tmp_path):
    """A `quiesce-agent run --vss-simulator` with C:\\ and D:\\ on loop-mounted ext4, dialling a grpcio engine."""
    loops, mounts, agents = [], [], []
    py = InteractiveEngine(stubs, engine)
    try:
        c = mount_ext4(str(tmp_path / "c.img"), str(tmp_path / "c"), loops, mounts)
        d = mount_ext4(str(tmp_path / "d.img"), str(tmp_path / "d"), loops, mounts)
        scenario = {
            "hostname": "win-py",
            "os_name": "Microsoft Windows Server 2022 Datacenter",
            "volumes": [{"name": "C:\\", "fs_type": "NTFS", "path": c}, {"name": "D:\\", "fs_type": "ReFS", "path": d}],
            "writers": [
                {"name": "SqlServerWriter", "id": "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a", "components": ["sales"]},
                {"name": "BadWriter", "phases": {"freeze": {"fail": "VSS_E_WRITERERROR_NONRETRYABLE"}}},
            ],
        }
        path = tmp_path / "scenario.json"
        path.write_text(json.dumps(scenario))
        cert, key = engine.issue_agent("win-py")
        agent = subprocess.Popen(
            [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{py.port}", "--cert", cert, "--key", key,
             "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--vss-simulator", str(path), "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        agents.append(agent)
        hello = py.hello.get(timeout=20)
        yield py, hello, {"C:\\": c, "D:\\": d}
    finally:
        py.stop()
        undo(agents, mounts, loops)


def test_grpcio_engine_drives_a_vss_snapshot_set(windows):
    py, hello, volumes = windows
    assert list(hello.hello.capabilities) == ["facts", "vss"]

    facts = py.call(lambda c: c.facts.SetInParent()).facts
    assert facts.os_family == "windows" and facts.vss_service == "running" and facts.guard_ready
    assert sorted((m.mount_point, m.fs_type) for m in facts.mounts) == [("C:\\", "NTFS"), ("D:\\", "ReFS")]
    assert [(w.name, w.state, w.state_code) for w in facts.vss_writers] == [("SqlServerWriter", "STABLE", 1), ("BadWriter", "STABLE", 1)]

    # Writers on, BadWriter left out by name: writes held on both volumes until the thaw.
    def freeze(c):
        c.vss_freeze.freeze_id = "py-set-1"
        c.vss_freeze.volumes.extend(["C:\\", "D:\\"])
        c.vss_freeze.include_writers = True
        c.vss_freeze.exclude_writer_names.append("BadWriter")
        c.vss_freeze.budget_ms = 5000

    result = py.call(freeze)
    assert result.status.code == 0, result.status.message
    held = result.vss_freeze
    assert held.all_held and held.budget_ms == 5000 and len(held.snapshot_set_id) == 36
    assert [v.mount_point for v in held.volumes] == ["C:\\", "D:\\"] or sorted(v.mount_point for v in held.volumes) == ["C:\\", "D:\\"]
    states = {w.name: (w.state, w.excluded) for w in held.writers}
    assert states == {"SqlServerWriter": ("WAITING_FOR_THAW", False), "BadWriter": ("STABLE", True)}
    assert any(call.startswith("SetBackupState(COPY)") for call in held.calls), list(held.calls)
    blocked = write_blocks(os.path.join(volumes["D:\\"], "during"))
    assert blocked, "a write to D:\\ finished while its writes were held"

    thawed = py.call(lambda c: setattr(c.vss_thaw, "freeze_id", "py-set-1"))
    assert thawed.status.code == 0, thawed.status.message
    vss = thawed.vss_thaw
    assert vss.writes_held and vss.snapshot_set_id == held.snapshot_set_id and vss.error == ""
    assert vss.thaw.cause == 1 and vss.thaw.within_budget  # THAW_CAUSE_COMMAND
    assert {w.name: w.state for w in vss.writers} == {"SqlServerWriter": "STABLE", "BadWriter": "STABLE"}
    assert blocked.wait(timeout=5) == 0

    # Every writer in: BadWriter fails at freeze; the hold still stands (filesystem-consistent), and says so.
    def freeze_all(c):
        c.vss_freeze.freeze_id = "py-set-2"
        c.vss_freeze.volumes.append("D:\\")
        c.vss_freeze.include_writers = True
        c.vss_freeze.backup_type = 1  # FULL

    second = py.call(freeze_all)
    assert second.status.code == 0 and second.vss_freeze.all_held
    bad = next(w for w in second.vss_freeze.writers if w.name == "BadWriter")
    assert (bad.state, bad.state_code, bad.last_error, bad.last_error_code, bad.healthy) == \
        ("FAILED_AT_FREEZE", 9, "VSS_E_WRITERERROR_NONRETRYABLE", 0x800423F4, False)
    assert second.vss_freeze.snapshot_set_id != held.snapshot_set_id
    assert any(call.startswith("SetBackupState(FULL)") for call in second.vss_freeze.calls)
    done = py.call(lambda c: setattr(c.vss_thaw, "freeze_id", "py-set-2")).vss_thaw
    assert done.writes_held and {w.name: w.state for w in done.writers}["BadWriter"] == "FAILED_AT_FREEZE"


def test_vss_refusals_name_the_vss_error(windows):
    py, _, volumes = windows

    def unknown_volume(c):
        c.vss_freeze.freeze_id = "py-bad"
        c.vss_freeze.volumes.append("E:\\")
        c.vss_freeze.include_writers = True

    refused = py.call(unknown_volume)
    assert refused.status.reason == "vss-volume-unknown"
    assert "VSS_E_OBJECT_NOT_FOUND (0x80042308)" in refused.status.message and "C:\\, D:\\" in refused.status.message
    assert refused.vss_freeze.error == "VSS_E_OBJECT_NOT_FOUND" and not refused.vss_freeze.all_held
    # Nothing was left held: a write goes through at once.
    assert write_blocks(os.path.join(volumes["C:\\"], "after")) is False

    # A thaw of a set that does not exist; a Linux freeze, which a Windows agent does not do.
    unknown = py.call(lambda c: setattr(c.vss_thaw, "freeze_id", "never"))
    assert unknown.status.reason == "unknown-freeze"
    linux = py.call(lambda c: (setattr(c.freeze, "freeze_id", "f"), c.freeze.mount_points.append(volumes["C:\\"])))
    assert linux.status.reason == "not-implemented" and "VSS" in linux.status.message


def test_hold_limit_releases_writes_and_reports_hold_writes_timeout(windows):
    py, _, volumes = windows

    def freeze(c):
        c.vss_freeze.freeze_id = "py-limit"
        c.vss_freeze.volumes.append("D:\\")
        c.vss_freeze.include_writers = True
        c.vss_freeze.budget_ms = 60000  # asked for a minute: VSS holds at most 10 s

    held = py.call(freeze).vss_freeze
    assert held.all_held and held.budget_ms == 10000
    began = time.monotonic()
    blocked = write_blocks(os.path.join(volumes["D:\\"], "held"))
    assert blocked
    assert blocked.wait(timeout=15) == 0
    released_after = time.monotonic() - began
    assert 8.5 < released_after < 11.5, released_after
    late = py.call(lambda c: setattr(c.vss_thaw, "freeze_id", "py-limit")).vss_thaw
    assert not late.writes_held and late.error == "VSS_E_HOLD_WRITES_TIMEOUT" and late.error_code == 0x80042314
    assert late.thaw.cause == 2  # THAW_CAUSE_BUDGET
    assert any("AbortBackup" in call for call in late.calls)
