"""A fault proxy for the EC2 Query API: sits between Quiesce and moto's server on
127.0.0.1 and injects what a real EC2 does to a client on a bad day.

* throttling: a random fraction of mutating calls (`throttle_rate`), or an
  EC2-like token bucket on the snapshot creates (`bucket=(burst, per_second)`),
  answered `503 RequestLimitExceeded` (with `Retry-After` when `retry_after` is set);
* scripted faults per action, consumed in order: `throttle`, `5xx` (an InternalError before
  moto sees the request), `reset-after` (moto carries the request out, then the
  connection is reset before the reply: the ambiguous case), `reset-before`,
  `deny` (UnauthorizedOperation);
* `deny_actions`: actions always refused with UnauthorizedOperation (DryRun too);
* `latency_ms` before each forward;
* `pending_polls`: each snapshot reads as `pending` for its first N DescribeSnapshots
  (moto completes snapshots at once).

Used in-process by the tests (Tests/interop/test_ec2_moto.py) and as a command by
scripts/bench-fleet.sh; `stats` counts what it saw and did.
"""
import argparse
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MUTATING = ("Create", "Delete", "Modify", "Run", "Terminate", "Attach", "Detach")
SNAPSHOT_CREATES = ("CreateSnapshot", "CreateSnapshots")


def error_xml(code, message):
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>proxy-{random.randrange(1 << 32):08x}</RequestID></Response>").encode()


class FaultProxy:
    def __init__(self, upstream_port, seed=7):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self.throttle_rate = 0.0
        self.retry_after = None
        self.bucket = None
        self.tokens = 0.0
        self.refilled = time.monotonic()
        self.faults = {}
        self.deny_actions = set()
        self.latency_ms = 0
        self.pending_polls = 0
        self.seen_pending = {}
        self.stats = {"requests": {}, "throttled": 0, "faults": {}, "creates_forwarded": 0}
        # A listen backlog of 5 (the default) drops the SYNs of a client opening dozens of
        # connections at once; their retransmits (1 s, 3 s, 7 s) would look like a slow API.
        ThreadingHTTPServer.request_queue_size = 512
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def reset(self):
        with self.lock:
            self.throttle_rate, self.retry_after, self.bucket = 0.0, None, None
            self.faults, self.deny_actions, self.latency_ms, self.pending_polls = {}, set(), 0, 0
            self.seen_pending = {}
            self.stats = {"requests": {}, "throttled": 0, "faults": {}, "creates_forwarded": 0}

    def set_bucket(self, burst, per_second):
        with self.lock:
            self.bucket = (float(burst), float(per_second))
            self.tokens = float(burst)
            self.refilled = time.monotonic()

    def script(self, action, *faults):
        with self.lock:
            self.faults.setdefault(action, []).extend(faults)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- decisions, under the lock -------------------------------------------------------

    def _decide(self, action, dry_run):
        with self.lock:
            self.stats["requests"][action] = self.stats["requests"].get(action, 0) + 1
            if action in self.deny_actions:
                return "deny"
            queue = self.faults.get(action)
            if queue and not dry_run:  # scripted faults are for the real calls, not the check's DryRuns
                fault = queue.pop(0)
                self.stats["faults"][fault] = self.stats["faults"].get(fault, 0) + 1
                return fault
            if dry_run:
                return None
            if self.bucket and action in SNAPSHOT_CREATES:
                burst, rate = self.bucket
                now = time.monotonic()
                self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
                self.refilled = now
                if self.tokens < 1:
                    self.stats["throttled"] += 1
                    return "throttle"
                self.tokens -= 1
            if self.throttle_rate and action.startswith(MUTATING) and self.random.random() < self.throttle_rate:
                self.stats["throttled"] += 1
                return "throttle"
            if action in SNAPSHOT_CREATES:
                self.stats["creates_forwarded"] += 1
            return None

    def _pending(self, body):
        """Rewrites completed snapshots to pending for their first `pending_polls` reads."""
        with self.lock:
            polls = self.pending_polls
            if not polls:
                return body
            text = body.decode()

            def item(match):
                block = match.group(0)
                sid = re.search(r"<snapshotId>([^<]+)</snapshotId>", block)
                if not sid:
                    return block
                seen = self.seen_pending.get(sid.group(1), 0)
                if seen >= polls:
                    return block
                self.seen_pending[sid.group(1)] = seen + 1
                return block.replace("<status>completed</status>", "<status>pending</status>").replace(
                    "<progress>100%</progress>", f"<progress>{int(100 * seen / polls)}%</progress>")
            return re.sub(r"<item>\s*<snapshotId>.*?</item>\s*(?=<item>\s*<snapshotId>|</snapshotSet>)", item, text, flags=re.S).encode()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, body, extra=()):
                self.send_response(status)
                self.send_header("Content-Type", "text/xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
                action = (form.get("Action") or ["?"])[0]
                dry_run = (form.get("DryRun") or ["false"])[0].lower() == "true"
                decision = proxy._decide(action, dry_run)
                if proxy.latency_ms:
                    time.sleep(proxy.latency_ms / 1000)
                if decision == "deny":
                    return self._reply(403, error_xml("UnauthorizedOperation", f"You are not authorized to perform this operation. ({action}, injected)"))
                if decision == "throttle":
                    extra = [("Retry-After", str(proxy.retry_after))] if proxy.retry_after else []
                    return self._reply(503, error_xml("RequestLimitExceeded", "Request limit exceeded. (injected)"), extra)
                if decision == "5xx":
                    return self._reply(500, error_xml("InternalError", "An internal error has occurred. (injected)"))
                if decision == "reset-before":
                    return self._reset()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                upstream.request("POST", self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                upstream.close()
                if decision == "reset-after":
                    return self._reset()
                if action == "DescribeSnapshots" and reply.status == 200:
                    data = proxy._pending(data)
                self._reply(reply.status, data)

        return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--bucket", help="burst,per_second on snapshot creates")
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--stats", help="write the stats here (JSON) on SIGTERM")
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream_port)
    if args.bucket:
        burst, rate = args.bucket.split(",")
        proxy.set_bucket(float(burst), float(rate))
    proxy.throttle_rate = args.throttle_rate
    print(proxy.url, flush=True)
    import signal

    def stop(*_):
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump(proxy.stats, f)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
