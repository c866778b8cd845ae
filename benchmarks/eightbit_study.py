"""Measurements that choose the 8-bit moment's map and rounding (docs/eightbit.md, NOTE: [8-bit moment]).

    python benchmarks/eightbit_study.py error --out runs/q8/error.json    # (a) error of m on real gradients
    python benchmarks/eightbit_study.py train --out runs/q8/train.json    # (b) training against 32-bit NovoGrad

(a) ``error``: the main job's GPT-2 (4 layers, width 256, 4096-token BPE, 16 x 128 tokens) trained with 32-bit
NovoGrad on the Shakespeare corpus. Next to it, for each variant, a *shadow* moment of every quantised layer
(>= 4096 elements) is stepped with the same gradients, weights and denominators, but stored in 8 bits (teacher
forcing: the error accumulates only through the stored moment, as it would in training). Printed per variant at
several steps: ``||m8 - m32|| / ||m32||`` over all quantised layers (m8 the dequantised state), and the one-shot
error of quantising the 32-bit m itself.

(b) ``train``: the study's GPT-2 (benchmarks/study.py: 2 layers, width 128, 300 steps by default; ``--model main``:
the main job's 4 x 256 at 16 x 128 tokens) trained with
NovoGrad whose moment of each layer >= 4096 elements goes through each variant's quantiser after every update,
against the same run with an fp32 moment: same seed, data order and learning rate, so the difference is the
quantisation only. Final validation loss per variant and learning rate.

Variants: ``linear``/``sqrt`` x ``nearest``/``stochastic`` (the kernels' maps, novograd_ds/kernels/eightbit.py),
``dynamic-nearest`` (a log-like map measured here only: 127 magnitudes ``2^-e (8+f)/15`` for e in 0..15, f in 0..7,
the smallest replaced by 0, nearest in value, as fp8-e4m3 or bitsandbytes' dynamic map spend their codes), and
``*-wdq`` (the weight updated with the dequantised moment instead of the fp32 m_new), ``*-noemb`` (the token and
position embeddings keep an fp32 moment).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NOVOGRAD_DS_AUTOREGISTER", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from novograd_ds.kernels import eightbit as eb  # noqa: E402
from novograd_ds.optimizer import step_factors  # noqa: E402

VARIANTS = ("fp32", "linear-nearest", "linear-stochastic", "sqrt-nearest", "sqrt-stochastic", "dynamic-nearest",
            "linear-nearest-wdq", "sqrt-nearest-wdq")


def _dynamic_table() -> torch.Tensor:
    mags = sorted(2.0 ** -e * (8 + f) / 15 for e in range(16) for f in range(8))
    mags[0] = 0.0
    return torch.tensor(mags, dtype=torch.float32)


_DYN = _dynamic_table()
_DYN_MID = (_DYN[1:] + _DYN[:-1]) / 2


def fake_quant(m: torch.Tensor, variant: str, *, key: int, step: int, seed: int = 0) -> torch.Tensor:
    """The dequantised 8-bit state of fp32 ``m`` (one whole layer, flattened), blocks of 256 from element 0."""
    n = m.numel()
    nb = -(-n // eb.BLOCK)
    pad = torch.zeros(nb * eb.BLOCK)
    pad[:n] = m.reshape(-1)
    blocks = pad.view(nb, eb.BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    base = variant.split("-")[0]
    if base == "dynamic":
        inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        idx = torch.bucketize((blocks.abs() * inv).clamp(max=1.0), _DYN_MID)
        out = torch.where(blocks < 0, -_DYN[idx], _DYN[idx]) * absmax
        return out.reshape(-1)[:n].view_as(m)
    rounding = variant.split("-")[1]
    u = None
    if rounding == "stochastic":
        u = eb.uniform(seed, key, step, torch.arange(nb * eb.BLOCK, dtype=torch.long)).view(nb, eb.BLOCK)
    q = eb.quantize(blocks, eb.quant_inv(absmax, base), base, u)
    return eb.dequantize(q, eb.dequant_step(absmax, base), base).reshape(-1)[:n].view_as(m)


class SimNovoGrad:
    """NovoGrad (plain path, one tensor at a time, the kernels' fp32 arithmetic) whose moment of every tensor with
    at least MIN_QUANTIZED_NUMEL elements is stored as ``fake_quant(m_new)`` after each update."""

    def __init__(self, groups, *, variant: str, lr: float, betas=(0.95, 0.98), eps=1e-8, keep_fp32=()):
        self.param_groups = [dict(g, lr=lr) for g in groups]
        self.betas, self.eps = betas, eps
        # "<variant>-noemb": the embeddings keep an fp32 moment (keep_fp32: their ids)
        self.variant = variant[: -len("-noemb")] if variant.endswith("-noemb") else variant
        self.keep_fp32 = {id(p) for p in keep_fp32} if variant.endswith("-noemb") else set()
        self.state: dict = {}
        self.keys = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, dict(step=0, v=0.0, m=torch.zeros_like(p)))
                st["step"] += 1
                a1, c1, a2, c2 = step_factors(st["step"], b1, b2, False)
                n = float(p.grad.double().square().sum())
                st["v"] = a2 * st["v"] + c2 * n
                d = torch.tensor(math.sqrt(st["v"]) + self.eps, dtype=torch.float32)
                kw = dict(lr=group["lr"], beta1=a1, grad_scale=c1, weight_decay=group["weight_decay"], decoupled=False)
                m_new, w_new = eb.moment_and_weight(p, p.grad, st["m"], d, **kw)
                if self.variant != "fp32" and p.numel() >= eb.MIN_QUANTIZED_NUMEL and id(p) not in self.keep_fp32:
                    m_store = fake_quant(m_new, self.variant, key=self.keys[id(p)], step=st["step"])
                    if self.variant.endswith("-wdq"):  # w from the dequantised moment
                        w_new = _w_from(p, m_store, kw)
                    st["m"] = m_store
                else:
                    st["m"] = m_new
                p.copy_(w_new)


def _w_from(w: torch.Tensor, m: torch.Tensor, kw: dict) -> torch.Tensor:
    u = m + kw["weight_decay"] * w if kw["decoupled"] else m
    return w - kw["lr"] * u


# -- (a) error of the stored moment on real gradients -------------------------------------------------------------
def run_error(args) -> dict:
    from novograd_ds import NovoGrad
    from novograd_ds.lm.data import load_corpus, sample_batch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    corpus = load_corpus(vocab_size=4096)
    conf = GPT2Config(vocab_size=corpus.vocab_size, n_positions=args.seq_len, n_embd=256, n_layer=4, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=corpus.eot_id,
                      eos_token_id=corpus.eot_id)
    model = GPT2LMHeadModel(conf)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = NovoGrad(params, lr=args.lr, betas=(0.95, 0.98), weight_decay=1e-3, foreach=True)
    quant = [i for i, p in enumerate(params) if p.numel() >= eb.MIN_QUANTIZED_NUMEL]
    variants = [v for v in (args.variants or VARIANTS) if v != "fp32" and not v.endswith(("-wdq", "-noemb"))]
    shadow = {v: {i: torch.zeros_like(params[i]) for i in quant} for v in variants}
    report_at = sorted({1, 2, 5, 10, 20, 50, 100, 200, args.steps} & set(range(1, args.steps + 1)))
    rows = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        b = sample_batch(corpus.train, args.micro_batch, args.seq_len, seed=step)
        loss = torch.nn.functional.cross_entropy(model(input_ids=b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        w_before = {i: params[i].detach().clone() for i in quant}
        opt.step()
        a1, c1, _, _ = step_factors(step, 0.95, 0.98, False)
        row = dict(step=step, loss=float(loss))
        m32 = {i: opt.state[params[i]]["exp_avg"] for i in quant}
        den = sum(float(m32[i].double().square().sum()) for i in quant)
        for v in variants:
            num = num1 = 0.0
            for i in quant:
                d = opt.state[params[i]]["exp_avg_sq"].double().sqrt().add(1e-8).float()
                m_new, _ = eb.moment_and_weight(w_before[i], params[i].grad, shadow[v][i], d, lr=0.0, beta1=a1,
                                                grad_scale=c1, weight_decay=1e-3, decoupled=False)
                shadow[v][i] = fake_quant(m_new, v, key=i, step=step)
                num += float((shadow[v][i].double() - m32[i].double()).square().sum())
                num1 += float((fake_quant(m32[i], v, key=i, step=step).double() - m32[i].double()).square().sum())
            row[v] = math.sqrt(num / den)
            row[v + " one-shot"] = math.sqrt(num1 / den)
        if step in report_at:
            rows.append(row)
            print(f"step {step:4d} loss {row['loss']:.3f} " + " ".join(f"{v} {row[v]:.4f}/{row[v + ' one-shot']:.4f}"
                                                                     for v in variants) + f"  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    n_q = sum(params[i].numel() for i in quant)
    return dict(what="error", model="GPT-2 4x256, vocab 4096, seq %d, batch %d" % (args.seq_len, args.micro_batch),
                lr=args.lr, steps=args.steps, quantized_params=n_q, params=sum(p.numel() for p in params), rows=rows)


# -- (b) training against 32-bit NovoGrad ---------------------------------------------------------------------------
def run_train(args) -> dict:
    import study

    cfg = study.StudyConfig(steps=args.steps)
    if args.model == "main":  # the main job's model and batch (novograd_ds/train.py defaults)
        cfg = study.StudyConfig(steps=args.steps, n_layer=4, n_embd=256, n_head=4, seq_len=128, micro_batch=16)
    torch.set_num_threads(1)
    corpus = study.load_corpus(vocab_size=cfg.vocab_size)
    val = study.val_batches(corpus.val, cfg.micro_batch, cfg.seq_len, cfg.eval_batches)
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.is_file() else dict(what="train", runs=[])
    done = {(r["variant"], r["lr"], r["seed"], r["steps"], r.get("model", "study")) for r in data["runs"]}
    for lr in args.lrs:
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, lr, seed, args.steps, args.model) in done:
                    continue
                model = study.build_model(cfg, corpus.vocab_size, seed, corpus.eot_id)
                emb = [model.transformer.wte.weight, model.transformer.wpe.weight]
                opt = SimNovoGrad(study.param_groups(model, 1e-3), variant=variant, lr=lr, keep_fp32=emb)
                t0 = time.perf_counter()
                curve = []
                for step in range(args.steps):
                    cur = study.lr_at(step, args.steps, lr, 0, cfg.final_lr_fraction)
                    for g in opt.param_groups:
                        g["lr"] = cur
                    b = study.sample_batch(corpus.train, cfg.micro_batch, cfg.seq_len,
                                           seed=(seed * 1_000_003 + step) * 4099)
                    loss = torch.nn.functional.cross_entropy(model(input_ids=b[:, :-1]).logits.flatten(0, 1),
                                                             b[:, 1:].flatten())
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if (step + 1) % max(1, args.steps // 6) == 0 or step + 1 == args.steps:
                        curve.append((step + 1, study.evaluate(model, val)))
                r = dict(variant=variant, lr=lr, seed=seed, steps=args.steps, model=args.model,
                         final_val_loss=curve[-1][1],
                         val_curve=curve, wall_s=time.perf_counter() - t0)
                data["runs"].append(r)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(data, indent=1))
                print(f"{variant:>20} lr={lr:<8.4g} seed={seed} steps={args.steps}: val {r['final_val_loss']:.4f} "
                      f"({r['wall_s']:.0f} s)", flush=True)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("error")
    e.add_argument("--out", required=True)
    e.add_argument("--steps", type=int, default=200)
    e.add_argument("--lr", type=float, default=0.01)
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--micro-batch", type=int, default=16)
    e.add_argument("--variants", type=lambda s: s.split(","), default=None)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.03125])
    t.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    t.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    t.add_argument("--model", choices=("study", "main"), default="study",
                   help="study: 2 x 128, 16 x 64 tokens (benchmarks/study.py); main: the main job's 4 x 256, 16 x 128")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "error":
        res = run_error(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    else:
        run_train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
