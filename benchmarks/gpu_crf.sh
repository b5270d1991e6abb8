#!/usr/bin/env bash
# CRF timings on a CUDA machine: the Triton kernels vs the torch path (and pytorch-crf when installed),
# about a minute on an H100 (estimated). Extra arguments go to bench_crf.py (e.g. --budget 120); see
# gpu_bench.sh.
exec bash "$(dirname "$0")/gpu_bench.sh" crf "$@"
