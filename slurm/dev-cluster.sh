#!/usr/bin/env bash
# dev-cluster.sh -- a real, tiny Slurm cluster on this one machine, for tests and for trying the
# bip launcher without a cluster (Debian 12, run as root, no systemd needed).
#
#   bash slurm/dev-cluster.sh up       install (apt, first time only), configure, start, smoke-test
#   bash slurm/dev-cluster.sh down     cancel all jobs, stop every daemon this script started
#   bash slurm/dev-cluster.sh status   daemons + sinfo; exit 0 only when everything is running
#   bash slurm/dev-cluster.sh restart  down, then up
#
# What runs: munged, mariadbd + slurmdbd (accounting, so `sacct` and submitit's job states work),
# slurmctld, and one slurmd per fake node node1..nodeN, all on 127.0.0.1.  Each fake node
# advertises SLURM_CPUS_PER_NODE CPUs and SLURM_GPUS_PER_NODE fake GPUs (char devices with the
# major/minor of /dev/null, so `--gpus-per-node` schedules and sets CUDA_VISIBLE_DEVICES).
# Daemons are stopped through their PID files, never by process name. `up` is idempotent: when
# already up it only re-checks; when the generated config changed it restarts the slurm daemons.
# It works from any working directory (only absolute paths; daemons are started from /).
#
# Knobs (environment):
#   SLURM_NODES=2            fake compute nodes node1..nodeN
#   SLURM_CPUS_PER_NODE=4    CPUs advertised per node (may exceed the real cores: config_overrides)
#   SLURM_GPUS_PER_NODE=2    fake GPUs per node, 0 = none
#   SLURM_PARTITION=debug    the one partition (default partition, no time limit)
#   SLURM_UP_TIMEOUT=60      seconds to wait for daemons / nodes / the smoke srun
#
# Logs: /var/log/slurm/{slurmctld,slurmdbd,slurmd-nodeN}.log, /var/log/mysql/ci-mariadb.err.
# Based on /work/shared/reference/slurm_local_setup.sh (see slurm-local.md for the why of each
# setting: cred_expire=5, sched_interval=1, bf_interval=1, KillWait=5, config_overrides).
set -euo pipefail

NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS_PER_NODE:-4}
GPUS=${SLURM_GPUS_PER_NODE:-2}
PART=${SLURM_PARTITION:-debug}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}

CONF=/etc/slurm
LOGDIR=/var/log/slurm
FAKEGPU_DIR=/run/slurm-fakegpu
LOCKFILE=/run/lock/bip-dev-cluster.lock
MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid
SLURMDBD_PID=/run/slurmdbd.pid
SLURMCTLD_PID=/run/slurmctld.pid
DB_PASS=slurm-ci          # local-only database (mariadb runs with --skip-networking)

log() { printf '[dev-cluster %(%F %T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# PID-file helpers (daemons get reparented to PID 1, which reaps late: a zombie counts as gone)

# pid file -> pid, only if that pid is alive, not a zombie, and one of our daemons (pid reuse)
pid_of() {
  local pf=$1 pid comm
  [ -s "$pf" ] || return 1
  pid=$(cat "$pf" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat /proc/"$pid"/comm 2>/dev/null) || return 1
  case "$comm" in munged|mariadbd|slurmdbd|slurmctld|slurmd) ;; *) return 1 ;; esac
  running "$pid" || return 1
  echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }
running() { local st; st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }

stop_pidfile() {  # stop exactly the process recorded in the pid file and wait until it is gone
  local pf=$1 pid i
  if pid=$(pid_of "$pf"); then
    log "stopping $(cat /proc/"$pid"/comm 2>/dev/null || echo '?') (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do running "$pid" || break; sleep 0.2; done
    if running "$pid"; then
      log "pid $pid ($pf) still alive after 20 s, sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      for i in $(seq 1 25); do running "$pid" || break; sleep 0.2; done
    fi
  fi
  rm -f "$pf"
}

wait_for() {  # wait_for <seconds> <command...>: retry the command until it succeeds
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.2
  done
}

# Start a self-daemonizing daemon with the lock fd closed (or it would hold our lock forever)
# and from / (so it never pins the caller's working directory, e.g. a CI checkout).
spawn() { (cd / && exec "$@") 9>&-; }

take_lock() {  # serialise concurrent up/down calls (several engineers share this machine)
  install -d /run/lock
  exec 9>"$LOCKFILE"
  flock -w 600 9 || die "could not take $LOCKFILE within 600 s"
}

show_log_tail() { local f; for f in "$@"; do [ -f "$f" ] && { log "--- tail $f"; tail -n 15 "$f" >&2; }; done; return 0; }

