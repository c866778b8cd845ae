"""8-bit NovoGrad state against 32-bit on the main job (issue #14): final validation losses within 0.02.

Runs ``python -m novograd_ds.train`` (the main job, its default model unless ``--tiny``) once per (learning rate,
seed, state bits): the 32-bit runs take the DeepSpeed config as it is, the 8-bit runs the same config with
``"state_bits": 8`` and the quantisation settings (``EIGHTBIT``, passed explicitly) in ``optimizer.params``. Each
run is a fresh process with the same seed, data order and schedule; the optimizer state is the only difference.
The final checkpoint's optimizer state is read back to count its bytes (then deleted).

Results go to ``OUT/results.json`` after each run; a rerun skips the runs already there, so an interrupted
comparison continues where it stopped. ``benchmarks/study.py --write-docs docs/results.md --main-job
OUT/results.json`` puts the table on the results page.

    python benchmarks/eightbit_quality.py --out runs/eightbit_main            # 12 runs of 100 steps (~25 min, 2 cores)
    python benchmarks/eightbit_quality.py --out runs/eightbit_main \\
        --deepspeed-config configs/zero2.json                                 # under ZeRO-2 (needs 8-bit ZeRO flats)
    python benchmarks/eightbit_quality.py --out /tmp/q8 --tiny                # what CI runs: 2 runs of 3 steps
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# NOTE: [8-bit settings are explicit] (benchmarks/study.py): every quantisation setting is passed, not defaulted.
EIGHTBIT = dict(state_bits=8, quant_map="linear", quant_rounding="stochastic")  # the defaults (docs/eightbit.md)
TOLERANCE = 0.02
# The main job's default learning rate (0.01, novograd_ds/train.py) and its factor-2 neighbours.
LRS = (0.005, 0.01, 0.02)
SEEDS = (0, 1)
# 100 steps: 12 runs of the default model (4.2M parameters, 2048 tokens a step) take about 25 minutes on 2 CPU cores.
STEPS = 100
TINY = dict(steps=3, lrs=(0.01,), seeds=(0,),
            model=["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--micro-batch", "4",
                   "--eval-batches", "2"])


def base_config(path: Path | None) -> dict:
    """The DeepSpeed config of the 32-bit runs: ``path``, or the main job's built-in one (ZeRO-0, fp32)."""
    if path is None:
        from novograd_ds.train import default_ds_config

        return default_ds_config()
    cfg = json.loads(path.read_text())
    opt = cfg.get("optimizer", {})
    if str(opt.get("type", "")).lower() != "novograd":
        raise SystemExit(f"{path}: optimizer.type is {opt.get('type')!r}; this comparison needs \"NovoGrad\"")
    quant = sorted(k for k in opt.get("params", {}) if k in EIGHTBIT or k.startswith("quant_"))
    if quant:
        raise SystemExit(f"{path}: optimizer.params already sets {quant}; give the 32-bit config, the 8-bit one is "
                         "made from it by adding " + json.dumps(EIGHTBIT))
    return cfg


def with_bits(cfg: dict, bits: int) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("optimizer", {"type": "NovoGrad"}).setdefault("params", {})
    if bits == 8:
        cfg["optimizer"]["params"].update(EIGHTBIT)
    return cfg


def engine_text(cfg: dict, engine: str) -> str:
    if engine == "fsdp2":
        return "PyTorch FSDP2 (`--engine fsdp2`), world 1"
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    prec = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
    return f"DeepSpeed ZeRO stage {zero}, {prec}, world 1"


