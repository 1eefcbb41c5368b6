"""Fixtures for interop tests: the built binaries, Python stubs generated from
proto/ with stock grpcio-tools, and a running `quiesce serve` with its own CA."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def bin_dir():
    path = os.environ.get("QUIESCE_BIN")
    if not path:
        path = subprocess.check_output(["swift", "build", "--show-bin-path"], cwd=ROOT, text=True).strip()
    for name in ("quiesce", "quiesce-agent"):
        if not os.access(os.path.join(path, name), os.X_OK):
            pytest.fail(f"{name} is not built in {path}; run `swift build` first")
    return path


@pytest.fixture(scope="session")
def stubs():
    """Generates Python modules from proto/ exactly as a third party would."""
    out = tempfile.mkdtemp(prefix="quiesce-pystubs-")
    protos = []
    for base, _, files in os.walk(os.path.join(ROOT, "proto")):
        protos += [os.path.relpath(os.path.join(base, f), os.path.join(ROOT, "proto")) for f in files if f.endswith(".proto")]
    subprocess.check_call(
        [sys.executable, "-m", "grpc_tools.protoc", "--proto_path=proto", f"--python_out={out}", f"--grpc_python_out={out}", *sorted(protos)],
        cwd=ROOT,
    )
    sys.path.insert(0, out)
    from quiesce.agent.v1 import actions_pb2, session_pb2, session_pb2_grpc  # noqa: E402

    class Stubs:
        pass

    s = Stubs()
    s.session_pb2, s.session_pb2_grpc, s.actions_pb2 = session_pb2, session_pb2_grpc, actions_pb2
    yield s
    shutil.rmtree(out, ignore_errors=True)


class Engine:
    def __init__(self, bin_dir, workdir):
        self.bin_dir = bin_dir
        self.dir = workdir
        self.ca_dir = os.path.join(workdir, "ca")
        self.socket = os.path.join(workdir, "admin.sock")
        self.quiesce(["ca", "init", "--dir", self.ca_dir, "--ip", "127.0.0.1"])
        self.log = open(os.path.join(workdir, "engine.log"), "w+")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "quiesce"), "serve", "--listen", "127.0.0.1:0", "--ca-dir", self.ca_dir, "--admin-socket", self.socket,
             "--catalog", os.path.join(workdir, "catalog.db"), "--enrol-listen", "127.0.0.1:0", "--operator-listen", "127.0.0.1:0",
             "--audit-log", os.path.join(workdir, "audit.jsonl")],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"engine did not start: {line!r}\n{self.logs()}")
        self.port = int(match.group(1))
        self.enrol_port = int(re.search(r"enrolment on 127\.0\.0\.1:(\d+)", line).group(1))
        self.operator_port = int(re.search(r"operators on 127\.0\.0\.1:(\d+)", line).group(1))
        self.audit = os.path.join(workdir, "audit.jsonl")

    def quiesce(self, args, check=True):
        return subprocess.run([os.path.join(self.bin_dir, "quiesce"), *args], capture_output=True, text=True, check=check,
                              env={**os.environ, "QUIESCE_ADMIN_SOCKET": os.path.join(self.dir, "admin.sock")}, timeout=60)

    def issue_agent(self, instance_id):
        self.quiesce(["ca", "issue", "--agent", instance_id, "--dir", self.ca_dir])
        base = os.path.join(self.ca_dir, "agents", instance_id)
        return base + ".pem", base + ".key"

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def engine(bin_dir, tmp_path):
    e = Engine(bin_dir, str(tmp_path))
    yield e
    e.stop()


def serve_agent_service(stubs, engine, servicer):
    """Starts a stock grpcio server playing the engine with `servicer`, requiring client
    certificates from the engine fixture's CA; returns (server, port)."""
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stubs.session_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(engine.read(os.path.join(engine.ca_dir, "engine.key")), engine.read(os.path.join(engine.ca_dir, "engine.pem")))],
        root_certificates=engine.read(os.path.join(engine.ca_dir, "ca.pem")),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


# -- guests on loop devices (root) -----------------------------------------------------


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def mount_ext4(image, mount_point, loops, mounts, size="64M"):
    """A fresh ext4 image of `size`, attached and mounted at `mount_point`; recorded in `loops` and `mounts` for undo()."""
    sh("truncate", "-s", size, str(image))
    sh("mkfs.ext4", "-q", "-F", str(image))
    device = sh("losetup", "--find", "--show", str(image))
    loops.append(device)
    os.makedirs(mount_point, exist_ok=True)
    sh("mount", device, str(mount_point))
    mounts.append(str(mount_point))
    return str(mount_point)


def reflink_pool(workdir, loops, mounts, size="400M"):
    """An XFS reflink pool on a loop device mounted at WORKDIR/pool, with its disks directory
    (WORKDIR/pool/q/disks, returned) for a local provider at WORKDIR/pool/q; recorded for undo()."""
    image = workdir / "pool.img"
    sh("truncate", "-s", size, str(image))
    sh("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    loops.append(sh("losetup", "--find", "--show", str(image)))
    (workdir / "pool").mkdir()
    sh("mount", loops[-1], str(workdir / "pool"))
    mounts.append(str(workdir / "pool"))
    disks = workdir / "pool" / "q" / "disks"
    disks.mkdir(parents=True)
    return disks


def write_hooks(directory, pre="#!/bin/sh\nexit 0\n", post="#!/bin/sh\nexit 0\n"):
    """A hook directory (0700) with prescript.sh and postscript.sh (0700), as the agent accepts them."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name, text in (("prescript.sh", pre), ("postscript.sh", post)):
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o700)
    return str(directory)


def start_agent(bin_dir, port, ca_dir, instance, hooks):
    """A quiesce-agent process for `instance` dialling 127.0.0.1:port with the CA's certificate for it."""
    return subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{port}",
         "--cert", os.path.join(ca_dir, "agents", f"{instance}.pem"), "--key", os.path.join(ca_dir, "agents", f"{instance}.key"),
         "--ca", os.path.join(ca_dir, "ca.pem"), "--prescript", os.path.join(hooks, "prescript.sh"),
         "--postscript", os.path.join(hooks, "postscript.sh"), "--hook-dir", hooks, "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def undo(agents, mounts, loops):
    """Stops the agents, thaws and unmounts every mount, detaches every loop device: also after a failure."""
    for p in agents:
        p.terminate()
        p.wait(timeout=10)
    for m in reversed(mounts):
        subprocess.run(["fsfreeze", "--unfreeze", m], capture_output=True)
        subprocess.run(["umount", "-l", m], capture_output=True)
    for d in reversed(loops):
        subprocess.run(["losetup", "-d", d], capture_output=True)
