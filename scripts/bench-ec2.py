#!/usr/bin/env python3
"""The fleet bench through the ec2 provider (root): moto's EC2 server on
127.0.0.1 behind the fault proxy (Tests/interop/ec2_fault_proxy.py) enforcing an
EC2-like token bucket on snapshot creates (throttled `RequestLimitExceeded`
replies past it), one moto instance per bench instance (a root and a data
volume), and `quiesce-bench fleet --ec2-endpoint …`: real agents freezing
loop-mounted ext4 around each CreateSnapshots. Three runs in one go:

  open       the API unlimited: the frozen windows with no queue at the API
  matched    the API's bucket, Quiesce configured with the same rate
  over       the API's bucket, Quiesce configured at 3x its rate: throttles, AIMD

Prints makespan against the API's rate bound, throttles (proxy and coordinator),
retries, zero duplicates (counted in moto), the frozen windows, and the targets."""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "Tests", "interop"))
from ec2_fault_proxy import FaultProxy  # noqa: E402

import boto3  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--pool", required=True, help="an XFS reflink directory for the bench's disks")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--api-burst", type=int, default=10)
    ap.add_argument("--api-rate", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--runs", default="open,matched,over", help="which of the three runs (open first: the others' frozen target is against it)")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": "AKIABENCH0000000001", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_EC2_METADATA_DISABLED": "true",
                "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"})
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        proxy = FaultProxy(port)
        ec2 = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                           aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        listing = os.path.join(args.pool, f"ec2-instances-{os.getpid()}.json")

        def fresh_instances():
            """moto reset and the instances made again: moto's DescribeSnapshots slows down with every
            snapshot it holds (~0.4 s with 600), which would make each run slower than the one before."""
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=30)
            ami = "ami-0123456789abcdef0"  # moto checks no AMI (and loads none: see the server's environment)
            ids = []
            mappings = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}, {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 2}}]
            while len(ids) < args.instances:
                n = min(50, args.instances - len(ids))
                ids += [i["InstanceId"] for i in ec2.run_instances(ImageId=ami, MinCount=n, MaxCount=n, BlockDeviceMappings=mappings)["Instances"]]
            with open(listing, "w") as f:
                json.dump(ids, f)

        runs = [("open", None, args.api_rate * 10, 1000), ("matched", (args.api_burst, args.api_rate), args.api_rate, args.api_burst),
                ("over", (args.api_burst, args.api_rate), args.api_rate * 3, args.api_burst * 3)]
        rows = []
        runs = [r for r in runs if r[0] in args.runs.split(",")]
        for name, bucket, rate, burst in runs:
            fresh_instances()
            proxy.reset()
            if bucket:
                proxy.set_bucket(*bucket)
            bound_burst, bound_rate = bucket or (burst, rate)
            cmd = [os.path.join(args.bin, "quiesce-bench"), "fleet", "--pool", args.pool, "--instances", str(args.instances),
                   "--burst", str(burst), "--per-second", str(rate), "--samples", "1", "--concurrency", str(args.concurrency),
                   "--ec2-endpoint", proxy.url, "--ec2-instances", listing, "--bound-burst", str(bound_burst),
                   "--bound-per-second", str(bound_rate), "--run-prefix", f"ec2-{name}"]
            print(f"bench-ec2: {name}: API bucket {bucket or 'none'}, Quiesce burst {burst}, {rate:g}/s …", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if out.returncode != 0:
                print(out.stdout + out.stderr, file=sys.stderr)
                raise SystemExit(f"bench-ec2: quiesce-bench failed in run {name}")
            lines = out.stdout.splitlines()
            header = next(i for i, line in enumerate(lines) if line.startswith("INSTANCES"))
            cells = re.split(r"\s{2,}", lines[header + 1].strip())
            provider = dict(kv.split("=") for kv in next(line for line in lines if line.startswith("PROVIDER")).split()[2:])
            snaps = []
            paginator = ec2.get_paginator("describe_snapshots")
            for page in paginator.paginate(OwnerIds=["self"], Filters=[{"Name": "tag:quiesce:run", "Values": [f"ec2-{name}-{args.instances}-1"]}]):
                snaps += page["Snapshots"]
            per_instance = {}
            for s in snaps:
                inst = {t["Key"]: t["Value"] for t in s.get("Tags", [])}.get("quiesce:instance")
                per_instance[inst] = per_instance.get(inst, 0) + 1
            duplicates = sum(max(0, c - 2) for c in per_instance.values())
            rows.append({"run": name, "bucket": f"{bucket[0]}, {bucket[1]:g}/s" if bucket else "none", "quiesce": f"{burst}, {rate:g}/s",
                         "makespan": float(cells[2]), "bound": float(cells[3]), "p50": float(cells[5]), "p99": float(cells[6]),
                         "proxy_throttled": proxy.stats["throttled"], "coord_throttles": int(provider["throttles"]),
                         "retried": int(provider["retried"]), "lowest": provider["lowest_rate"], "failed": int(provider["failed"]),
                         "snapshots": len(snaps), "duplicates": duplicates, "missing": sum(1 for i in range(args.instances)) - len(per_instance)})
            sys.stderr.write(out.stderr[-2000:])
        head = ["RUN", "API BUCKET", "QUIESCE", "MAKESPAN S", "API BOUND S", "RATIO", "THROTTLED (API)", "SEEN", "RETRIED",
                "LOWEST RATE", "FROZEN P50 MS", "P99 MS", "SNAPSHOTS", "DUPLICATES", "FAILED"]
        table = [head] + [[r["run"], r["bucket"], r["quiesce"], f"{r['makespan']:.2f}", f"{r['bound']:.2f}",
                           f"{r['makespan'] / r['bound']:.2f}" if r["bound"] > 0 else "-", str(r["proxy_throttled"]), str(r["coord_throttles"]),
                           str(r["retried"]), r["lowest"], f"{r['p50']:.2f}", f"{r['p99']:.2f}", str(r["snapshots"]), str(r["duplicates"]),
                           str(r["failed"])] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        print()
        base = next((r for r in rows if r["run"] == "open"), rows[0])
        targets = [["TARGET", "FIGURE", "BOUND", "MET"]]
        for r in [r for r in rows if r["run"] != "open"]:
            ratio = r["makespan"] / r["bound"] if r["bound"] > 0 else 0
            targets.append([f"{r['run']}: makespan <= 1.10 x the API's rate bound", f"{ratio:.2f} x", "<= 1.10 x", "yes" if ratio <= 1.10 else "NO"])
            targets.append([f"{r['run']}: frozen p99 <= 1.5 x open's (no queue at the API)", f"{r['p99']:.2f} ms", f"<= {1.5 * base['p99']:.2f} ms",
                            "yes" if r["p99"] <= 1.5 * base["p99"] else "NO"])
        for r in rows:
            targets.append([f"{r['run']}: zero duplicates, none failed, one snapshot per volume",
                            f"{r['duplicates']} dup, {r['failed']} failed, {r['snapshots']} snapshots", f"0, 0, {2 * args.instances}",
                            "yes" if r["duplicates"] == 0 and r["failed"] == 0 and r["snapshots"] == 2 * args.instances else "NO"])
        widths = [max(len(row[i]) for row in targets) for i in range(4)]
        for row in targets:
            print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        print(f"\nAPI BOUND: (instances - API burst) / API rate: one CreateSnapshots per instance. THROTTLED (API): RequestLimitExceeded "
              "replies from the proxy's bucket; SEEN: throttles that reached the coordinator (the rest were retried inside the provider); "
              "LOWEST RATE: where AIMD took Quiesce's own bucket. FROZEN: FIFREEZE -> last FITHAW on the guest, loop-mounted ext4.")
        proxy.close()
        os.unlink(listing)
    finally:
        moto.terminate()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
