#!/usr/bin/env bash
# Every GPU check and benchmark in one device call (each has its own time limit; all results are copied to
# $OUT). Prepare on the CPU machine first (see benchmarks/README.md): wheels the GPU image lacks in .whl/,
# and the corpora the training benchmark reads in .gpu-data/ (both git-ignored, passed with the device
# tool's `carry`).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-$PWD/.gpu-data}
status=0
timeout 200 bash benchmarks/gpu_crf.sh || status=1
timeout 300 bash benchmarks/gpu_infonce.sh --budget 240 || status=1
timeout 330 bash benchmarks/gpu_train.sh || status=1
exit $status
