#!/usr/bin/env bash
# A real Slurm 22.05 cluster on this one machine (Debian packages), for tests and for trying the
# slurm/ scripts without a cluster: slurmctld + two slurmd "nodes" (n1, n2) on localhost, no munge.
#
#   tools/local_slurm.sh install   apt-get the packages (root), then start
#   tools/local_slurm.sh start     (re)configure and start the daemons; waits until the nodes are idle
#   tools/local_slurm.sh stop      scontrol shutdown
#   tools/local_slurm.sh status    sinfo
#
# State, logs and spool live in $WELLREAD_SLURM_DIR (default /tmp/wellread-slurm).
set -euo pipefail
D=${WELLREAD_SLURM_DIR:-/tmp/wellread-slurm}
CPUS=$(nproc)
export DEBIAN_FRONTEND=noninteractive

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; }

install_packages() {
  if have_slurm; then return; fi
  if [ "$(id -u)" != 0 ]; then echo "local_slurm: installing Slurm needs root" >&2; exit 1; fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$D"/{state,log,run} /etc/slurm "$D/spool/n1" "$D/spool/n2"
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=wellread
SlurmctldHost=localhost
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
  # slurmd 22.05 always loads a cgroup plugin; v1 skips autodetection where no hierarchy is visible.
  echo "CgroupPlugin=cgroup/v1" > /etc/slurm/cgroup.conf
}

stop() {
  if [ -f /etc/slurm/slurm.conf ] && scontrol ping >/dev/null 2>&1; then scontrol shutdown >/dev/null 2>&1 || true; fi
  for pf in "$D"/run/*.pid; do [ -f "$pf" ] && kill "$(cat "$pf")" 2>/dev/null || true; done
  for _ in $(seq 40); do
    alive=0
    for pf in "$D"/run/*.pid; do [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.25
  done
}

start() {
  have_slurm || { echo "local_slurm: Slurm is not installed (run: tools/local_slurm.sh install, as root)" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "local_slurm: starting the daemons needs root" >&2; exit 1; }
  stop
  rm -rf "$D/state" "$D/spool" "$D/run"
  write_conf
  slurmctld
  slurmd -N n1
  slurmd -N n2
  for _ in $(seq 120); do
    [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" = idle ] && break; sleep 0.25
  done
  if [ "$(sinfo -h -o '%T' | sort -u)" != idle ]; then tail -n 30 "$D"/log/*.log >&2; exit 1; fi
  sinfo -N -o '%N %T %c'
}

case "${1:-start}" in
  install) install_packages; start ;;
  start) start ;;
  stop) stop ;;
  status) sinfo -N -o '%N %T %c' ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
