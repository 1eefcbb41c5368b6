#!/usr/bin/env bash
# A fleet backup at scale (root): N instances x 2 disks, each disk a 16 MiB ext4
# image in an XFS reflink pool, loop-mounted and really frozen; one agent per
# instance over mutual TLS on loopback; the coordinator against the local
# provider limited to a burst of 20 and 50 creates/s. Prints makespan against
# the rate-limit bound, frozen-window p50/p99 at each size, where the window
# goes (engine, agent, kernel), the scaling targets, and peak memory. Then one
# instance through the product as an operator runs it (`quiesce backup` and a
# real quiesce-agent process) beside the raw floor on the same two disks
# (scripts/bench-backup-cli.py), with the targets against that floor. Last, the
# fleet through the ec2 provider against moto behind the fault proxy enforcing an
# EC2-like token bucket (scripts/bench-ec2.py): makespan against the API's rate
# bound, throttles, retries, duplicates, frozen windows with and without a queue.
#
#   scripts/bench-fleet.sh            release build, 1, 10 and 100 instances
#   scripts/bench-fleet.sh --quick    debug build, 1 and 10 instances, 25+ samples each (smoke pass)
#   INSTANCES=10,50,100 scripts/bench-fleet.sh
#   POOL_ON=disk scripts/bench-fleet.sh   the pool's image on this machine's disk (/var/tmp)
#   BENCH_ARGS="--max-frozen 100 --planning 32" scripts/bench-fleet.sh   other run settings
#   BENCH_ARGS="--pace-frozen on,off" scripts/bench-fleet.sh   rounds alternate between settings, a row each
#                                     (also --frozen-first-ms 0,20; both: every pair)
#   BENCH_ARGS="--agents processes" scripts/bench-fleet.sh   a quiesce-agent process per instance, not in-process
#   INSTANCES=10,1000 SAMPLES=20 FLEET_ONLY=1 scripts/bench-fleet.sh   issue 23's size: the fleet table only
#
# The pool's XFS image lives in RAM (/dev/shm) by default. Every "instance"
# here shares one host, so on a disk-backed pool each FIFREEZE's cache flush
# queues behind every other instance's on the same physical disk — contention
# a real fleet (one virtual disk per guest) does not have, and which would
# hide what this measures: the engine's own scaling. POOL_ON=disk shows it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-fleet: needs root (loop devices, mount, FIFREEZE)" >&2; exit 1; }

config=release; instances=${INSTANCES:-1,10,100}; samples=${SAMPLES:-300}; cli_runs=100; one_shot=5
if [ "${1:-}" = "--quick" ]; then config=debug; instances=${INSTANCES:-1,10}; samples=${SAMPLES:-25}; cli_runs=5; one_shot=2; fi
# The pool holds every instance's two 16 MiB images (sparse; mkfs writes a few MiB of each).
largest=$(tr ',' '\n' <<<"$instances" | sort -n | tail -1)
pool_gib=$(( largest * 2 * 16 / 1024 + 4 ))
build=(-c "$config")
[ -n "${SWIFT_BUILD_PATH:-}" ] && build+=(--build-path "$SWIFT_BUILD_PATH")
for product in quiesce-bench quiesce quiesce-agent quiesce-thaw-guard quiesce-plugin-host quiesce-plugin-crash quiesce-plugin-linux-freeze; do
  swift build "${build[@]}" --product "$product" >/dev/null
done
bin=$(swift build "${build[@]}" --show-bin-path)

case "${POOL_ON:-ram}" in
  ram)  base=/dev/shm ;;
  disk) base=/var/tmp ;;
  *) echo "bench-fleet: POOL_ON: expected ram or disk, found \"$POOL_ON\"" >&2; exit 64 ;;
esac
work=$(mktemp -d "$base/quiesce-bench-fleet.XXXXXX")
loop=""
cleanup() {
  # The bench's agent processes (quiesce-bench fleet --agents processes) stop with it; if it was killed, they are
  # found by their mount tables, which only they were given, under this run's directory.
  pkill -TERM -f -- "--mount-table $work/" 2>/dev/null && sleep 1 || true
  if mountpoint -q "$work/pool"; then umount "$work/pool" || umount -l "$work/pool"; fi
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s "${pool_gib}G" "$work/pool.img"
mkfs.xfs -q -m reflink=1 "$work/pool.img"
loop=$(losetup --find --show "$work/pool.img")
mkdir "$work/pool"
mount "$loop" "$work/pool"

echo "== fleet backup ($config build; instances $instances; 2 disks each; burst 20, 50 creates/s; pool image in $base)"
"$bin/quiesce-bench" fleet --pool "$work/pool" --instances "$instances" --burst 20 --per-second 50 --samples "$samples" ${BENCH_ARGS:-}

[ -n "${FLEET_ONLY:-}" ] && exit 0
echo
echo "== one instance through the product (quiesce backup + a quiesce-agent process) beside the raw floor, same disks, same run"
python3 scripts/bench-backup-cli.py --pool "$work/pool" --bin "$bin" --runs "$cli_runs" --one-shot "$one_shot"

echo
echo "== the fleet through the ec2 provider: moto behind the fault proxy's token bucket (scripts/bench-ec2.py)"
if [ "$config" = debug ]; then ec2_args=(--instances 10 --api-burst 3 --api-rate 10); else ec2_args=(--instances 100 --api-burst 10 --api-rate 10); fi
python3 scripts/bench-ec2.py --bin "$bin" --pool "$work/pool" "${ec2_args[@]}" ${EC2_ARGS:-}
