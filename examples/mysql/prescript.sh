#!/bin/sh
# Freeze script for MySQL / MariaDB (install as /tmp/prescript.sh, root:root, 0700).
#
# Takes FLUSH TABLES WITH READ LOCK in a background client session and returns
# as soon as the lock is held. The session (and the lock) lives until
# postscript.sh ends it, or QUIESCE_LOCK_SECONDS pass, whichever comes first.
# State goes to /run (tmpfs): nothing is written to a filesystem about to be frozen.
#
# MariaDB 10.4+ can use BACKUP STAGE instead; FTWRL works on both.
set -eu

DEFAULTS=${QUIESCE_MYSQL_DEFAULTS:-/root/.quiesce-mysql.cnf}   # [client] user= password= (mode 0600)
MYSQL=${QUIESCE_MYSQL:-mysql}
STATE=${QUIESCE_STATE:-/run/quiesce-mysql}
LOCK_SECONDS=${QUIESCE_LOCK_SECONDS:-30}
WAIT_SECONDS=${QUIESCE_WAIT_SECONDS:-10}

umask 077
mkdir -p "$STATE"
rm -f "$STATE/locked" "$STATE/pid" "$STATE/out"

set -- "$MYSQL" --no-defaults
[ -r "$DEFAULTS" ] && set -- "$MYSQL" --defaults-extra-file="$DEFAULTS"

# `system` runs on the client, inside the session that holds the lock: the
# file appears only once FLUSH TABLES WITH READ LOCK has returned. The session's
# id goes first into the output: postscript.sh ends the session with KILL (the
# server does not notice a client that merely went away while it SLEEPs).
setsid "$@" --batch --skip-column-names --unbuffered \
    -e "SELECT CONNECTION_ID(); FLUSH TABLES WITH READ LOCK; system touch $STATE/locked; DO SLEEP($LOCK_SECONDS);" \
    </dev/null >"$STATE/out" 2>&1 &
echo $! >"$STATE/pid"

deadline=$(( $(date +%s) + WAIT_SECONDS ))
while [ ! -e "$STATE/locked" ]; do
    if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        echo "mysql: could not take the read lock: $(tail -n 3 "$STATE/out")" >&2
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        kill "$(cat "$STATE/pid")" 2>/dev/null || true
        echo "mysql: no read lock after ${WAIT_SECONDS}s (long-running queries?); gave up" >&2
        exit 1
    fi
    sleep 0.05
done
echo "mysql: tables flushed and read-locked (pid $(cat "$STATE/pid"), at most ${LOCK_SECONDS}s)"
