#!/usr/bin/env bash
# Start, stop or restart only the test sshd (127.0.0.1:$MANTIK_TEST_SSH_PORT).
# `stop` also ends the open connections, like a login node going away, so
# clients see their session drop rather than lingering on a live child.
# Usage: sshd.sh start|stop|restart|status   (as root, after setup.sh)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

sshd_start() {
  if pid_alive "$SSHD_PID"; then return 0; fi
  [[ -f $STATE_DIR/sshd_config ]] || { log "no $STATE_DIR/sshd_config: run setup.sh first"; exit 1; }
  mkdir -p /run/sshd
  /usr/sbin/sshd -f "$STATE_DIR/sshd_config" -E "$STATE_DIR/sshd.log"
  wait_for 10 "sshd on port $SSH_PORT" bash -c "exec 3<>/dev/tcp/$SSH_HOST/$SSH_PORT"
  mark_started sshd
}

sshd_stop() {
  stop_pidfile "$SSHD_PID" sshd with-children
}

case ${1:-} in
  start) sshd_start ;;
  stop) sshd_stop ;;
  restart) sshd_stop; sshd_start ;;
  status) pid_alive "$SSHD_PID" && echo running || { echo stopped; exit 3; } ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
