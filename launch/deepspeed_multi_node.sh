#!/usr/bin/env bash
# Wraps:  deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR --module novograd_ds.train --deepspeed-config $CONFIG --out $OUT
#
# Several nodes listed in a hostfile (launch/hostfile shows the format: "<host> slots=<GPUs>" per line).
# Two ways to start it:
#   * from the first node, with passwordless ssh and pdsh to every host:   bash launch/deepspeed_multi_node.sh
#   * on every node yourself (no ssh; e.g. from a scheduler):              NO_SSH=1 NODE_RANK=<i> bash launch/deepspeed_multi_node.sh
# On a cluster: write your hosts and GPU counts into HOSTFILE, set MASTER_ADDR to the first host's address
# (reachable from every node), put OUT on a shared file system (checkpoints of all ranks land there), and
# for NCCL set e.g. NCCL_SOCKET_IFNAME / NCCL_IB_HCA as your fabric needs (export them in ~/.deepspeed_env
# so pdsh forwards them).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
CONFIG=${CONFIG:-configs/novograd_32k.json}
OUT=${OUT:-runs/deepspeed_multi_node}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^ *#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
EXTRA=()
if [[ "${NO_SSH:-0}" == "1" ]]; then EXTRA=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK (0..nodes-1) with NO_SSH=1}"); fi
if [[ -n "${SSH_PORT:-}" ]]; then EXTRA+=(--ssh_port "$SSH_PORT"); fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${EXTRA[@]}" \
    --module novograd_ds.train --deepspeed-config "$CONFIG" --out "$OUT" "$@"
