#!/usr/bin/env bash
# Plugin load time and plan latency through the plugin host (one process per
# plugin, protobuf over a pipe, validation on the engine side), for the
# built-ins and the C example.
#
#   scripts/bench-plan.sh            release build, 2000 plans per plugin
#   scripts/bench-plan.sh --quick    debug build, 100 plans (CI smoke pass)
#   RUNS=10000 scripts/bench-plan.sh
set -euo pipefail
cd "$(dirname "$0")/.."

config=release; runs=${RUNS:-2000}
if [ "${1:-}" = "--quick" ]; then config=debug; runs=${RUNS:-100}; fi
build=(-c "$config")
[ -n "${SWIFT_BUILD_PATH:-}" ] && build+=(--build-path "$SWIFT_BUILD_PATH")

make -s -C Plugins/example-c
swift build "${build[@]}" --product quiesce-bench >/dev/null
swift build "${build[@]}" --product quiesce-plugin-host >/dev/null
swift build "${build[@]}" --product quiesce-plugin-crash >/dev/null
swift build "${build[@]}" --product quiesce-plugin-linux-freeze >/dev/null
bin=$(swift build "${build[@]}" --show-bin-path)

echo "== plan latency ($config build, $runs plans per plugin, 16 mounts, 3 hooks)"
"$bin/quiesce-bench" plan --runs "$runs" --plugin-path Plugins/example-c/build/libquiesce-plugin-db-hold.so
