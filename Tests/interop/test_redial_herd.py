"""When its connection to the engine breaks uncleanly (an engine killed, a host
gone: no GOAWAY), the real quiesce-agent dials again only on its own jittered
backoff. grpc's client would otherwise reconnect at once by itself, and a whole
fleet would do a TLS handshake with the restarted engine in the same second,
only to drop it because the session had ended: the herd the engine's reconnect
spread exists to prevent. A TCP proxy of our own sits between the agent and a
stock grpcio engine, resets the agent's connection, and counts the connections
the agent opens against the sessions (hellos) it opens."""
import os
import socket
import struct
import subprocess
import threading
import time

from conftest import serve_agent_service, wait_for


class ResettingProxy:
    """Forwards every accepted connection to the engine; `reset()` ends each without an HTTP/2
    GOAWAY, as a killed engine's kernel would."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = []  # monotonic times
        self.live = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.accepted.append(time.monotonic())
                self.live.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self):
        with self.lock:
            live, self.live = self.live, []
        for client, upstream in live:
            # Shut down before closing: a close() alone does not end the other thread's recv() on
            # Linux, and the socket would stay open. With a zero linger the close sends a reset.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def connections_since(self, t):
        with self.lock:
            return len([a for a in self.accepted if a >= t])

    def close(self):
        self.listener.close()
        self.reset()


def test_an_agent_redials_only_on_its_own_backoff_after_an_unclean_close(stubs, engine, bin_dir):
    hellos = []  # monotonic times

    class Service(stubs.session_pb2_grpc.AgentServiceServicer):
        def Session(self, request_iterator, context):
            first = next(request_iterator)
            assert first.WhichOneof("kind") == "hello"
            hellos.append(time.monotonic())
            reply = stubs.session_pb2.EngineMessage()
            reply.hello.protocol.major = 1
            reply.hello.session_id = f"herd-{len(hellos)}"
            reply.hello.heartbeat_interval_ms = 15000
            # As an engine holding thousands of sessions would: spread the next dial over 3 s.
            reply.hello.reconnect_spread_ms = 3000
            yield reply
            while context.is_active():
                time.sleep(0.05)

    server, port = serve_agent_service(stubs, engine, Service())
    proxy = ResettingProxy(port)
    cert, key = engine.issue_agent("herd")
    agent = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{proxy.port}", "--cert", cert, "--key", key,
         "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        for round in range(1, 4):
            assert wait_for(lambda: len(hellos) >= round, timeout=15), f"round {round}: the agent did not (re)open its session"
            time.sleep(0.3)
            assert proxy.connections_since(0) == round, f"round {round}: {proxy.connections_since(0)} connections for {round} sessions"
            cut = time.monotonic()
            proxy.reset()
            # Its own redial comes within the 3 s spread; wait for it, then a little longer.
            assert wait_for(lambda: len(hellos) > round, timeout=15), f"round {round}: the agent did not come back after the reset"
            time.sleep(0.5)
            new_connections = proxy.connections_since(cut)
            assert new_connections == 1, (
                f"round {round}: after the reset the agent opened {new_connections} connections for one session "
                "(grpc's own reconnect is not suppressed)")
    except AssertionError:
        agent.terminate()
        raise AssertionError("the agent's log:\n" + agent.communicate(timeout=10)[1].decode(errors="replace")[-4000:])
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=10)
        proxy.close()
        server.stop(0)
