#!/usr/bin/env bash
# What each consistency level gives a MariaDB, end to end as a user runs it
# (root; needs Debian's mariadb-server, which .ci/run installs): a writer on
# MariaDB whose data lives on an ext4 disk of a local reflink pool, `quiesce
# backup` with a crash, a filesystem and two application policies (the mariadb
# plugin: BACKUP STAGE and FTWRL), `quiesce restore --as-new` of each group and
# a second MariaDB started on each restored disk. Prints a table per level:
# stall, frozen window, CHECK TABLE of every table, the MyISAM pair, InnoDB's
# recovery, the restored counter against the marker recorded under the lock.
#
#   scripts/prove-mariadb.sh              debug build (what .ci/run leaves)
#   CONFIG=release scripts/prove-mariadb.sh
#   POOL_ON=ram scripts/prove-mariadb.sh    the pool's image in /dev/shm instead of /var/tmp
#   scripts/prove-mariadb.sh --idle-runs 50 --write-seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "prove-mariadb: needs root (loop devices, mount, FIFREEZE)" >&2; exit 1; }
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || { echo "prove-mariadb: needs mariadb-server (apt-get install mariadb-server mariadb-client)" >&2; exit 1; }
config=${CONFIG:-debug}
for product in quiesce quiesce-agent quiesce-thaw-guard quiesce-plugin-host quiesce-plugin-crash quiesce-plugin-mariadb; do
  swift build -c "$config" --product "$product" >/dev/null
done
python3 scripts/prove-mariadb.py --bin "$(swift build -c "$config" --show-bin-path)" "$@"
