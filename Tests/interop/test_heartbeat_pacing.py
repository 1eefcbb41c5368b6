"""The real quiesce-agent paces its idle heartbeats as the engine asks: the
interval from the hello, then whatever a later engine heartbeat says (an engine
holding thousands of sessions asks for fewer beats). The engine here is stock
grpcio, written against proto/ only."""
import os
import queue
import subprocess
import threading
import time

from conftest import serve_agent_service


class PacingEngine:
    """Says hello with a 300 ms interval, then asks for 1.5 s, then for 200 ms,
    recording when each of the agent's heartbeats arrived."""

    def __init__(self, stubs, engine):
        self.beats = queue.Queue()
        self.retimed = []  # (monotonic time, interval ms) of each engine heartbeat sent
        outer = self

        class Service(stubs.session_pb2_grpc.AgentServiceServicer):
            def Session(self, request_iterator, context):
                first = next(request_iterator)
                assert first.WhichOneof("kind") == "hello"

                def read():
                    for message in request_iterator:
                        if message.WhichOneof("kind") == "heartbeat":
                            outer.beats.put((time.monotonic(), message.heartbeat.sequence))

                threading.Thread(target=read, daemon=True).start()
                reply = stubs.session_pb2.EngineMessage()
                reply.hello.protocol.major = 1
                reply.hello.session_id = "pacing-session"
                reply.hello.heartbeat_interval_ms = 300
                yield reply
                for wait, interval in ((2.0, 1500), (5.0, 200)):
                    time.sleep(wait)
                    beat = stubs.session_pb2.EngineMessage()
                    beat.heartbeat.sequence = len(outer.retimed) + 1
                    beat.heartbeat.heartbeat_interval_ms = interval
                    outer.retimed.append((time.monotonic(), interval))
                    yield beat
                time.sleep(2.0)

        self.server, self.port = serve_agent_service(stubs, engine, Service())


def gaps(times):
    return [round(b - a, 3) for a, b in zip(times, times[1:])]


def test_agent_beats_at_the_interval_the_engine_asks_for(stubs, engine, bin_dir):
    py = PacingEngine(stubs, engine)
    cert, key = engine.issue_agent("paced")
    agent = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{py.port}", "--cert", cert, "--key", key,
         "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while len(py.retimed) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(py.retimed) == 2, "the engine did not get to ask twice"
        time.sleep(1.9)
        beats = []
        while not py.beats.empty():
            beats.append(py.beats.get())
        sequences = [s for _, s in beats]
        assert sequences == list(range(1, len(sequences) + 1)), f"heartbeat sequence numbers: {sequences}"
        slow_from, fast_from = py.retimed[0][0], py.retimed[1][0]
        first = [t for t, _ in beats if t < slow_from]
        slow = [t for t, _ in beats if slow_from <= t < fast_from]
        fast = [t for t, _ in beats if t >= fast_from]
        # 300 ms from the hello: about six beats in the first 2 s.
        assert len(first) >= 4 and max(gaps(first)) < 0.6, f"300 ms phase: {gaps(first)}"
        # 1.5 s for 5 s: three or four beats, never two within a second.
        assert 2 <= len(slow) <= 4 and min(gaps(slow)) > 1.0, f"1.5 s phase: {gaps(slow)}"
        # 200 ms for the last 2 s.
        assert len(fast) >= 6 and max(gaps(fast)) < 0.5, f"200 ms phase: {gaps(fast)}"
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        py.server.stop(0)
