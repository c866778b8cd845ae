#!/usr/bin/env bash
# Wraps:  torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NPROC_PER_NODE \
#             --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m novograd_ds.train --deepspeed-config $CONFIG --out $OUT
#
# One node: bash launch/torchrun.sh.  Several nodes: run it on every node with the same MASTER_ADDR/MASTER_PORT
# (the first node's address) and NODE_RANK=0..NNODES-1. novograd_ds.train reads RANK/WORLD_SIZE/LOCAL_RANK
# from torchrun and builds the DeepSpeed engine itself; no deepspeed launcher involved.
# On a cluster: NPROC_PER_NODE = GPUs per node (the default), MASTER_ADDR reachable from all nodes, OUT shared.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/zero2.json}
OUT=${OUT:-runs/torchrun}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m novograd_ds.train --deepspeed-config "$CONFIG" --out "$OUT" "$@"
