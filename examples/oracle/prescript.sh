#!/bin/sh
# Freeze script for Oracle Database (install as /tmp/prescript.sh, root:root, 0700).
#
# Puts every datafile in backup mode. The database keeps running and writing;
# a snapshot of datafiles in backup mode plus the archived redo generated until
# END BACKUP recovers to a consistent state (the database must run in
# ARCHIVELOG mode: `SELECT log_mode FROM v$database;`).
set -eu

ORACLE_USER=${QUIESCE_ORACLE_USER:-oracle}
ORACLE_SID=${ORACLE_SID:-ORCL}
TIMEOUT=${QUIESCE_WAIT_SECONDS:-10}

out=$(timeout "$TIMEOUT" su - "$ORACLE_USER" -c "ORACLE_SID=$ORACLE_SID sqlplus -S / as sysdba" <<'SQL'
WHENEVER SQLERROR EXIT SQL.SQLCODE
SET HEADING OFF FEEDBACK OFF
SELECT 'LOG_MODE=' || log_mode FROM v$database;
ALTER SYSTEM ARCHIVE LOG CURRENT;
ALTER DATABASE BEGIN BACKUP;
SELECT 'IN_BACKUP=' || COUNT(*) FROM v$backup WHERE status = 'ACTIVE';
EXIT
SQL
) || { echo "oracle: BEGIN BACKUP failed: $out" >&2; exit 1; }

case "$out" in
    *LOG_MODE=ARCHIVELOG*) ;;
    *) echo "oracle: the database is not in ARCHIVELOG mode; backup mode cannot make the snapshot consistent" >&2; exit 1 ;;
esac
echo "oracle: datafiles in backup mode ($(echo "$out" | grep -o 'IN_BACKUP=[0-9]*'))"
