#!/usr/bin/env bash
# CPU mode: N ranks (default 2) on this machine, gloo, fp32 — what the tests run. No GPU needed.
#   launch/cpu.sh configs/tiny.yaml --set distributed.config=configs/ds/zero2.json
#   RANKS=4 launch/cpu.sh configs/tiny.yaml --set distributed.config=configs/ds/zero3.json
# Each rank's torch threads come from run.threads (auto: the free cores shared by this node's ranks);
# OMP_NUM_THREADS=1 only keeps DeepSpeed's own start-up from spawning a thread per core in every rank.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m nerco_dist.launcher --num_gpus "${RANKS:-2}" --master_port "${MASTER_PORT:-29500}" --module nerco_dist.cli train "$@"
