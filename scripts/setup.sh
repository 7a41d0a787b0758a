#!/usr/bin/env bash
# One install path for everyone: `make demo`, `make test`, CI and the Docker images all run this.
# Idempotent: each step checks whether it is already done, so a second run takes seconds.
#
#   VENV=.venv             where to create the virtual environment ("system" installs into the current Python);
#                          default .venv, or .venv-tf2.15 for HVDTRAIN_STACK=tf2.15
#   HVDTRAIN_GPU=1         GPU flavour: tensorflow instead of tensorflow-cpu, Horovod with NCCL operations
#   HVDTRAIN_EXTRAS=ray,hdfs the package's optional extras (Ray; tensorflow-io for hdfs://); `make test` installs ray
#   HVDTRAIN_TEST_SERVERS=1  the Debian packages of the servers the tests start: Ceph's S3 gateway, Slurm
#   PYTHON=python3.11      interpreter used to create the venv
#   HVDTRAIN_STACK=tf2.15  the second stack: TensorFlow 2.15.1 with its Keras 2.15, Horovod unchanged (Python 3.11);
#                          default (current): TensorFlow 2.21 with tf-keras (Keras 2), Horovod 0.28.1 patched
#                          (scripts/patches; Python 3.11-3.13)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
HVDTRAIN_GPU=${HVDTRAIN_GPU:-0}
HVDTRAIN_STACK=${HVDTRAIN_STACK:-current}
HOROVOD_VERSION=0.28.1
case "$HVDTRAIN_STACK" in
  current) VENV=${VENV:-$here/.venv}; reqs_file=$here/requirements.txt ;;
  tf2.15) VENV=${VENV:-$here/.venv-tf2.15}; reqs_file=$here/requirements-tf2.15.txt ;;
  *) echo "HVDTRAIN_STACK must be current (the default) or tf2.15" >&2; exit 2;;
esac
log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: compilers and cmake for the Horovod build, OpenMPI for mpirun and Horovod's MPI controller.
# strace: the test that only rank 0 writes files traces what each rank opens for writing.
# iproute2, openssh-server: the multi-host test runs two "hosts" in network namespaces, each with its own sshd.
# patch: applies scripts/patches/ to Horovod's source on the current stack.
debs=(build-essential cmake openmpi-bin libopenmpi-dev openssh-client strace iproute2 openssh-server patch)
# The real servers of the tests (scripts/s3_server.sh, scripts/slurm_cluster.sh): ~70 MB, for `make test` only
# (python3-rados: s3_server.sh sends its monitor commands through librados).
if [ "${HVDTRAIN_TEST_SERVERS:-0}" = 1 ]; then
  debs+=(ceph-mon ceph-osd radosgw python3-rados slurmctld slurmd slurm-client munge)
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
  # a venv made for the other stack (before TensorFlow 2.21 became the default, .venv held TensorFlow 2.15): made
  # again, rather than upgraded in place under a Horovod built for the other TensorFlow
  want_tf=$(sed -n 's/^tensorflow-cpu==\([0-9.]*\).*/\1/p' "$reqs_file")
  have_tf=$("$VENV/bin/python" -c 'import importlib.metadata as m
for name in ("tensorflow-cpu", "tensorflow"):
    try:
        print(m.version(name)); break
    except m.PackageNotFoundError:
        pass' 2>/dev/null || true)
  if [ -n "$have_tf" ] && [ "$have_tf" != "$want_tf" ] && [ -f "$VENV/pyvenv.cfg" ]; then
    log "$VENV has TensorFlow $have_tf, the $HVDTRAIN_STACK stack needs $want_tf: making it again"
    rm -rf "$VENV"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  py=$VENV/bin/python
fi
if [ "$HVDTRAIN_STACK" = current ]; then
  "$py" -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), "the default stack needs Python 3.11-3.13, found %s" % sys.version.split()[0]'
  export TF_USE_LEGACY_KERAS=1
else
  "$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the tf2.15 stack needs Python 3.11, found %s (the default stack takes 3.11-3.13)" % sys.version.split()[0]'
fi

reqs=$reqs_file
if [ "$HVDTRAIN_GPU" = 1 ]; then
  reqs=$(mktemp); sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' "$reqs_file" > "$reqs"
fi
extras=${HVDTRAIN_EXTRAS:-}
if [ "$HVDTRAIN_STACK" = current ] && [ -n "$extras" ]; then
  # tensorflow-io (hdfs) has no release past TensorFlow 2.16
  kept=$(echo "$extras" | tr ',' '\n' | grep -vx hdfs | paste -sd, - || true)
  [ "$kept" != "$extras" ] && log "the current stack has no hdfs extra (tensorflow-io stops at TensorFlow 2.16)"
  extras=$kept
