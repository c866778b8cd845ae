"""Run the main job for a few steps under several DeepSpeed configs, in ONE process launch.

    torchrun --nproc_per_node 2 -m novograd_ds.lm.smoke --out DIR configs/zero1.json configs/zero2.json ...
    python -m novograd_ds.lm.smoke --out DIR --grad-accum 2 default     # "default": the built-in config

Every config gets the same tiny model, data and step count (flags after the config names are passed to
``novograd_ds.train``). A config that fails with a :class:`~novograd_ds.train.ConfigError` (e.g. fp16 on a
CPU) is recorded with its message instead of stopping the sweep. Rank 0 writes ``DIR/summary.json``:
per config its final/initial validation loss, the validation history, the optimizer class inside the
engine and the wrapper DeepSpeed put around it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from novograd_ds import train as T

TINY = ["--max-steps", "4", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--seq-len", "64",
        "--micro-batch", "4", "--eval-batches", "2", "--eval-interval", "1000", "--vocab-size", "4096",
        "--no-progress"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m novograd_ds.lm.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("configs", nargs="+", help="DeepSpeed JSON files, or 'default' for the built-in config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    out = Path(args.out)
    summary = {}
    for cfg in args.configs:
        name = "default" if cfg == "default" else Path(cfg).stem
        targv = TINY + ["--out", str(out / name)] + ([] if cfg == "default" else ["--deepspeed-config", cfg]) + extra
        try:
            m = T.train(T.parse_args(targv))
        except T.ConfigError as e:
            summary[name] = {"error": str(e)}
            continue
        summary[name] = {k: m[k] for k in ("val_loss", "initial_val_loss", "train_loss", "val_history",
                                           "train_history", "basic_optimizer", "basic_optimizer_is_novograd",
                                           "optimizer_wrapper", "zero_stage", "param_dtype", "world_size", "steps",
                                           "tokens")}
        summary[name]["train_batch_size"] = m["config"]["deepspeed"]["train_batch_size"]
        summary[name]["gradient_accumulation_steps"] = m["config"]["deepspeed"]["gradient_accumulation_steps"]
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        for k, v in summary.items():
            print(k, "error: " + v["error"] if "error" in v else
                  f"val {v['initial_val_loss']:.4f} -> {v['val_loss']:.4f} {v['basic_optimizer']} in "
                  f"{v['optimizer_wrapper']} ({v['param_dtype']})", flush=True)
    T.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