def optimizer_state_bytes(ckpt_dir: Path) -> int:
    """Bytes of the optimizer's state in a checkpoint: every tensor under its ``state`` entries, nested ones included
    (the plain path keeps ``exp_avg_codes``/``exp_avg_scales``/``exp_avg_sq`` per parameter; a ZeRO flat keeps codes
    beside a ``novograd`` dict of scales, per-layer moments, small layers' fp32 moments and their small index tables).
    Master weights and engine bookkeeping outside ``state`` are not counted."""
    import torch

    def state_dicts(obj):
        if isinstance(obj, dict):
            st = obj.get("state")
            if isinstance(st, dict) and st and all(isinstance(v, dict) for v in st.values()):
                yield st
                return
            for v in obj.values():
                yield from state_dicts(v)

    def tensor_bytes(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    total = 0
    for f in sorted(ckpt_dir.rglob("*.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        for key in ("optimizer", "optimizer_state_dict"):
            for st in state_dicts(sd.get(key)):
                total += tensor_bytes(st)
    return total


class Comparison:
    def __init__(self, out: Path, *, steps: int, lrs, seeds, engine: str, ds_config: Path | None, extra: list[str]):
        self.out, self.steps, self.engine, self.extra = out, steps, engine, extra
        self.lrs, self.seeds = list(lrs), list(seeds)
        self.base = base_config(ds_config)
        conf = dict(steps=steps, lrs=self.lrs, seeds=self.seeds, engine=engine, extra_args=extra,
                    ds_config=self.base, eightbit=EIGHTBIT)
        self.path = out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"config": conf, "runs": []}
        if {k: self.data["config"].get(k) for k in conf} != conf:
            raise SystemExit(f"{self.path} was written with another configuration (steps, rates, seeds, engine, "
                             "model arguments or DeepSpeed config); use another --out or delete it")

    def key(self, bits, lr, seed):
        return f"{bits}|{lr:.6g}|{seed}"

    def run(self, bits: int, lr: float, seed: int) -> dict:
        key = self.key(bits, lr, seed)
        for r in self.data["runs"]:
            if r["key"] == key:
                return r
        run_dir = self.out / "runs" / key.replace("|", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cfg_path = run_dir / "ds_config.json"
        cfg_path.write_text(json.dumps(with_bits(self.base, bits), indent=1))
        cmd = [sys.executable, "-m", "novograd_ds.train", "--out", str(run_dir), "--deepspeed-config", str(cfg_path),
               "--engine", self.engine, "--max-steps", str(self.steps), "--lr", repr(lr), "--seed", str(seed),
               "--eval-interval", str(self.steps), "--save-interval", "0", "--no-progress", *self.extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        env.setdefault("DS_ACCELERATOR", "cpu")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            raise SystemExit(f"run {key} failed (exit {proc.returncode}); its log: {run_dir / 'log.txt'}\n"
                             + (proc.stdout + proc.stderr)[-3000:])
        m = json.loads((run_dir / "metrics.json").read_text())
        ckpt = run_dir / "checkpoints"
        r = dict(key=key, bits=bits, lr=lr, seed=seed, final_val_loss=m["val_loss"],
                 initial_val_loss=m["initial_val_loss"], train_loss=m["train_loss"], steps=m["steps"],
                 train_wall_s=m["wall_time_s"], wall_s=wall, tokens_per_second=m["tokens_per_second"],
                 zero_stage=m.get("zero_stage"), engine=m.get("engine"), optimizer=m.get("basic_optimizer"),
                 n_params=n_params(ckpt), state_bytes=optimizer_state_bytes(ckpt),
                 val_curve=m.get("val_history"))
        shutil.rmtree(ckpt, ignore_errors=True)  # the state is counted; the weights are not needed
        self.data["runs"].append(r)
        self.save()
        print(f"{bits:>2}-bit lr={lr:<6g} seed={seed}: val {r['final_val_loss']:.4f} "
              f"({wall:.0f} s, state {r['state_bytes'] / 1e6:.2f} MB)", flush=True)
        return r

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def main(self, command: str) -> dict:
        for lr in self.lrs:
            for seed in self.seeds:
                for bits in (32, 8):
                    self.run(bits, lr, seed)
        self.data["command"] = command
        self.data["summary"] = summarize(self.data)
        self.save()
        return self.data


def n_params(ckpt_dir: Path) -> int:
    """Parameters in a DeepSpeed checkpoint's module state (a tied weight, stored once, counts once)."""
    import torch

    for f in sorted(ckpt_dir.rglob("*model_states.pt")):
        module = torch.load(f, map_location="cpu", weights_only=False).get("module")
        if isinstance(module, dict):
            seen = {}
            for t in module.values():
                if torch.is_tensor(t):
                    seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel()
            return sum(seen.values())
    return 0


def summarize(data: dict) -> dict:
    c = data["config"]
    runs = {(r["bits"], r["lr"], r["seed"]): r for r in data["runs"]}
    rows = []
    for lr in c["lrs"]:
        for seed in c["seeds"]:
            r32, r8 = runs.get((32, lr, seed)), runs.get((8, lr, seed))
            if r32 and r8:
                d = r8["final_val_loss"] - r32["final_val_loss"]
                rows.append(dict(lr=lr, seed=seed, fp32=r32["final_val_loss"], q8=r8["final_val_loss"],
                                 diff=d if math.isfinite(d) else math.inf))
    q8 = [r for r in data["runs"] if r["bits"] == 8]
    fp32 = [r for r in data["runs"] if r["bits"] == 32]
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r["fp32"])
    spreads = [max(v) - min(v) for v in by_lr.values() if len(v) > 1]
    spread = max(spreads) if spreads else None  # seed noise of 32-bit at one rate (None with one seed)
    best = min(fp32, key=lambda r: r["final_val_loss"]) if fp32 else None
    return dict(settings=dict(EIGHTBIT), tolerance=TOLERANCE, rows=rows,
                max_abs_diff=max(abs(r["diff"]) for r in rows) if rows else math.nan, seed_spread_fp32=spread,
                mean_diff=float(np.mean([r["diff"] for r in rows])) if rows else math.nan,
                met=bool(rows) and all(abs(r["diff"]) <= TOLERANCE for r in rows),
                state_bytes=q8[0]["state_bytes"] if q8 else None,
                state_bytes_fp32=fp32[0]["state_bytes"] if fp32 else None,
                n_params=(q8 or fp32)[0]["n_params"], best_fp32_lr=best["lr"] if best else None,
                q8_wall_s=float(np.mean([r["wall_s"] for r in q8])) if q8 else None,
                fp32_wall_s=float(np.mean([r["wall_s"] for r in fp32])) if fp32 else None,
                wall_s_total=float(sum(r["wall_s"] for r in data["runs"])),
                engine=engine_text(c["ds_config"], c["engine"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and the runs (resumable)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {STEPS})")
    ap.add_argument("--deepspeed-config", type=Path, default=None,
                    help="the 32-bit DeepSpeed config (default: the main job's built-in ZeRO-0 fp32 one)")
    ap.add_argument("--engine", choices=("deepspeed", "fsdp2"), default="deepspeed", help="the main job's --engine")
    ap.add_argument("--tiny", action="store_true", help="one rate, one seed, 3 steps of a small model (what CI runs)")
    args = ap.parse_args(argv)
    t = TINY if args.tiny else dict(steps=STEPS, lrs=LRS, seeds=SEEDS, model=[])
    steps = args.steps or t["steps"]
    comp = Comparison(args.out, steps=steps, lrs=t["lrs"], seeds=t["seeds"], engine=args.engine,
                      ds_config=args.deepspeed_config, extra=t["model"])
    given = argv if argv is not None else sys.argv[1:]
    data = comp.main("python " + " ".join(["benchmarks/eightbit_quality.py", *given]))
    s = data["summary"]
    print(json.dumps({k: v for k, v in s.items() if k != "rows"}, indent=1))
    for r in s["rows"]:
        print(f"lr {r['lr']:g} seed {r['seed']}: 32-bit {r['fp32']:.4f}, 8-bit {r['q8']:.4f}, diff {r['diff']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
