#!/usr/bin/env bash
# CPU mode: N ranks (default 2) on this machine, gloo, fp32 — what the tests run. No GPU needed.
#   launch/cpu.sh configs/tiny.yaml --set distributed.config=configs/ds/zero2.json
#   RANKS=4 launch/cpu.sh configs/tiny.yaml --set distributed.config=configs/ds/zero3.json
# OMP_NUM_THREADS=1 keeps the ranks from fighting over cores; set it to cores / ranks on a bigger machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "${RANKS:-2}" --master_port "${MASTER_PORT:-29500}" --module nerco_dist.cli train "$@"
