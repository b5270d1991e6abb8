#!/usr/bin/env bash
# One node, N GPUs (default: all of them):
#   launch/single_node.sh configs/msra.yaml --set distributed.config=configs/ds/zero2.json
#   NUM_GPUS=4 launch/single_node.sh configs/msra.yaml --set distributed.config=configs/ds/zero1.json
# Only GPUs 0 and 2:  INCLUDE=localhost:0,2 launch/single_node.sh CONFIG ...
# Everything after the config is passed to `nerco train` (--set ..., --stage, --init, --no-resume).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MASTER_PORT:-29500}
if [[ -n "${INCLUDE:-}" ]]; then
  exec python -m nerco_dist.launcher --include "$INCLUDE" --master_port "$PORT" --module nerco_dist.cli train "$@"
fi
exec python -m nerco_dist.launcher ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "$PORT" --module nerco_dist.cli train "$@"
