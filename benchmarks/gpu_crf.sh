#!/usr/bin/env bash
# The Triton CRF on a CUDA machine: correctness against pytorch-crf in float64 (fp32/fp16/bf16 emissions,
# 4096 steps, 128 tags, BIO constraints), then the benchmark. Results: benchmarks/results/crf_{check_,}<gpu>.*
# (also copied to $OUT when set). Extra arguments go to bench_crf.py, e.g. --no-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -c "import nerco_dist.kernels.crf" 2>/dev/null || pip install --no-deps --no-build-isolation -q -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
python benchmarks/bench_crf.py --device cuda --check "$@" || status=$?
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/crf_* "$OUT"/ 2>/dev/null || true
fi
exit $status
