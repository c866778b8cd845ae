#!/usr/bin/env bash
# Wraps (one node, or several nodes with a static rank each):
#   torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NPROC_PER_NODE \
#            --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m novograd_ds.train --deepspeed-config $CONFIG --out $OUT
# or, with RDZV_ENDPOINT set (several nodes, c10d rendezvous; node ranks are assigned when the nodes meet):
#   torchrun --nnodes $NNODES --nproc_per_node $NPROC_PER_NODE --rdzv_backend c10d --rdzv_endpoint $RDZV_ENDPOINT \
#            --rdzv_id $RDZV_ID -m novograd_ds.train --deepspeed-config $CONFIG --out $OUT
#
# One node:  bash launch/torchrun.sh   (NPROC_PER_NODE defaults to every visible GPU).
# Several nodes, c10d rendezvous (what torchrun's docs recommend): run on every node, in any order,
#   NNODES=4 RDZV_ENDPOINT=<host0>:29400 RDZV_ID=<job id> bash launch/torchrun.sh
#   RDZV_ENDPOINT is a host:port every node can reach (the agent on that host serves the store; the others join
#   it). RDZV_ID must be the same on all nodes and new for every job (default: $SLURM_JOB_ID, else "novograd_ds").
#   NNODES may be a range MIN:MAX (elastic; the job starts once MIN nodes have joined). MASTER_ADDR,
#   MASTER_PORT and NODE_RANK are ignored in this mode.
# Several nodes, static: run on every node with the same MASTER_ADDR/MASTER_PORT (the first node's address)
#   and NODE_RANK=0..NNODES-1:  NNODES=2 NODE_RANK=<i> MASTER_ADDR=<host0> bash launch/torchrun.sh
# novograd_ds.train reads RANK/WORLD_SIZE/LOCAL_RANK from torchrun and builds the DeepSpeed engine itself; no
# deepspeed launcher involved. ENGINE=fsdp2 trains with PyTorch FSDP2 (fully_shard) instead of a DeepSpeed engine,
# from the same config's batch, optimizer, scheduler, clipping and bf16 keys (--engine fsdp2, docs/training.md). On a cluster: NPROC_PER_NODE = GPUs per node (the default), OUT on shared storage
# (every rank writes its checkpoint shard there), NCCL_* settings for your fabric exported before the call.
# Tested (tests/test_launch.py, one CPU machine, gloo): one node x 2 ranks, and two torchrun agents x 1 rank each,
# both with static ranks and with c10d rendezvous on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/zero2.json}
OUT=${OUT:-runs/torchrun}
ENGINE=${ENGINE:-deepspeed}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    RENDEZVOUS=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-novograd_ds}}")
else
    RENDEZVOUS=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${RENDEZVOUS[@]}" \
    -m novograd_ds.train --engine "$ENGINE" --deepspeed-config "$CONFIG" --out "$OUT" "$@"
