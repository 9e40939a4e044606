#!/usr/bin/env bash
# Stop exactly the services setup.sh started (listed in /run/mantik-test-cluster/started),
# newest first, and undo its o+x permission changes. Keys, configs and the
# mantiktest user stay, so the next setup.sh is fast.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

[[ $(id -u) == 0 ]] || { log "teardown.sh must run as root"; exit 1; }

stop_service() {
  case $1 in
    sshd) "$HERE/sshd.sh" stop ;;
    slurmd) stop_pidfile "$RUN_DIR/slurmd.pid" slurmd ;;
    slurmctld) stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld ;;
    slurmdbd) stop_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd ;;
    mariadb) stop_pidfile "$MARIADB_PID" mariadb ;;
    munge) stop_pidfile /run/munge/munged.pid munged ;;
  esac
}

if [[ -f $STARTED_FILE ]]; then
  for service in $(tac "$STARTED_FILE"); do stop_service "$service"; done
  rm -f "$STARTED_FILE"
fi
if [[ -f $RUN_DIR/chmod-ox ]]; then
  while read -r dir; do
    log "chmod o-x $dir"
    chmod o-x "$dir"
  done <"$RUN_DIR/chmod-ox"
  rm -f "$RUN_DIR/chmod-ox"
fi
log "stopped"
