#!/usr/bin/env bash
# Several nodes over ssh: run on the first node; the runner starts the ranks of every node with pdsh.
#   HOSTFILE=launch/hostfile NUM_NODES=2 NUM_GPUS=8 MASTER_ADDR=node-0 \
#     launch/multi_node.sh configs/msra.yaml --set distributed.config=configs/ds/zero2.json
# Needs passwordless ssh to every host in the hostfile (see hostfile.example), pdsh, the same checkout
# and environment on every node, a shared run.out_dir, and .deepspeed_env for the variables the remote
# ranks need (KEY=VALUE lines only, as in deepspeed_env.example; in the checkout's root or $HOME, or the file
# DS_ENV_FILE names). A subset of hosts/GPUs: INCLUDE="node-0:0,1@node-1:0,1". docs/distributed.md: details,
# and Ctrl-C/SIGTERM to this script, which stop every rank on every node with a resume checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:=launch/hostfile}" "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
PORT=${MASTER_PORT:-29500}
if [[ -n "${INCLUDE:-}" ]]; then
  exec python -m nerco_dist.launcher --hostfile "$HOSTFILE" --include "$INCLUDE" --master_addr "$MASTER_ADDR" --master_port "$PORT" \
    --module nerco_dist.cli train "$@"
fi
exec python -m nerco_dist.launcher --hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:?}" --num_gpus "${NUM_GPUS:?}" \
  --master_addr "$MASTER_ADDR" --master_port "$PORT" --module nerco_dist.cli train "$@"
