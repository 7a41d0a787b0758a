#!/usr/bin/env bash
# Run the scaling benchmark (it launches horovodrun itself for each rank count), then the comparison with the
# canonical Horovod + Keras loop; results in $OUT (default runs/benchmark). Extra arguments go to both.
#
#   NPS=1,2 MODEL_RECIPE=synthetic-resnet-small scripts/benchmark.sh --repeats 5
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${VENV:-$here/.venv}/bin
HVDTRAIN=${HVDTRAIN:-$bin/hvdtrain}
[ -x "$HVDTRAIN" ] || HVDTRAIN=hvdtrain
OUT=${OUT:-runs/benchmark}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

"$HVDTRAIN" benchmark --recipe "${MODEL_RECIPE:-synthetic-resnet-small}" --np "${NPS:-1,2}" --output "$OUT/scaling" "$@"
"$HVDTRAIN" benchmark --compare-baseline --recipe digits-cnn --np "${COMPARE_NP:-2}" --output "$OUT/compare" "$@"
