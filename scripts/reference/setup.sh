#!/usr/bin/env bash
# The reference environment: PyTorch + Hugging Face transformers + PEFT, in its own venv (.venv-reference in the
# repository root), apart from hvdtrain's TensorFlow venv. Only scripts/reference/ uses it: make_hf_fixtures.py
# (writes tests/fixtures/hf/) and check_export.py (checks an exported directory against transformers).
# hvdtrain's tests and CI never need it: the fixtures are committed.
#
# Idempotent: a package already installed is skipped, so a second run takes seconds.
#
#   PYTHON=python3          interpreter used to create the venv (Python 3.11)
#   VENV=.venv-reference    where to create it
#
# torch is pinned to 2.13.0: `pip install torch==2.13.0` takes the CPU build that lies on this machine's disk
# (find-links); plain `torch`, or a range that admits a newer release, would fetch a CUDA build of several GB.
# It is installed first and named again beside the other packages, so nothing can replace it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$here/.venv-reference}
TORCH_SPEC="torch==2.13.0"
# name as pip knows it | requirement
OTHERS=(
  "numpy|numpy"
  "safetensors|safetensors"
  "tokenizers|tokenizers"
  "transformers|transformers>=5,<6"
  "peft|peft"
)
log() { printf '[reference-setup] %s\n' "$*"; }
# pip, quiet, without the machine's notices about find-links folders it skips
pip_install() {
  "$py" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [ -x "$VENV/bin/python" ]; then
  log "venv exists: $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  log "creating venv $VENV with $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
py=$VENV/bin/python
# keep git away from the venv (1.2 GB) whatever the repository's .gitignore says, as Python 3.13's venv does itself
if [ ! -f "$VENV/.gitignore" ]; then
  log "writing $VENV/.gitignore (*)"
  printf '# created by scripts/reference/setup.sh\n*\n' > "$VENV/.gitignore"
fi

# the installed version of a distribution, or nothing
installed() {
  "$py" - "$1" <<'EOF'
import sys, importlib.metadata as m
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

have_torch=$(installed torch)
case "$have_torch" in
  2.13.0|2.13.0+cpu) log "torch $have_torch already installed: skipped" ;;
  "")
    log "installing $TORCH_SPEC (the CPU build on disk)"
    pip_install "$TORCH_SPEC"
    ;;
  *)
    log "torch $have_torch installed, want 2.13.0: reinstalling $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
    ;;
esac

todo=()
for entry in "${OTHERS[@]}"; do
  name=${entry%%|*}; req=${entry#*|}
  v=$(installed "$name")
  if [ -n "$v" ]; then
    log "$name $v already installed: skipped"
  else
    todo+=("$req")
  fi
done
if [ ${#todo[@]} -gt 0 ]; then
  log "installing: ${todo[*]} (with $TORCH_SPEC held)"
  pip_install "$TORCH_SPEC" "${todo[@]}"
fi

# what the venv holds now, and a check that the CPU build of torch is the one there
"$py" - <<'EOF'
import importlib.metadata as m
import torch
for d in ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "huggingface_hub"):
    try:
        print(f"[reference-setup]   {d}=={m.version(d)}")
    except m.PackageNotFoundError:
        print(f"[reference-setup]   {d}: missing")
assert torch.version.cuda is None, f"torch is a CUDA build ({torch.version.cuda}); expected the CPU build"
print(f"[reference-setup] torch CUDA: {torch.version.cuda} (CPU build)")
EOF
log "done: $(du -sh "$VENV" | cut -f1) in $VENV"
