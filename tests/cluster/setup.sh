#!/usr/bin/env bash
# Bring up a one-node Slurm cluster with accounting (munge, MariaDB, slurmdbd,
# slurmctld, slurmd) and an sshd on 127.0.0.1:$MANTIK_TEST_SSH_PORT (2222) for
# the unprivileged user `mantiktest`, like a login node of a real HPC site.
#
# Run as root. Idempotent: a second run only checks that everything is up.
# Writes into $MANTIK_TEST_CLUSTER_DIR (default /tmp/mantik-test-cluster):
#   id_ed25519(.pub)  client key of mantiktest     known_hosts  from ssh-keyscan
#   cluster.env       MANTIK_TEST_SSH_HOST/PORT/USER/KEY/KNOWN_HOSTS/PYTHON
# Jobs need a Python with mlflow: the venv in $MANTIK_TEST_PYTHON_VENV (default:
# the repository's .venv) is made usable by mantiktest. When the venv's
# interpreter lies below a directory others cannot enter (pyenv under /root),
# that directory gets o+x (enter, not list); teardown.sh takes it back.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

VENV=${MANTIK_TEST_PYTHON_VENV:-$(cd "$HERE/../.." && pwd)/.venv}
CLUSTER_NAME=mantiktest
TEST_ACCOUNT=mantik-budget
LIMITED_QOS=mantik-limited
WAITING_QOS=mantik-waiting
PACKAGES=(slurm-wlm slurmdbd munge openssh-server mariadb-server mariadb-client tcsh)
START=$SECONDS

