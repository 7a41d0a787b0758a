#!/usr/bin/env bash
# One install path for everyone: `make demo`, `make test`, CI and the Docker images all run this.
# Idempotent: each step checks whether it is already done, so a second run takes seconds.
#
#   VENV=.venv             where to create the virtual environment ("system" installs into the current Python)
#   HVDTRAIN_GPU=1         GPU flavour: tensorflow instead of tensorflow-cpu, Horovod with NCCL operations
#   HVDTRAIN_EXTRAS=s3,ray the package's optional extras (object storage, Ray); `make test` installs both
#   HVDTRAIN_TEST_SERVERS=1  the Debian packages of the servers the tests start: Ceph's S3 gateway, Slurm
#   PYTHON=python3.11      interpreter used to create the venv
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
HVDTRAIN_GPU=${HVDTRAIN_GPU:-0}
HOROVOD_VERSION=0.28.1
log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: compilers and cmake for the Horovod build, OpenMPI for mpirun and Horovod's MPI controller.
# strace: the test that only rank 0 writes files traces what each rank opens for writing.
# iproute2, openssh-server: the multi-host test runs two "hosts" in network namespaces, each with its own sshd.
debs=(build-essential cmake openmpi-bin libopenmpi-dev openssh-client strace iproute2 openssh-server)
# The real servers of the tests (scripts/s3_server.sh, scripts/slurm_cluster.sh): ~70 MB, for `make test` only.
if [ "${HVDTRAIN_TEST_SERVERS:-0}" = 1 ]; then
  debs+=(ceph-mon ceph-osd radosgw slurmctld slurmd slurm-client munge)
fi
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# 2. Python environment.
if [ "$VENV" = system ]; then
  py=$PYTHON
else
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  py=$VENV/bin/python
fi
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "hvdtrain needs Python 3.11, found %s" % sys.version.split()[0]'

reqs=$here/requirements.txt
if [ "$HVDTRAIN_GPU" = 1 ]; then
  reqs=$(mktemp); sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' "$here/requirements.txt" > "$reqs"
fi
extras=${HVDTRAIN_EXTRAS:-}
stamp=$("$py" -c 'import sys; print(sys.prefix)')/.hvdtrain-reqs
want=$( (cat "$reqs" "$here/setup.cfg" "$here/pyproject.toml"; echo "extras=$extras") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages${extras:+ (extras: $extras)}"
  "$py" -m pip install -q --upgrade pip 'setuptools<70' wheel
  "$py" -m pip install -q -r "$reqs"
  "$py" -m pip install -q --no-deps -e "$here"
  if [ -n "$extras" ]; then
    # the extras' own requirements, pinned in setup.cfg, with TensorFlow's protobuf kept as it is
    "$py" -m pip install -q -e "${here}[$extras]" "protobuf<5"
  fi
  echo "$want" > "$stamp"
fi

# 3. Horovod, compiled against the TensorFlow above (needs no build isolation to see it).
if ! "$py" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'; h.init" 2>/dev/null \
   || ! "$py" -c "import horovod.tensorflow as h; import sys; sys.exit(0 if h.mpi_built() and h.gloo_built() else 1)" 2>/dev/null; then
  log "installing Horovod $HOROVOD_VERSION (built from source once: 2-3 minutes on 2 cores)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  # Debian's cmake 3.x: PyPI's cmake 4 fails Horovod's `cmake --version` check.
  export PATH=/usr/bin:$PATH
  if [ "$HVDTRAIN_GPU" = 1 ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  # Our own wheel cache, keyed by the TF version and flavour: pip's cache is keyed by Horovod's version only,
  # and a wheel built against another TF raises HorovodVersionMismatchError at import.
  tfver=$("$py" -c 'import tensorflow as tf; print(tf.__version__)')
  wheels=${HVDTRAIN_WHEEL_CACHE:-$HOME/.cache/hvdtrain}/horovod-$HOROVOD_VERSION-tf$tfver-gpu$HVDTRAIN_GPU
  if ! ls "$wheels"/horovod-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheels.tmp"
    "$py" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$wheels.tmp" "horovod==$HOROVOD_VERSION"
    rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
  else
    log "using the Horovod wheel built earlier in $wheels"
  fi
  "$py" -m pip uninstall -q -y horovod 2>/dev/null || true
  "$py" -m pip install -q --no-deps "$wheels"/horovod-*.whl
fi
log "ready: $("$py" -c 'import tensorflow as tf, horovod; print("tensorflow", tf.__version__, "horovod", horovod.__version__)' 2>/dev/null)"
