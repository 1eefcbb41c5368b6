#!/usr/bin/env bash
# Local snapshot latency (the provider's share of a freeze window) for sparse
# disk images, reflink (XFS with reflink=1) against sparse copy (ext4), on pools
# made on loop devices. Needs root.
#
#   scripts/bench-snapshot.sh           release build; 1 GiB and 16 GiB images
#   scripts/bench-snapshot.sh --quick   debug build; 1 GiB only, few runs (CI smoke pass)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-snapshot: needs root (loop devices, mkfs, mount)" >&2; exit 1; }

config=release; sizes="1 16"; reflink_runs=50; copy_runs=5
if [ "${1:-}" = "--quick" ]; then config=debug; sizes="1"; reflink_runs=5; copy_runs=2; fi

swift build -c "$config" --product quiesce-bench >/dev/null
bin=$(swift build -c "$config" --show-bin-path)

work=$(mktemp -d /tmp/quiesce-bench-snapshot.XXXXXX)
loops=()
cleanup() {
  for m in "$work"/xfs "$work"/ext4; do mountpoint -q "$m" && umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

pool() { # name fstype mkfs-args…  → mounts a 40 GiB sparse pool at $work/name
  local name=$1 fs=$2; shift 2
  truncate -s 40G "$work/$name.img"
  "mkfs.$fs" -q "$@" "$work/$name.img"
  local dev; dev=$(losetup --find --show "$work/$name.img"); loops+=("$dev")
  mkdir -p "$work/$name"; mount "$dev" "$work/$name"
}
pool xfs xfs -f -m reflink=1
pool ext4 ext4 -F

results="$work/results.jsonl"
for size in $sizes; do
  data=$((size * 64))
  "$bin/quiesce-bench" snapshot --pool "$work/xfs/pool-$size" --size-gib "$size" --data-mib "$data" --runs "$reflink_runs" >>"$results"
  "$bin/quiesce-bench" snapshot --pool "$work/ext4/pool-$size" --size-gib "$size" --data-mib "$data" --runs "$copy_runs" >>"$results"
done

python3 - "$results" "$config" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"bench-snapshot: local provider, one disk per group, {sys.argv[2]} build (pool on a loop device)")
header = ["IMAGE", "DATA", "METHOD", "POOL FS", "RUNS", "P50", "P99", "MAX"]
table = [[f"{r['size_gib']} GiB", f"{r['data_mib']} MiB", r["method"], "xfs reflink=1" if r["method"] == "reflink" else "ext4",
          str(r["runs"]), f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms", f"{r['max_ms']:.2f} ms"] for r in rows]
widths = [max(len(x) for x in col) for col in zip(header, *table)]
for row in [header] + table:
    print("   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
PY
