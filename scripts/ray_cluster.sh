#!/usr/bin/env bash
# A Ray cluster of two nodes on this machine, for trying `hvdtrain train --ray` and for the tests: a head node on
# 127.0.0.1 and a second node on 127.0.0.2 (both loopback), each with CPUS slots, usage statistics and token
# authentication off. Two node addresses, because Horovod's elastic mode blacklists a failed worker's whole host:
# with two "hosts" a job can lose the workers of one and go on with the other. Workers run at normal priority
# (RAY_worker_niceness=0): at Ray's default of nice 15 any other busy process on the machine starves them.
#
#   scripts/ray_cluster.sh start DIR [PORT] [CPUS]   start it (state and logs in DIR); prints the address
#   scripts/ray_cluster.sh stop DIR                  stop it
set -euo pipefail

cmd=${1:?usage: ray_cluster.sh start|stop DIR [PORT] [CPUS]}
dir=${2:?usage: ray_cluster.sh start|stop DIR [PORT] [CPUS]}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ray=${RAY:-${VENV:-$here/.venv}/bin/ray}
[ -x "$ray" ] || ray=ray
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_worker_niceness=${RAY_worker_niceness:-0}
mkdir -p "$dir"

case "$cmd" in
  start)
    port=${3:-6390}
    cpus=${4:-1}
    "$ray" start --head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="$cpus" --include-dashboard=false \
      --disable-usage-stats --temp-dir="$dir/ray" > "$dir/head.log" 2>&1
    "$ray" start --address="127.0.0.1:$port" --node-ip-address=127.0.0.2 --num-cpus="$cpus" \
      --disable-usage-stats > "$dir/node.log" 2>&1
    echo "127.0.0.1:$port" > "$dir/address"
    echo "127.0.0.1:$port"
    ;;
  stop)
    "$ray" stop --force > "$dir/stop.log" 2>&1 || true
    ;;
  *) echo "ray_cluster.sh: unknown command '$cmd': use start or stop" >&2; exit 2 ;;
esac
