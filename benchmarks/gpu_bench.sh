#!/usr/bin/env bash
# One kernel benchmark on a CUDA machine: gpu_bench.sh crf|infonce [arguments for bench_<name>.py].
# Writes <name>_<gpu>.json row by row into $OUT when set (so a timeout keeps what was measured), else into
# benchmarks/results/. Correctness is checked by the GPU tests, not here.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
unset TRITON_INTERPRET
python3 -c "import nerco_dist.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 "benchmarks/bench_$name.py" --device cuda --out "${OUT:-benchmarks/results}" "$@"
