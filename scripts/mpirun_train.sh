#!/usr/bin/env bash
# Launch `hvdtrain train` with OpenMPI's mpirun (Horovod's MPI controller). All arguments go to `hvdtrain train`.
#
#   NP=8 HOSTS=node1:4,node2:4 scripts/mpirun_train.sh --recipe imagenet-resnet50 --set data.path=/data --output runs/r50
#
# Environment (all optional): NP (default 2), HOSTS (default localhost:$NP), NETWORK_INTERFACE (TCP interface for
# MPI and NCCL), BIND (process binding: none | core | socket; default none, which suits TensorFlow's own thread
# pools), DRY_RUN=1 to print the command.
# As root mpirun refuses to start unless told; when ranks outnumber cores it needs --oversubscribe. Both are
# added when they apply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${VENV:-$here/.venv}/bin
HVDTRAIN=${HVDTRAIN:-$bin/hvdtrain}
[ -x "$HVDTRAIN" ] || HVDTRAIN=hvdtrain
NP=${NP:-2}
HOSTS=${HOSTS:-localhost:$NP}

cmd=(mpirun -np "$NP" -H "$HOSTS" --bind-to "${BIND:-none}" --map-by slot
     -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x TF_CPP_MIN_LOG_LEVEL
     -mca pml ob1 -mca btl ^openib)
# Forward every Horovod and NCCL setting of this shell to the ranks.
while IFS='=' read -r name _; do
  case "$name" in HOROVOD_*|NCCL_*) cmd+=(-x "$name") ;; esac
done < <(env)
if [ "$(id -u)" = 0 ]; then
  cmd+=(--allow-run-as-root)
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
local_slots=0
IFS=, read -ra entries <<< "$HOSTS"
for entry in "${entries[@]}"; do
  case "${entry%%:*}" in localhost|127.0.0.1|"$(hostname)") local_slots=$((local_slots + ${entry##*:})) ;; esac
done
if [ "$local_slots" -gt "$(nproc)" ]; then cmd+=(--oversubscribe); fi
if [ -n "${NETWORK_INTERFACE:-}" ]; then
  cmd+=(-mca btl_tcp_if_include "$NETWORK_INTERFACE" -mca oob_tcp_if_include "$NETWORK_INTERFACE"
        -x NCCL_SOCKET_IFNAME="$NETWORK_INTERFACE")
fi
cmd+=("$HVDTRAIN" train "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${cmd[@]}"
