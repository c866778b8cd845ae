#!/usr/bin/env bash
# Wraps:  deepspeed --num_gpus $NUM_GPUS --module novograd_ds.train --deepspeed-config $CONFIG --out $OUT [train args]
#
# One node, NUM_GPUS ranks. Extra arguments go to novograd_ds.train (e.g. --max-steps 2000 --resume).
# On a cluster node: NUM_GPUS defaults to every visible GPU; pick CONFIG (configs/novograd_32k.json for the
# 32K-token recipe) and put OUT on storage that survives the job. Without a GPU each rank is a CPU process
# (DS_ACCELERATOR=cpu, gloo); NUM_GPUS=2 then means 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/zero2.json}
OUT=${OUT:-runs/deepspeed_single_node}
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module novograd_ds.train --deepspeed-config "$CONFIG" --out "$OUT" "$@"
