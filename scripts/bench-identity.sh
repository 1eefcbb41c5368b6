#!/usr/bin/env bash
# What fleet identity costs, measured against floors in the same run:
#   enrolment (key made here, CSR, pinned TLS, token redeemed under the store's
#   lock, certificate issued, files written with fsync) against a fresh
#   mutual-TLS connection and one call — the least any enrolment can cost;
#   a command's round trip on an engine that audits every command and checks
#   revocations, against one that does neither (the two taking turns).
#
#   scripts/bench-identity.sh           release build, 200 + 200 agents, 2000 round trips
#   scripts/bench-identity.sh --quick   debug build, 20 agents, 200 round trips (CI smoke pass)
set -euo pipefail
cd "$(dirname "$0")/.."

config=release; agents=${AGENTS:-200}; runs=${RUNS:-2000}
if [ "${1:-}" = "--quick" ]; then config=debug; agents=20; runs=200; fi
build=(swift build -c "$config" ${SWIFT_BUILD_PATH:+--build-path "$SWIFT_BUILD_PATH"})
"${build[@]}" --product quiesce-bench >/dev/null
bin=$("${build[@]}" --show-bin-path)

work=$(mktemp -d /tmp/quiesce-bench-identity.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$bin/quiesce-bench" identity --work "$work" --agents "$agents" --runs "$runs" >"$work/results.jsonl"

python3 - "$work/results.jsonl" "$config" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {(r["bench"], r.get("engine", r.get("mode", ""))): r for r in rows}
print(f"bench-identity ({sys.argv[2]} build)")
print(f"{'WHAT':<58}{'RUNS':>6}{'P50 MS':>10}{'P99 MS':>10}{'MAX MS':>10}")
def row(label, ms):
    print(f"{label:<58}{int(ms['runs']):>6}{ms['p50']:>10.2f}{ms['p99']:>10.2f}{ms['max']:>10.2f}")
floor, enrol, wide = by[("floor", "")], by[("enrol", "serial")], by[("enrol", "parallel")]
row("floor: fresh mTLS connection + one call", floor["ms"])
row("enrolment, one at a time", enrol["ms"])
row(f"enrolment, {wide['parallel']} at once", wide["ms"])
a, p = by[("command", "audited")], by[("command", "plain")]
row("command round trip, audit trail + revocation checks", a["ms"])
row("command round trip, neither", p["ms"])
print(f"enrolments per second: {enrol['per_second']:.1f} one at a time, {wide['per_second']:.1f} {wide['parallel']} at once "
      f"({enrol['agents']} agents each); audit lines written: {a['audit_lines']}")
ratio = enrol["ms"]["p50"] / floor["ms"]["p50"]
print(f"target: enrolment p50 (one at a time) ≤ 6 × the floor's p50: {ratio:.2f}× — {'met' if ratio <= 6 else 'NOT met'}")
extra = a["ms"]["p50"] - p["ms"]["p50"]
limit = 0.10 * p["ms"]["p50"] + 0.02
print(f"target: the audited command p50 within the plain one's + 10 % + 0.02 ms: {extra:+.3f} ms (limit {limit:.3f}) — {'met' if extra <= limit else 'NOT met'}")
PY