fi
nodeps=""
[ "$HVDTRAIN_STACK" = current ] && nodeps=$here/requirements-nodeps.txt
stamp=$("$py" -c 'import sys; print(sys.prefix)')/.hvdtrain-reqs
want=$( (cat "$reqs" ${nodeps:+"$nodeps"} "$here/setup.cfg" "$here/pyproject.toml"; echo "extras=$extras") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages${extras:+ (extras: $extras)}"
  "$py" -m pip install -q --upgrade pip 'setuptools<70' wheel
  "$py" -m pip install -q -r "$reqs"
  if [ -n "$nodeps" ]; then "$py" -m pip install -q --no-deps -r "$nodeps"; fi
  "$py" -m pip install -q --no-deps -e "$here"
  if [ -n "$extras" ]; then
    # the extras' own requirements as setup.cfg pins them, with TensorFlow's protobuf kept as it is (not through
    # `pip install .[extras]`, which would resolve tf-keras' `tensorflow` over `tensorflow-cpu` on the current stack)
    protobuf=$("$py" -c 'import google.protobuf as p; print(p.__version__)')
    mapfile -t extra_reqs < <("$py" - "$here/setup.cfg" "$extras" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser(interpolation=None)
cfg.read(sys.argv[1])
for name in sys.argv[2].split(","):
    for line in cfg["options.extras_require"].get(name, "").splitlines():
        if line.strip():
            print(line.strip())
PY
)
    "$py" -m pip install -q "${extra_reqs[@]}" "protobuf==$protobuf"
  fi
  echo "$want" > "$stamp"
fi

# 3. Horovod, compiled against the TensorFlow above (needs no build isolation to see it); on the current stack
# with our patches (each says why at its top), built again when they change.
patches=""
[ "$HVDTRAIN_STACK" = current ] && patches=$(cat "$here"/scripts/patches/*.patch | sha256sum | cut -c1-8)
horovod_stamp=$("$py" -c 'import sys; print(sys.prefix)')/.hvdtrain-horovod-patches
if [ "$(cat "$horovod_stamp" 2>/dev/null)" != "$patches" ] \
   || ! "$py" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'; h.init" 2>/dev/null \
   || ! "$py" -c "import horovod.tensorflow as h; import sys; sys.exit(0 if h.mpi_built() and h.gloo_built() else 1)" 2>/dev/null; then
  log "installing Horovod $HOROVOD_VERSION (built from source once: 3-6 minutes on 2 cores)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  # Debian's cmake 3.x: PyPI's cmake 4 fails Horovod's `cmake --version` check.
  export PATH=/usr/bin:$PATH
  if [ "$HVDTRAIN_GPU" = 1 ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  # Our own wheel cache, keyed by the TF version and flavour: pip's cache is keyed by Horovod's version only,
  # and a wheel built against another TF raises HorovodVersionMismatchError at import.
  tfver=$("$py" -c 'import tensorflow as tf; print(tf.__version__)')
  wheels=${HVDTRAIN_WHEEL_CACHE:-$HOME/.cache/hvdtrain}/horovod-$HOROVOD_VERSION-tf$tfver-gpu$HVDTRAIN_GPU
  source="horovod==$HOROVOD_VERSION"
  wheels=$wheels${patches:+-patches$patches}  # the wheel keyed by the patches too
  if ! ls "$wheels"/horovod-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheels.tmp"
    if [ "$HVDTRAIN_STACK" = current ]; then
      src=$(mktemp -d)
      "$py" -m pip download -q --no-deps --no-binary :all: -d "$src" "horovod==$HOROVOD_VERSION"
      tar xzf "$src"/horovod-"$HOROVOD_VERSION".tar.gz -C "$src"
      source=$src/horovod-$HOROVOD_VERSION
      for patch in "$here"/scripts/patches/*.patch; do
        log "patching Horovod: $(basename "$patch")"
        patch -s -p1 -d "$source" < "$patch"
      done
    fi
    "$py" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$wheels.tmp" "$source"
    rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
  else
    log "using the Horovod wheel built earlier in $wheels"
  fi
  "$py" -m pip uninstall -q -y horovod 2>/dev/null || true
  "$py" -m pip install -q --no-deps "$wheels"/horovod-*.whl
  echo "$patches" > "$horovod_stamp"
fi
log "ready: $("$py" -c 'import tensorflow as tf, horovod; print("tensorflow", tf.__version__, "horovod", horovod.__version__)' 2>/dev/null)"
