#!/usr/bin/env bash
# Training throughput on one GPU: tokens/s and peak memory for stage 1 and stage 2 (FLAT, and FLAT + a
# BERT-base-shaped encoder with random weights), then one full MSRA stage-2 epoch with the BERT-base-shaped
# encoder (target <= 60 s on an H100). Needs the corpora under $NERCO_DATA_ROOT (msra/, vocab/) and
# DeepSpeed. Extra arguments go to bench_train.py (e.g. --epoch-batch 256 --ds zero2); see gpu_bench.sh.
# Exit status 1 if the epoch misses the target.
export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-../shared/data}
unset DS_ACCELERATOR
exec bash "$(dirname "$0")/gpu_bench.sh" train "$@"