[[ $(id -u) == 0 ]] || { log "setup.sh must run as root"; exit 1; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# write_if_changed FILE MODE: stdin becomes FILE; succeeds only when it changed.
write_if_changed() {
  local file=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
  install -m "$mode" "$tmp" "$file"
  rm -f "$tmp"
}

start_munge() {
  install -d -o munge -g munge -m 711 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 700 /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  if pid_alive /run/munge/munged.pid; then return 0; fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munged bash -c 'munge -n | unmunge'
  mark_started munge
}

mariadb_up() { mariadb-admin --socket=/run/mysqld/mysqld.sock ping; }

start_mariadb() {
  # mariadbd drops to user mysql before writing its pid and log files.
  install -d -o mysql -g mysql -m 755 /run/mysqld "$DATA_DIR/mariadb-log"
  if mariadb_up >/dev/null 2>&1; then return 0; fi
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  log "starting MariaDB"
  # No TCP listener: slurmdbd reaches it over the socket, and port 3306 stays free.
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file="$MARIADB_PID" \
    --log-error="$DATA_DIR/mariadb-log/error.log" </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb_up
  mark_started mariadb
}

write_slurm_configs() {
  local changed=1
  # slurmdbd runs as root and logs in to MariaDB as root over the unix socket
  # (Debian's unix_socket auth), so no database password exists to leak.
  write_if_changed /etc/slurm/slurmdbd.conf 600 <<CONF && changed=0
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$DATA_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
CONF
  # config_overrides: the node declares 8 CPUs on a 2-core machine so that
  # several single-core test jobs run at once, without being drained for it.
  write_if_changed /etc/slurm/slurm.conf 644 <<CONF && changed=0
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DATA_DIR/slurmctld
SlurmdSpoolDir=$DATA_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$DATA_DIR/log/slurmctld.log
SlurmdLogFile=$DATA_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MinJobAge=120
KillWait=5
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations,limits,qos
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=batch Nodes=localhost MaxTime=INFINITE State=UP
CONF
  return $changed
}

start_slurmdbd() {
  mariadb --socket=/run/mysqld/mysqld.sock -e 'CREATE DATABASE IF NOT EXISTS slurm_acct_db'
  if ! pid_alive "$RUN_DIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    mark_started slurmdbd
  fi
  wait_for 30 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  fi
  add_associations
}

# As real sites: jobs must run under an account (compute budget) and QoS the user may
# use (AccountingStorageEnforce), so sbatch refuses an unknown account or QoS. The test
# user is in one account; a QoS with limits refuses (DenyOnLimit) a job over them, and
# another, without DenyOnLimit, accepts such a job and lets it wait for good.
add_associations() {
  if ! sacctmgr -n -P list qos format=name | grep -qx "$LIMITED_QOS"; then
    sacctmgr -i add qos "$LIMITED_QOS" MaxWall=00:30:00 MaxTRESPerJob=node=1 \
      Flags=DenyOnLimit >/dev/null
  fi
  if ! sacctmgr -n -P list qos format=name | grep -qx "$WAITING_QOS"; then
    sacctmgr -i add qos "$WAITING_QOS" MaxWall=00:30:00 MaxTRESPerJob=cpu=2 >/dev/null
  fi
  if ! sacctmgr -n -P list account format=account | grep -qx "$TEST_ACCOUNT"; then
    sacctmgr -i add account "$TEST_ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null
  fi
  if ! sacctmgr -n -P list assoc user="$TEST_USER" format=account | grep -qx "$TEST_ACCOUNT"; then
    sacctmgr -i add user "$TEST_USER" Account="$TEST_ACCOUNT" DefaultAccount="$TEST_ACCOUNT" \
      Cluster="$CLUSTER_NAME" >/dev/null
  fi
  local qos
  for qos in "$LIMITED_QOS" "$WAITING_QOS"; do
    if ! sacctmgr -n -P list assoc user="$TEST_USER" format=qos | grep -q "$qos"; then
      sacctmgr -i modify user "$TEST_USER" set QOS+="$qos" >/dev/null
    fi
  done
}

start_slurmctld() {
  if pid_alive "$RUN_DIR/slurmctld.pid"; then return 0; fi
  log "starting slurmctld"
  /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  mark_started slurmctld
}

node_ready() { sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)'; }

start_slurmd() {
  if ! pid_alive "$RUN_DIR/slurmd.pid"; then
    log "starting slurmd"
    /usr/sbin/slurmd -N localhost
    mark_started slurmd
  fi
  if ! wait_for 30 "node localhost to be idle" node_ready; then
    # A node left DOWN/DRAIN by an earlier crash stays so until resumed.
    scontrol update NodeName=localhost State=RESUME || true
    wait_for 30 "node localhost to be idle" node_ready
  fi
}

restart_slurm_daemons() {
  log "slurm config changed: restarting daemons"
  stop_pidfile "$RUN_DIR/slurmd.pid" slurmd
  stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
  stop_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd
}

make_user() {
  if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$TEST_USER"
  fi
  # useradd leaves the account locked ("!"), and sshd without PAM refuses
  # locked accounts even for key logins; "*" means: no password, not locked.
  [[ $(getent shadow "$TEST_USER" | cut -d: -f2) == '*' ]] || usermod -p '*' "$TEST_USER"
  # A test switches the login shell to tcsh for a while; one that died left it so.
  [[ $(getent passwd "$TEST_USER" | cut -d: -f7) == /bin/bash ]] || usermod -s /bin/bash "$TEST_USER"
}

setup_ssh() {
  install -d -m 700 "$STATE_DIR"
  [[ -f $STATE_DIR/ssh_host_ed25519_key ]] ||
    ssh-keygen -q -t ed25519 -N '' -C mantik-test-host -f "$STATE_DIR/ssh_host_ed25519_key"
  [[ -f $STATE_DIR/id_ed25519 ]] ||
    ssh-keygen -q -t ed25519 -N '' -C mantik-test-client -f "$STATE_DIR/id_ed25519"
  local home
  home=$(getent passwd "$TEST_USER" | cut -d: -f6)
  install -d -o "$TEST_USER" -g "$TEST_USER" -m 700 "$home/.ssh"
  install -o "$TEST_USER" -g "$TEST_USER" -m 600 "$STATE_DIR/id_ed25519.pub" "$home/.ssh/authorized_keys"
  write_if_changed "$STATE_DIR/sshd_config" 600 <<CONF && "$HERE/sshd.sh" stop || true
Port $SSH_PORT
ListenAddress $SSH_HOST
HostKey $STATE_DIR/ssh_host_ed25519_key
PidFile $SSHD_PID
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $TEST_USER
UsePAM no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
CONF
  "$HERE/sshd.sh" start
  if [[ ! -s $STATE_DIR/known_hosts ]]; then
    ssh-keyscan -t ed25519 -p "$SSH_PORT" "$SSH_HOST" 2>/dev/null >"$STATE_DIR/known_hosts.tmp"
    mv "$STATE_DIR/known_hosts.tmp" "$STATE_DIR/known_hosts"
  fi
}

# Give "others" the right to enter (not list) each directory on the way to the
# venv's real interpreter that lacks it; recorded so teardown.sh can undo it.
open_python_for_user() {
  local python=$VENV/bin/python
  # find_spec, not import: as fast a check as possible, setup.sh runs per test session.
  local FIND_MLFLOW='import importlib.util as u, sys; sys.exit(u.find_spec("mlflow") is None)'
  [[ -x $python ]] || { log "no venv at $VENV (set MANTIK_TEST_PYTHON_VENV)"; return 1; }
  if runuser -u "$TEST_USER" -- "$python" -c "$FIND_MLFLOW" >/dev/null 2>&1; then return 0; fi
  local target dir
  for target in "$VENV" "$(readlink -f "$python")"; do
    dir=$(dirname "$target")
    while [[ $dir != / ]]; do
      # Others may enter when their execute bit is set: "x", or "t" with the sticky bit (/tmp).
      if [[ $(stat -c %A "$dir") != *[xt] ]]; then
        log "chmod o+x $dir (so $TEST_USER can run $python)"
        chmod o+x "$dir"
        echo "$dir" >>"$RUN_DIR/chmod-ox"
      fi
      dir=$(dirname "$dir")
    done
  done
  runuser -u "$TEST_USER" -- "$python" -c "$FIND_MLFLOW" >/dev/null ||
    { log "$TEST_USER still cannot import mlflow from $python"; return 1; }
}

write_env() {
  write_if_changed "$STATE_DIR/cluster.env" 644 <<ENV || true
MANTIK_TEST_SSH_HOST=$SSH_HOST
MANTIK_TEST_SSH_PORT=$SSH_PORT
MANTIK_TEST_SSH_USER=$TEST_USER
MANTIK_TEST_SSH_KEY=$STATE_DIR/id_ed25519
MANTIK_TEST_SSH_KNOWN_HOSTS=$STATE_DIR/known_hosts
MANTIK_TEST_PYTHON=$VENV/bin/python
ENV
}

main() {
  install_packages
  install -d -m 755 "$RUN_DIR" "$DATA_DIR" "$DATA_DIR/log" "$DATA_DIR/slurmctld" "$DATA_DIR/slurmd"
  start_munge
  start_mariadb
  if write_slurm_configs; then restart_slurm_daemons; fi
  make_user  # before slurmdbd: its association names the user
  start_slurmdbd
  start_slurmctld
  start_slurmd
  setup_ssh
  open_python_for_user
  write_env
  log "cluster up in $((SECONDS - START))s; env in $STATE_DIR/cluster.env"
  cat "$STATE_DIR/cluster.env"
}

main "$@"
