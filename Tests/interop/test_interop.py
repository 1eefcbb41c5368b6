"""Stock peers that are not part of this package talk to Quiesce using only
proto/: Python grpcio as an agent and as an engine, and openssl s_client."""
import json
import os
import queue
import subprocess
import threading

import grpc
import pytest

from conftest import serve_agent_service, wait_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def credentials(engine, instance_id=None):
    root = engine.read(os.path.join(engine.ca_dir, "ca.pem"))
    if instance_id is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = engine.issue_agent(instance_id)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=engine.read(key), certificate_chain=engine.read(cert))


class PythonAgent:
    """A minimal agent written against the .proto files with grpcio: says
    hello, answers facts commands, keeps the stream open until closed."""

    def __init__(self, stubs, engine, instance_id, hello_instance_id=None, major=1):
        self.stubs = stubs
        self.outbox = queue.Queue()
        self.received = []
        self.error = None
        channel = grpc.secure_channel(f"127.0.0.1:{engine.port}", credentials(engine, instance_id))
        self.channel = channel
        stub = stubs.session_pb2_grpc.AgentServiceStub(channel)
        hello = stubs.session_pb2.AgentMessage()
        hello.hello.protocol.major = major
        hello.hello.agent_version = "python-interop"
        hello.hello.instance_id = hello_instance_id or instance_id
        hello.hello.capabilities.append("facts")
        self.outbox.put(hello)
        self.responses = stub.Session(iter(self.outbox.get, None))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            for message in self.responses:
                self.received.append(message)
                if message.WhichOneof("kind") == "command" and message.command.WhichOneof("action") == "facts":
                    reply = self.stubs.session_pb2.AgentMessage()
                    reply.result.command_id = message.command.id
                    reply.result.facts.hostname = "python-host"
                    reply.result.facts.os_family = "linux"
                    mount = reply.result.facts.mounts.add()
                    mount.mount_point, mount.fs_type, mount.freezable = "/data", "xfs", True
                    self.outbox.put(reply)
        except grpc.RpcError as error:
            self.error = error

    def close(self):
        self.outbox.put(None)
        self.channel.close()
        self.thread.join(timeout=5)


def test_grpcio_agent_completes_the_handshake(stubs, engine):
    agent = PythonAgent(stubs, engine, "py-1")
    try:
        hello = wait_for(lambda: agent.received and agent.received[0])
        assert hello is not None and hello.WhichOneof("kind") == "hello", agent.error
        assert hello.hello.protocol.major == 1
        assert hello.hello.session_id.startswith("s-")
        assert hello.hello.max_message_bytes == 1 << 20

        listed = json.loads(engine.quiesce(["agents", "--output", "json"]).stdout)
        [entry] = listed["agents"]
        assert entry["instance_id"] == "py-1"
        assert entry["agent_version"] == "python-interop"
        assert entry["session_id"] == hello.hello.session_id

        # The engine sends a facts command through the session; the Python agent answers it.
        facts = json.loads(engine.quiesce(["facts", "py-1", "--output", "json"]).stdout)
        assert facts["hostname"] == "python-host"
        assert facts["mounts"][0]["mount_point"] == "/data"
        table = engine.quiesce(["facts", "py-1"]).stdout
        assert "/data" in table and "eligible" in table
    finally:
        agent.close()


def test_grpcio_hello_with_another_instance_id_is_refused(stubs, engine):
    agent = PythonAgent(stubs, engine, "py-2", hello_instance_id="py-impostor")
    agent.thread.join(timeout=10)
    assert agent.error is not None
    assert agent.error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert '"py-impostor"' in agent.error.details() and '"py-2"' in agent.error.details()
    agent.close()
    assert "agent session refused" in engine.logs()


def test_grpcio_major_version_mismatch_names_both(stubs, engine):
    agent = PythonAgent(stubs, engine, "py-3", major=7)
    agent.thread.join(timeout=10)
    assert agent.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "agent speaks 7.0" in agent.error.details() and "engine speaks 1.0" in agent.error.details()
    agent.close()


