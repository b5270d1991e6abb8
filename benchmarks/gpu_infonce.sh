#!/usr/bin/env bash
# Fused InfoNCE on a GPU: correctness vs float64 (fp32 IEEE/TF32, fp16, bf16), then the benchmark grid.
# One process writes benchmarks/results/infonce_<gpu>.{json,md} (copied to $OUT when set); about 5 minutes
# on an H100. Extra arguments go to bench_infonce.py (e.g. --budget 120). Exit status 1 if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -c "import nerco_dist.kernels" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
python benchmarks/bench_infonce.py "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/infonce_* "$OUT"/ 2>/dev/null || true; fi
exit $status
