#!/bin/sh
# Thaw script for Oracle Database (install as /tmp/postscript.sh, root:root, 0700).
#
# Takes every datafile out of backup mode and archives the current redo log,
# so the redo needed to recover the snapshot is archived. Safe to run when the
# freeze script failed (END BACKUP on files not in backup mode is ignored).
set -eu

ORACLE_USER=${QUIESCE_ORACLE_USER:-oracle}
ORACLE_SID=${ORACLE_SID:-ORCL}
TIMEOUT=${QUIESCE_WAIT_SECONDS:-10}

out=$(timeout "$TIMEOUT" su - "$ORACLE_USER" -c "ORACLE_SID=$ORACLE_SID sqlplus -S / as sysdba" <<'SQL'
SET HEADING OFF FEEDBACK OFF
WHENEVER SQLERROR CONTINUE
ALTER DATABASE END BACKUP;
WHENEVER SQLERROR EXIT SQL.SQLCODE
ALTER SYSTEM ARCHIVE LOG CURRENT;
SELECT 'STILL_IN_BACKUP=' || COUNT(*) FROM v$backup WHERE status = 'ACTIVE';
EXIT
SQL
) || { echo "oracle: END BACKUP failed: $out" >&2; exit 1; }

case "$out" in
    *STILL_IN_BACKUP=0*) echo "oracle: backup mode ended, current log archived" ;;
    *) echo "oracle: some datafiles are still in backup mode: $out" >&2; exit 1 ;;
esac
