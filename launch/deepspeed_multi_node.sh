#!/usr/bin/env bash
# Wraps:  deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR [--ssh_port $SSH_PORT] \
#             --module novograd_ds.train --deepspeed-config $CONFIG --out $OUT
#
# Several nodes listed in a hostfile (launch/hostfile shows the format: "<host> slots=<GPUs>" per line).
# Two ways to start it:
#   * from the first node, with passwordless ssh and pdsh to every host:   bash launch/deepspeed_multi_node.sh
#   * on every node yourself (no ssh; e.g. from a scheduler):              NO_SSH=1 NODE_RANK=<i> bash launch/deepspeed_multi_node.sh
# The pdsh way: DeepSpeed runs `pdsh -w <hosts> "export ...; cd <this repo>; <this python> -u -m
# deepspeed.launcher.launch --node_rank=%n ..."`, so every host needs ssh from this node without a password or
# a host key prompt (set keys, ports and host key policy in ~/.ssh/config; SSH_PORT=<port> adds --ssh_port),
# this repository and this Python (the venv) at the same paths (a shared file system), and pdsh installed.
# ssh gives the remote side a fresh login environment: DeepSpeed forwards only PYTHON* (PYTHONPATH gets this
# directory), NCCL* (on GPUs; e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA for your fabric), MLFLOW*, UCX*, MV2*, and the
# KEY=VALUE lines of ~/.deepspeed_env and ./.deepspeed_env (DS_ENV_FILE=<absolute path> names another file).
# Put everything else the ranks need there: NOVOGRAD_DS_*, TORCH_EXTENSIONS_DIR, HF_HOME, OMP_NUM_THREADS, ...
# On a cluster: write your hosts and GPU counts into HOSTFILE, set MASTER_ADDR to the first host's address
# (reachable from every node), put OUT on a shared file system (checkpoints of all ranks land there).
# Tested (tests/test_launch.py, one CPU machine, gloo, 1 rank per "node"): both ways, with the hostfile
# "localhost slots=1 / 127.0.0.1 slots=1"; the pdsh way through a real sshd (scripts/multinode_setup.sh).
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
