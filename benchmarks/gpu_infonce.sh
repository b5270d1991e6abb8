#!/usr/bin/env bash
# Fused InfoNCE timings on a CUDA machine: the kernel vs the torch paths over the grid, several minutes on
# an H100 (estimated). Extra arguments go to bench_infonce.py (e.g. --budget 240: skip the cases left after
# 240 s); see gpu_bench.sh.
exec bash "$(dirname "$0")/gpu_bench.sh" infonce "$@"
