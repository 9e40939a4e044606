# Shared paths and helpers of the loopback test cluster; sourced by setup.sh,
# teardown.sh and sshd.sh. Not meant to be run on its own.

# Client-facing files (keys, known_hosts, cluster.env, sshd config) live in a
# directory the caller may choose, so several checkouts can share one cluster.
STATE_DIR=${MANTIK_TEST_CLUSTER_DIR:-/tmp/mantik-test-cluster}
# Daemon-side files live at fixed paths: slurm.conf is global (/etc/slurm),
# so its spool and pid paths must not move with the caller's state dir.
RUN_DIR=/run/mantik-test-cluster
DATA_DIR=/var/lib/mantik-test-cluster
# Each service this cluster started is recorded here; teardown stops only these.
STARTED_FILE=$RUN_DIR/started

SSH_PORT=${MANTIK_TEST_SSH_PORT:-2222}
SSH_HOST=127.0.0.1
TEST_USER=mantiktest
SSHD_PID=$STATE_DIR/sshd.pid
MARIADB_PID=/run/mysqld/mantik-test.pid

log() { printf '[mantik-cluster] %s\n' "$*" >&2; }

# pid_alive PIDFILE: the process named in PIDFILE exists.
pid_alive() {
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${limit}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

mark_started() {
  mkdir -p "$RUN_DIR"
  grep -qx "$1" "$STARTED_FILE" 2>/dev/null || echo "$1" >>"$STARTED_FILE"
}

# descendants PID: all processes below PID (sshd forks one child per connection).
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$child"
    echo "$child"
  done
}

# stop_pidfile PIDFILE NAME [with-children]: TERM the process (and its tree), wait, then KILL.
stop_pidfile() {
  local pidfile=$1 name=$2 tree=${3:-}
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  local pid pids
  pid=$(cat "$pidfile")
  pids=$pid
  [[ $tree == with-children ]] && pids="$(descendants "$pid") $pid"
  log "stopping $name (pid $pid)"
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
  rm -f "$pidfile"
}