# ---------------------------------------------------------------------------------------------
install_pkgs() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # --no-install-recommends: ~28 packages instead of 43+ (no hdf5/rocm/freeipmi/influx plugins)
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then   # Debian's postinst normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if ! alive "$MUNGE_PID"; then
    log "starting munged"
    spawn runuser -u munge -- /usr/sbin/munged   # daemonizes, writes $MUNGE_PID
  fi
  wait_for 10 munge -n || die "munged does not answer"
}

start_mariadb() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  if ! alive "$MARIADB_PID"; then
    log "starting mariadbd"
    # mariadbd stays in the foreground: one background subshell that execs it (no bash left
    # behind holding the lock fd), in its own session
    (cd / && exec setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
      --socket=/run/mysqld/mysqld.sock --pid-file="$MARIADB_PID" \
      --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      --log-error=/var/log/mysql/ci-mariadb.err) 9>&- </dev/null >/dev/null 2>&1 &
  fi
  wait_for "$UP_TIMEOUT" mariadb-admin ping || { show_log_tail /var/log/mysql/ci-mariadb.err; die "mariadbd not ready"; }
  wait_for 10 alive "$MARIADB_PID" || die "mariadbd wrote no pid file"
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_if_changed() {  # write_if_changed <file> <content>; returns 0 when the file changed
  local f=$1 content=$2
  if [ -f "$f" ] && [ "$(cat "$f")" = "$content" ]; then return 1; fi
  printf '%s\n' "$content" > "$f"
}

fake_nodes() {  # /etc/hosts entries, spool dirs, fake GPU devices; prints the NodeName lines
  local mem_mb i g gline
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)   # not consumable (CR_Core)
  for i in $(seq 1 "$NODES"); do
    install -d /var/spool/slurmd/node"$i"
    grep -qE "^127\.0\.0\.1[[:space:]]+node$i([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 node$i" >> /etc/hosts
    gline=""
    if [ "$GPUS" -gt 0 ]; then
      install -d "$FAKEGPU_DIR"
      for g in $(seq 0 $((GPUS - 1))); do   # same device numbers as /dev/null
        [ -c "$FAKEGPU_DIR/node$i-gpu$g" ] || mknod "$FAKEGPU_DIR/node$i-gpu$g" c 1 3
      done
      gline=" Gres=gpu:$GPUS"
    fi
    echo "NodeName=node$i NodeHostname=node$i NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb$gline State=UNKNOWN"
  done
}

write_configs() {  # sets CHANGED=1 when slurm.conf, gres.conf or slurmdbd.conf changed
  CHANGED=0
  install -d -o slurm -g slurm /var/spool/slurmctld "$LOGDIR"
  local nodes gres="" i
  nodes=$(fake_nodes)
  local host conf
  host=$(hostname -s)
  conf="# generated by bip slurm/dev-cluster.sh -- local dev cluster, do not edit by hand
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# requeued jobs become eligible after cred_expire (+1) s; default 120 s
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups here: no CPU/memory confinement
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
ReturnToService=2
# submitit ignores SIGTERM; a short KillWait keeps the COMPLETING phase after scancel short
KillWait=5
# advertise more CPUs than the machine has
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
$( [ "$GPUS" -gt 0 ] && echo GresTypes=gpu )
$nodes
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  if write_if_changed "$CONF/slurm.conf" "$conf"; then CHANGED=1; fi
  if [ "$GPUS" -gt 0 ]; then
    for i in $(seq 1 "$NODES"); do
      gres+=$'\n'"NodeName=node$i Name=gpu File=$FAKEGPU_DIR/node$i-gpu[0-$((GPUS - 1))]"
    done
    if write_if_changed "$CONF/gres.conf" "AutoDetect=off$gres"; then CHANGED=1; fi
  elif [ -f "$CONF/gres.conf" ]; then
    rm -f "$CONF/gres.conf"; CHANGED=1
  fi
  if write_if_changed "$CONF/slurmdbd.conf" "AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOGDIR/slurmdbd.log
PidFile=$SLURMDBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db"; then CHANGED=1; fi
  chown slurm:slurm "$CONF/slurmdbd.conf"; chmod 600 "$CONF/slurmdbd.conf"   # slurmdbd refuses otherwise
}

stop_slurm_daemons() {
  local pf
  for pf in /run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf"; done
  stop_pidfile "$SLURMCTLD_PID"
}

nodes_ready() {  # all NODES nodes responding and usable (idle, or busy with jobs)
  [ "$(sinfo -h -N -p "$PART" -o '%N %t' 2>/dev/null | sort -u | grep -cE ' (idle|mix|alloc|comp)$')" -eq "$NODES" ]
}

