#!/bin/sh
# Thaw script for MySQL / MariaDB (install as /tmp/postscript.sh, root:root, 0700).
#
# Ends the session prescript.sh started, which releases the read lock. Safe to
# run when the freeze script failed or never ran. Exits 1 if the lock had
# already gone before the thaw (the session died or QUIESCE_LOCK_SECONDS ran
# out): the snapshot may not be application-consistent, and the report says so.
set -u

DEFAULTS=${QUIESCE_MYSQL_DEFAULTS:-/root/.quiesce-mysql.cnf}
MYSQL=${QUIESCE_MYSQL:-mysql}
STATE=${QUIESCE_STATE:-/run/quiesce-mysql}

if [ ! -e "$STATE/pid" ]; then
    echo "mysql: no lock session to end"
    exit 0
fi
pid=$(cat "$STATE/pid")
session=$(head -n 1 "$STATE/out" 2>/dev/null | tr -cd '0-9')
set -- "$MYSQL" --no-defaults
[ -r "$DEFAULTS" ] && set -- "$MYSQL" --defaults-extra-file="$DEFAULTS"
status=0
if kill -0 "$pid" 2>/dev/null; then
    # End the session on the server (this releases the lock), then the client.
    if [ -n "$session" ] && ! "$@" --batch -e "KILL $session" 2>"$STATE/kill.err"; then
        echo "mysql: KILL $session failed: $(cat "$STATE/kill.err")" >&2
        status=1
    fi
    kill "$pid" 2>/dev/null || true
    echo "mysql: read lock released (ended session $session, client pid $pid)"
else
    echo "mysql: the lock session (pid $pid) had already ended before the thaw: $(tail -n 3 "$STATE/out" 2>/dev/null)" >&2
    status=1
fi
rm -f "$STATE/locked" "$STATE/pid" "$STATE/out" "$STATE/kill.err"
exit $status
