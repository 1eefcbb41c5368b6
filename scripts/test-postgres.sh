#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests, from Debian's packages: initdb in DIR (as
# the postgres user: the server refuses to run as root), listening on 127.0.0.1 only, on a
# free port, trusting local connections. Nothing of the machine's own PostgreSQL is touched.
#
#   scripts/test-postgres.sh start DIR   prints QUIESCE_TEST_POSTGRES=postgres://postgres@127.0.0.1:PORT/postgres
#   scripts/test-postgres.sh stop DIR    stops it (fast shutdown) and removes DIR
set -euo pipefail
action=${1:?usage: test-postgres.sh start|stop DIR}
dir=${2:?usage: test-postgres.sh start|stop DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "test-postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$action" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 >/dev/null
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null
  echo "QUIESCE_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  [ -d "$dir/data" ] && as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  rm -rf "$dir"
  ;;
*) echo "test-postgres.sh: expected start or stop, found $action" >&2; exit 64 ;;
esac
