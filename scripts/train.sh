#!/usr/bin/env bash
# Launch `hvdtrain train` on every rank with horovodrun. All arguments go to `hvdtrain train`.
#
#   NP=4 HOSTS=node1:2,node2:2 scripts/train.sh --recipe digits-cnn --output runs/x
#
# Environment (all optional):
#   NP                 number of ranks (default: the slots in HOSTS or HOSTFILE, else 2)
#   HOSTS              host:slots list, e.g. "node1:4,node2:4" (default localhost:$NP)
#   HOSTFILE           a file of "host slots=N" lines, used instead of HOSTS
#   NETWORK_INTERFACE  the interface ranks talk over, e.g. eth0 (default: Horovod's choice)
#   CONTROLLER         auto, gloo or mpi (default auto: mpi where OpenMPI's mpirun is installed, as
#                      scripts/setup.sh installs it, else gloo). Horovod's MPI controller runs a small dependent
#                      collective 10-40x faster than its Gloo one (docs/performance.md), which sets the step time of
#                      layouts that chain collectives (tensor parallelism, sharded parameters); mpi needs OpenMPI on
#                      every host
#   SSH_PORT, SSH_IDENTITY_FILE   for hosts reached over ssh
#   DRY_RUN=1          print the command instead of running it
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${VENV:-$here/.venv}/bin
HOROVODRUN=${HOROVODRUN:-$bin/horovodrun}
HVDTRAIN=${HVDTRAIN:-$bin/hvdtrain}
[ -x "$HOROVODRUN" ] || HOROVODRUN=horovodrun
[ -x "$HVDTRAIN" ] || HVDTRAIN=hvdtrain

slots_in_hosts() { # "a:2,b:3" -> 5
  local total=0 entry
  IFS=, read -ra entries <<< "$1"
  for entry in "${entries[@]}"; do total=$((total + ${entry##*:})); done
  echo "$total"
}

cmd=("$HOROVODRUN")
if [ -n "${HOSTFILE:-}" ]; then
  NP=${NP:-$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); s += a[2]}} END {print s + 0}' "$HOSTFILE")}
  cmd+=(-np "$NP" -hostfile "$HOSTFILE")
else
  if [ -n "${HOSTS:-}" ]; then NP=${NP:-$(slots_in_hosts "$HOSTS")}; else NP=${NP:-2}; fi
  cmd+=(-np "$NP" -H "${HOSTS:-localhost:$NP}")
fi
controller=${CONTROLLER:-auto}
if [ "$controller" = auto ]; then
  if command -v mpirun > /dev/null; then controller=mpi; else controller=gloo; fi
fi
case "$controller" in
  gloo) cmd+=(--gloo) ;;
  # ranks waiting on a peer yield their core instead of spinning (more ranks than cores: 90 -> 2 ms per allreduce)
  mpi) cmd+=(--mpi "--mpi-args=--mca mpi_yield_when_idle 1") ;;
  *) echo "train.sh: CONTROLLER must be auto, gloo or mpi, got '$controller'" >&2; exit 2 ;;
esac
[ -n "${NETWORK_INTERFACE:-}" ] && cmd+=(--network-interface "$NETWORK_INTERFACE")
[ -n "${SSH_PORT:-}" ] && cmd+=(-p "$SSH_PORT")
[ -n "${SSH_IDENTITY_FILE:-}" ] && cmd+=(--ssh-identity-file "$SSH_IDENTITY_FILE")
cmd+=("$HVDTRAIN" train "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${cmd[@]}"
