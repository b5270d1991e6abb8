#!/usr/bin/env bash
# Several nodes without ssh: start this on EVERY node (same command, its own NODE_RANK 0..N-1); each
# starts its own ranks and they meet at MASTER_ADDR:MASTER_PORT (node 0).
#   NODE_RANK=0 HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 launch/no_ssh.sh configs/msra.yaml --set ...
#   NODE_RANK=1 HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 launch/no_ssh.sh configs/msra.yaml --set ...
# The hostfile lists every node with its slots, in the same order on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:=launch/hostfile}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
exec python -m nerco_dist.launcher --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module nerco_dist.cli train "$@"
