#!/usr/bin/env bash
# Training throughput on one GPU: tokens/s and peak memory for stage 1 and stage 2 (FLAT, and FLAT + a
# BERT-base-shaped encoder with random weights), then one full MSRA stage-2 epoch with the BERT-base-shaped
# encoder (target <= 60 s on an H100). Writes benchmarks/results/train_<gpu>.json (copied to $OUT when set).
# About 5 minutes on an H100 (MSRA is read and encoded on the CPU first, ~15 s). Needs the corpora under
# $NERCO_DATA_ROOT (msra/, vocab/). Extra arguments go to bench_train.py (e.g. --epoch-batch 256 --ds
# configs/ds/zero2.json). Exit status 1 if the epoch misses the target.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET DS_ACCELERATOR
python -c "import nerco_dist.kernels" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-../shared/data}
status=0
python benchmarks/bench_train.py "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/train_* "$OUT"/ 2>/dev/null || true; fi
exit $status
