#!/usr/bin/env bash
# Wraps:  torchrun --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID --nproc_per_node $GPUS_PER_NODE \
#             --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m novograd_ds.train --deepspeed-config $CONFIG --out $OUT
#
# What srun runs on every node of launch/slurm.sbatch (one task per node). Reads SLURM's variables; MASTER_ADDR
# defaults to the first host of SLURM_JOB_NODELIST. Alternative without torchrun: srun with one task per GPU
# straight into "python -m novograd_ds.train", which maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself.
# Static torchrun ranks (node rank = SLURM_NODEID): Slurm already knows every node, no rendezvous to wait for.
set -euo pipefail
: "${SLURM_NNODES:?run under srun (or set SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST)}"
CONFIG=${CONFIG:-configs/novograd_32k.json}
OUT=${OUT:-runs/slurm-${SLURM_JOB_ID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
    MASTER_ADDR=${MASTER_ADDR:-$(python -c "from novograd_ds.train import _first_slurm_host as f; print(f('$SLURM_JOB_NODELIST'))")}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
exec torchrun --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m novograd_ds.train --deepspeed-config "$CONFIG" --out "$OUT" "$@"
