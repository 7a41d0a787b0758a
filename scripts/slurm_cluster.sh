#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the tests and for trying the batch script: munged,
# slurmctld and slurmd started by hand (no systemd), with their config, state, logs and munge socket in DIR,
# on the given ports. Debian 12 packages: slurmctld slurmd slurm-client munge.
#
#   scripts/slurm_cluster.sh start DIR [PORT] [CPUS]   start it; prints the SLURM_CONF to export
#   scripts/slurm_cluster.sh stop DIR                  cancel its jobs and stop its daemons
#
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf. The controller listens on PORT, slurmd on PORT+1.
set -euo pipefail

cmd=${1:?usage: slurm_cluster.sh start|stop DIR [PORT] [CPUS]}
dir=${2:?usage: slurm_cluster.sh start|stop DIR [PORT] [CPUS]}
log() { printf '[slurm_cluster] %s\n' "$*" >&2; }

stop() {
  if [ -f "$dir/slurm.conf" ]; then
    SLURM_CONF=$dir/slurm.conf scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

case "$cmd" in
  stop) stop; log "stopped ($dir)"; exit 0 ;;
  start) ;;
  *) log "unknown command '$cmd': use start or stop"; exit 2 ;;
esac
for tool in munged mungekey slurmctld slurmd sbatch sinfo; do
  command -v "$tool" >/dev/null || { log "$tool is missing: apt-get install slurmctld slurmd slurm-client munge"; exit 1; }
done
port=${3:-6817}
cpus=${4:-2}
node=$(hostname -s)
mkdir -p "$dir"/{munge,state,spool,log}
chmod 755 "$dir" "$dir/munge"

mungekey -c -k "$dir/munge/munge.key" -f >/dev/null 2>&1
munged -F --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
  --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/seed" --log-file="$dir/log/munged.log" \
  > "$dir/log/munged.out" 2>&1 &
echo $! > "$dir/munged.pid"

cat > "$dir/slurm.conf" <<EOF
ClusterName=hvdtrain
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid.slurm
SlurmdPidFile=$dir/slurmd.pid.slurm
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName=$node CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
for _ in $(seq 50); do [ -S "$dir/munge/munge.socket.2" ] && break; sleep 0.1; done
if [ ! -S "$dir/munge/munge.socket.2" ]; then
  log "munged did not start: $(tail -n 1 "$dir/log/munged.out") (every directory above DIR must be traversable)"
  stop
  exit 1
fi

slurmctld -D -f "$dir/slurm.conf" > "$dir/log/slurmctld.out" 2>&1 &
echo $! > "$dir/slurmctld.pid"
slurmd -D -f "$dir/slurm.conf" > "$dir/log/slurmd.out" 2>&1 &
echo $! > "$dir/slurmd.pid"
export SLURM_CONF=$dir/slurm.conf
for _ in $(seq 100); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
  case "$state" in idle*|mix*|alloc*) break ;; esac
  sleep 0.2
done
case "$(sinfo -h -o %t 2>/dev/null | head -1)" in
  idle*|mix*|alloc*) ;;
  *) log "the node did not come up; see $dir/log"; stop; exit 1 ;;
esac
echo "export SLURM_CONF=$dir/slurm.conf"
log "ready: node $node idle, $cpus CPUs"