start_slurm() {
  if ! alive "$SLURMDBD_PID"; then log "starting slurmdbd"; spawn slurmdbd; fi
  wait_for "$UP_TIMEOUT" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' \
    || { show_log_tail "$LOGDIR/slurmdbd.log"; die "slurmdbd not listening on 6819"; }
  if ! alive "$SLURMCTLD_PID"; then log "starting slurmctld"; spawn slurmctld; fi
  local i
  for i in $(seq 1 "$NODES"); do
    if ! alive /run/slurmd-node"$i".pid; then log "starting slurmd node$i"; spawn slurmd -N node"$i"; fi
  done
  if ! wait_for "$UP_TIMEOUT" nodes_ready; then
    sinfo -N -o '%N %t %E' >&2 || true
    log "nodes not idle, trying state=resume"
    scontrol update nodename=ALL state=resume 2>/dev/null || true
    wait_for 30 nodes_ready || { sinfo -N -o '%N %t %E' >&2 || true; show_log_tail "$LOGDIR/slurmctld.log"; die "nodes not ready"; }
  fi
}

smoke_test() {  # one short job over all nodes, then check that accounting answers
  local out want i
  # the cluster is shared: when other jobs fill every CPU, srun would only wait; running jobs
  # already prove that scheduling works
  if [ "$(sinfo -h -N -p "$PART" -o '%N %t' | sort -u | grep -cE ' alloc$')" -eq "$NODES" ]; then
    log "all nodes fully allocated ($(squeue -h -t R | wc -l) running jobs): skipping the smoke srun"
    wait_for 30 sacct -n -X -S now-3600 -o JobID || die "sacct does not answer (slurmdbd?)"
    return 0
  fi
  # shellcheck disable=SC2016  # $SLURMD_NODENAME expands inside the job
  out=$(cd / && timeout "$UP_TIMEOUT" srun -N "$NODES" -n "$NODES" -p "$PART" -t 1 -J dev-cluster-smoke \
          bash -c 'echo $SLURMD_NODENAME' | sort | tr '\n' ' ') || die "smoke srun failed or timed out"
  want=$(for i in $(seq 1 "$NODES"); do echo node"$i"; done | sort | tr '\n' ' ')
  [ "$out" = "$want" ] || die "smoke srun ran on '$out', expected '$want'"
  wait_for 30 sacct -n -X -S now-3600 -o JobID || die "sacct does not answer (slurmdbd?)"
}

# ---------------------------------------------------------------------------------------------
up() {
  local t0=$SECONDS
  take_lock
  install_pkgs
  start_munge
  start_mariadb
  write_configs
  if [ "$CHANGED" = 1 ] && { alive "$SLURMCTLD_PID" || alive "$SLURMDBD_PID"; }; then
    log "config changed: restarting the slurm daemons"
    stop_slurm_daemons
    stop_pidfile "$SLURMDBD_PID"
  fi
  start_slurm
  smoke_test
  log "cluster up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' ')"
}

down() {
  take_lock
  if alive "$SLURMCTLD_PID"; then
    local u   # every user's jobs go: the cluster goes away (KILL first: submitit ignores SIGTERM)
    for u in $(squeue -h -o %u 2>/dev/null | sort -u); do
      scancel --full --signal=KILL --user="$u" 2>/dev/null || true
      scancel --user="$u" 2>/dev/null || true
    done
    # shellcheck disable=SC2016
    wait_for 30 bash -c '[ -z "$(squeue -h -o %i)" ]' || log "jobs still in queue: $(squeue -h -o %i | tr '\n' ' ')"
  fi
  stop_slurm_daemons
  stop_pidfile "$SLURMDBD_PID"
  stop_pidfile "$MARIADB_PID"
  stop_pidfile "$MUNGE_PID"
  log "all daemons stopped"
}

status() {
  local pf ok=0
  for pf in "$MUNGE_PID" "$MARIADB_PID" "$SLURMDBD_PID" "$SLURMCTLD_PID"; do
    if alive "$pf"; then echo "$pf: running (pid $(cat "$pf"))"; else echo "$pf: not running"; ok=1; fi
  done
  local i
  for i in $(seq 1 "$NODES"); do
    pf=/run/slurmd-node$i.pid
    if alive "$pf"; then echo "$pf: running (pid $(cat "$pf"))"; else echo "$pf: not running"; ok=1; fi
  done
  if [ "$ok" = 0 ]; then
    sinfo -N -o '%N %c %m %G %t %E' 2>/dev/null || ok=1
    squeue 2>/dev/null | head -n 20 || true
  fi
  if [ "$ok" = 0 ]; then echo "dev cluster: UP"; else echo "dev cluster: DOWN (or partly up)"; fi
  return "$ok"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  restart) down; exec 9>&-; up ;;
  *) echo "usage: $0 up|down|status|restart" >&2; exit 2 ;;
esac
