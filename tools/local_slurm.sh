#!/usr/bin/env bash
# A private Slurm 22.05 cluster on this one machine (Debian packages), for the Slurm tests and for trying
# slurm/ without a cluster: slurmctld + two slurmd "nodes" (n1, n2) on localhost, no munge.
#
#   tools/local_slurm.sh install   apt-get the packages (root), then start
#   tools/local_slurm.sh start     (re)start our daemons; waits until the nodes are idle (root)
#   tools/local_slurm.sh stop      stop the daemons this script started (and nothing else)
#   tools/local_slurm.sh status    sinfo of our cluster
#   tools/local_slurm.sh env       print `export SLURM_CONF=...` (eval it to use sbatch/sinfo by hand)
#
# Everything lives in $WELLREAD_SLURM_DIR (default /tmp/wellread-slurm): etc/slurm.conf (SLURM_CONF points
# there; the daemons get it with -f), state, spool, logs and pid files.  Nothing outside it is written.
# It is safe to run on a real cluster's node: `start` refuses, changing nothing, when a slurmctld it did not
# start is running, when a system slurm.conf exists ($WELLREAD_SLURM_SYSTEM_CONFS, default
# /etc/slurm/slurm.conf /etc/slurm-llnl/slurm.conf), or when SLURM_CONF names another file; `stop` signals
# only the pids in its own pid files whose command line names its own config.
set -euo pipefail
D=${WELLREAD_SLURM_DIR:-/tmp/wellread-slurm}
CONF=$D/etc/slurm.conf
SYSTEM_CONFS=${WELLREAD_SLURM_SYSTEM_CONFS:-/etc/slurm/slurm.conf /etc/slurm-llnl/slurm.conf}
CPUS=$(nproc)
export DEBIAN_FRONTEND=noninteractive

die() { echo "local_slurm: $*" >&2; exit 1; }
have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; }

install_packages() {
  if have_slurm; then return; fi
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# Pids of daemons we started: from our pid files, and only while that process still runs our config.
our_pids() {
  local pf pid
  for pf in "$D"/run/*.pid; do
    [ -f "$pf" ] || continue
    pid=$(cat "$pf" 2>/dev/null) || continue
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "-f $CONF"; then
      echo "$pid"
    fi
  done
}

# Refuse (exit 1, nothing changed) if anything here belongs to a Slurm installation we did not set up.
check_foreign() {
  local f pid ours
  for f in $SYSTEM_CONFS; do
    [ -e "$f" ] && die "refusing to start: $f exists (a Slurm installation this script did not set up;" \
      "it may be a real cluster's node). Nothing was changed."
  done
  if [ -n "${SLURM_CONF:-}" ] && [ "$SLURM_CONF" != "$CONF" ]; then
    die "refusing to start: SLURM_CONF=$SLURM_CONF is not this script's config ($CONF). Nothing was changed."
  fi
  ours=" $(our_pids | tr '\n' ' ') "
  for pid in $(pgrep -x slurmctld || true); do
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*|"") continue ;; esac  # a daemonizing parent's zombie
    case "$ours" in *" $pid "*) ;; *)
      die "refusing to start: slurmctld pid $pid is running and was not started by this script" \
        "(a real cluster's controller?). Nothing was changed." ;;
    esac
  done
  if [ -e "$D" ] && [ "$(stat -c %u "$D")" != "$(id -u)" ]; then
    die "refusing to start: $D belongs to another user"
  fi
}

write_conf() {
  mkdir -p -m 0755 "$D"
  mkdir -p "$D"/{etc,state,log,run} "$D/spool/n1" "$D/spool/n2"
  cat > "$CONF.tmp" <<EOF
# Written by wellread tools/local_slurm.sh: a private one-machine test cluster (see that script).
ClusterName=wellread
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
MinJobAge=3600
DependencyParameters=kill_invalid_depend
KillWait=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  mv "$CONF.tmp" "$CONF"
  # slurmd 22.05 always loads a cgroup plugin (read from the config's directory); v1 skips autodetection
  # where no cgroup hierarchy is visible.
  echo "CgroupPlugin=cgroup/v1" > "$D/etc/cgroup.conf"
}

stop() {
  local pids pid alive
  pids=$(our_pids)
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 60); do
    alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.25
  done
  [ $alive = 0 ] || die "daemons $pids did not stop"
  rm -f "$D"/run/*.pid
}

start() {
  check_foreign
  have_slurm || die "Slurm is not installed (run: tools/local_slurm.sh install, as root)"
  [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
  stop
  rm -rf "$D/state" "$D/spool" "$D/run"
  write_conf
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N n1
  slurmd -f "$CONF" -N n2
  for _ in $(seq 120); do
    [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" = idle ] && break; sleep 0.25
  done
  if [ "$(sinfo -h -o '%T' | sort -u)" != idle ]; then tail -n 30 "$D"/log/*.log >&2; exit 1; fi
  sinfo -N -o '%N %T %c'
  echo "local_slurm: up; to use it by hand: export SLURM_CONF=$CONF"
}

case "${1:-start}" in
  install) check_foreign; install_packages; start ;;
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo -N -o '%N %T %c' ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