def test_grpcio_without_client_certificate_is_refused(stubs, engine):
    channel = grpc.secure_channel(f"127.0.0.1:{engine.port}", credentials(engine))
    stub = stubs.session_pb2_grpc.AgentServiceStub(channel)
    hello = stubs.session_pb2.AgentMessage()
    hello.hello.instance_id = "py-anon"
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Session(iter([hello]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    assert "py-anon" not in engine.quiesce(["agents"]).stdout


def openssl(engine, *extra, linger=3.0):
    """openssl s_client that sends the HTTP/2 preface and keeps the connection
    open for `linger` seconds, so a TLS 1.3 server's refusal (alert 116,
    certificate required), which follows the client's first data, arrives."""
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{engine.port}", "-CAfile", os.path.join(engine.ca_dir, "ca.pem"),
         "-alpn", "h2", "-verify_return_error", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=stream, k=key: chunks[k].extend(iter(lambda: s.read1(4096), b"")), daemon=True)
               for stream, key in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for reader in readers:
        reader.start()
    proc.stdin.write(PREFACE)
    proc.stdin.flush()  # stdin stays open: EOF would make s_client hang up first
    try:
        proc.wait(timeout=linger)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=10)
    for reader in readers:
        reader.join(timeout=5)
    proc.stdin.close()
    stdout, stderr = b"".join(chunks["out"]), b"".join(chunks["err"])
    return stdout, (stdout + stderr).decode(errors="replace")


def test_openssl_without_client_certificate_is_refused(engine):
    _, text = openssl(engine)
    assert "certificate required" in text, text
    assert "Verify return code: 0 (ok)" in text  # the engine's certificate itself is fine


def test_openssl_with_agent_certificate_gets_http2_settings(engine):
    cert, key = engine.issue_agent("ossl-1")
    stdout, text = openssl(engine, "-cert", cert, "-key", key)
    assert "certificate required" not in text
    assert "ALPN protocol: h2" in text
    # The server's first HTTP/2 frame is SETTINGS: type 0x04, flags 0, stream 0.
    assert b"\x04\x00\x00\x00\x00\x00" in stdout, text


class PythonEngine:
    """A stock grpcio server playing the engine, requiring client certificates."""

    def __init__(self, stubs, engine):
        self.stubs = stubs
        self.results = queue.Queue()
        outer = self

        class Service(stubs.session_pb2_grpc.AgentServiceServicer):
            def Session(self, request_iterator, context):
                first = next(request_iterator)
                outer.results.put(("hello", first))
                reply = stubs.session_pb2.EngineMessage()
                reply.hello.protocol.major = 1
                reply.hello.session_id = "py-engine-session"
                reply.hello.heartbeat_interval_ms = 1000
                yield reply
                command = stubs.session_pb2.EngineMessage()
                command.command.id = 1
                command.command.deadline_ms = 5000
                command.command.facts.SetInParent()
                yield command
                unknown = stubs.session_pb2.EngineMessage()
                unknown.command.id = 2
                unknown.command.deadline_ms = 5000  # no action set: an unknown command
                yield unknown
                answered = 0
                for message in request_iterator:
                    if message.WhichOneof("kind") == "result":
                        outer.results.put(("result", message))
                        answered += 1
                        if answered == 2:
                            return

        self.server, self.port = serve_agent_service(stubs, engine, Service())


def test_real_agent_answers_a_grpcio_engine(stubs, engine, bin_dir):
    py = PythonEngine(stubs, engine)
    cert, key = engine.issue_agent("agent-under-test")
    agent = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{py.port}", "--cert", cert, "--key", key,
         "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        kind, hello = py.results.get(timeout=20)
        assert kind == "hello"
        assert hello.hello.instance_id == "agent-under-test"
        assert hello.hello.protocol.major == 1
        results = {}
        for _ in range(2):
            kind, message = py.results.get(timeout=20)
            results[message.result.command_id] = message.result
        facts = results[1]
        assert facts.status.code == 0
        assert any(m.mount_point == "/" for m in facts.facts.mounts)
        assert facts.facts.os_family == "linux"
        assert results[2].status.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert results[2].status.reason == "unknown-command"
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        py.server.stop(0)
