#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and CI (Debian/Ubuntu, as root).
#
#   deploy/slurm/local_cluster.sh up       install slurm-wlm + munge if missing, write slurm.conf,
#                                          start munged, slurmctld and slurmd, wait for `srun`
#   deploy/slurm/local_cluster.sh down     stop them, cancel every job, remove what `up` wrote
#   deploy/slurm/local_cluster.sh status   exit 0 when the cluster answers (sinfo, squeue shown)
#
# Idempotent: `up` on a running cluster only checks it, `down` on a stopped one does nothing.
# The node is this host (`hostname -s`) with its CPUs (nproc) and 80 % of its available memory;
# SlurmUser=root, proctrack/linuxproc, task/none, select/cons_tres (no cgroups, no systemd).
# State and logs go to $SE_SLURM_DIR (default /tmp/survey-engine-slurm). slurm.conf is written
# to /etc/slurm/slurm.conf (where sbatch, squeue, srun look) unless a slurm.conf that this script
# did not write is there already: then the script refuses rather than replacing a site's file.
set -euo pipefail

STATE=${SE_SLURM_DIR:-/tmp/survey-engine-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by survey_engine deploy/slurm/local_cluster.sh"
WAIT_S=${SE_SLURM_WAIT:-60}

log() { echo "local_cluster.sh: $*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it starts munged, slurmctld and slurmd)"
    exit 1
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurm-wlm munge >/dev/null
}

answers() { timeout 5 sinfo -h >/dev/null 2>&1 && timeout 5 squeue -h >/dev/null 2>&1; }

# the process recorded in file $1 runs, and is $2 (default: the file's name up to the first dot);
# a zombie (e.g. under a pid 1 that never reaps) or a reused pid does not count
pid_alive() {
  local pid name=${2:-$(basename "${1%%.*}")}
  [ -f "$1" ] && pid=$(cat "$1") && [ -r "/proc/$pid/stat" ] \
    && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] \
    && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$pid/stat" 2>/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script: not replacing it"
    exit 1
  fi
  local host cpus mem_kb mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
  mem_mb=$((mem_kb * 8 / 10 / 1024))
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat >"$CONF" <<EOF
$MARK
ClusterName=survey-engine-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=5
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged
  echo munge >"$STATE/munged.ours"
}

up() {
  need_root
  install_packages
  if answers && [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
    log "already up"
  else
    write_conf
    start_munge
    if ! pid_alive "$STATE/slurmctld.run"; then
      # -c: no jobs or node states from an earlier cluster that was not taken down
      setsid slurmctld -D -c -i >>"$STATE/log/slurmctld.out" 2>&1 </dev/null &
      echo $! >"$STATE/slurmctld.run"
    fi
    if ! pid_alive "$STATE/slurmd.run"; then
      setsid slurmd -D -b >>"$STATE/log/slurmd.out" 2>&1 </dev/null &
      echo $! >"$STATE/slurmd.run"
    fi
  fi
  local t=0 host state
  host=$(hostname -s)
  while :; do
    state=$(timeout 5 sinfo -h -n "$host" -o %t 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle* | mix* | alloc*) timeout 30 srun -N1 -t 1 hostname >/dev/null 2>&1 && break ;;
      down* | drain* | fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    t=$((t + 1))
    if [ "$t" -ge "$WAIT_S" ]; then
      log "the cluster did not answer within ${WAIT_S}s (node state: ${state:-none}); logs in $STATE/log:"
      tail -n 5 "$STATE"/log/*.log >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "up: $(sinfo -h -o '%P %a %D %T %N %c CPUs %m MB' | head -n 1)"
}

down() {
  if [ ! -f "$CONF" ] || ! grep -qF "$MARK" "$CONF"; then
    log "not up (no $CONF written by this script)"
    return
  fi
  need_root
  if answers; then
    scancel --full --quiet -u root >/dev/null 2>&1 || true
    scancel --quiet --state=PENDING >/dev/null 2>&1 || true
  fi
  for d in slurmd slurmctld; do
    if pid_alive "$STATE/$d.run"; then
      kill "$(cat "$STATE/$d.run")" 2>/dev/null || true
      for _ in $(seq 20); do pid_alive "$STATE/$d.run" || break; sleep 0.5; done
      if pid_alive "$STATE/$d.run"; then kill -9 "$(cat "$STATE/$d.run")" 2>/dev/null || true; fi
    fi
  done
  if [ -f "$STATE/munged.ours" ] && pid_alive /run/munge/munged.pid munged; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  rm -f "$CONF"
  rm -rf "$STATE"
  log "down"
}

status() {
  if answers; then
    sinfo
    squeue
  else
    log "no SLURM cluster answers"
    return 1
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
