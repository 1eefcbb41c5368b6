#!/usr/bin/env bash
# Every test: the generated-code check, the Swift test suites, the interop
# tests with stock peers (Python grpcio, openssl s_client), and a quick smoke
# pass of each benchmark. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== proto manifest"
scripts/check-proto.sh

echo "== build"
swift build --build-tests
make -s -C Plugins/example-c   # the C example plugin (libprotobuf-c), loaded by the tests

echo "== a throw-away PostgreSQL for the shared-catalog tests"
pgdir=$(mktemp -d /var/tmp/quiesce-pg.XXXXXX)
trap 'scripts/test-postgres.sh stop "$pgdir"' EXIT
export "$(scripts/test-postgres.sh start "$pgdir")"
echo "$QUIESCE_TEST_POSTGRES"

echo "== swift tests"
swift test --skip-build --parallel --num-workers 2

echo "== interop tests (grpcio, openssl)"
QUIESCE_BIN="$(swift build --show-bin-path)" python3 -m pytest -q Tests/interop

echo "== benchmark smoke"
scripts/bench-sessions.sh --quick
scripts/bench-snapshot.sh --quick
scripts/bench-freeze.sh --quick
scripts/bench-plan.sh --quick
scripts/bench-identity.sh --quick
scripts/bench-fleet.sh --quick

echo "== the MariaDB proof (each level restored and checked)"
scripts/prove-mariadb.sh --idle-runs 3 --write-seconds 1

# Nothing above may have replaced the machine's /dev/null (a bench once renamed a log file over it).
[ -c /dev/null ] || { echo "test.sh: /dev/null is no longer a character device: something replaced it" >&2; exit 1; }
