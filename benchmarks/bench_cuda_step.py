"""GPU optimizer-step time of NovoGrad's fused CUDA op against torch's fused AdamW and other NovoGrads.

    python benchmarks/bench_cuda_step.py                      # CUDA, ~153M fp32 params (8 GPT-2-medium blocks)
    python benchmarks/bench_cuda_step.py --layers 24          # all of GPT-2 medium: ~355M params
    python benchmarks/bench_cuda_step.py --device cpu --tiny  # smoke run of the script itself (CI)

Parameters are fp32, in the shapes of GPT-2 medium (d_model 1024): the token embedding (50257 x 1024), position
embedding, and per block two layer norms, the fused QKV matrix, the attention projection, the two MLP matrices
and their biases. Every optimizer owns its parameters, its state and ``--rotate`` sets of gradients (torch-optimizer's
NovoGrad divides ``p.grad`` in place, so nothing is shared); before each step the parameters' ``.grad`` point at the
next set, so a step never finds its gradients in L2 (50 MB on an H100) from the step before.

Timed, round robin (one step of each optimizer per round, then one device-to-device copy): our fused op
(``NovoGrad(fused=True)``), our foreach backend, ``torch.optim.AdamW(fused=True)``, torch-optimizer's NovoGrad.
Each step is bracketed by CUDA events (``time.perf_counter`` on the CPU); the table gives the median over
``--steps`` rounds after ``--warmup`` rounds. The copy moves a buffer of as many fp32 elements as there are
parameters (bytes read + written).

Bytes per parameter (docs/fused_ops.md, the least a step must move): NovoGrad 24 (read g twice, read and write
w and m), AdamW 28 (read g, read and write w, m, v). ``GB/s`` is that count over the median step time, and
``of copy`` is that rate over the copy's: the fraction of the bandwidth the card gave this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Optional

os.environ.setdefault("NOVOGRAD_DS_AUTOREGISTER", "0")  # the optimizer only; no DeepSpeed import

import torch  # noqa: E402

BYTES_PER_PARAM = {"novograd": 24, "adamw": 28}
ADAMW = "torch AdamW fused"


def gpt2_shapes(layers: int, d: int, vocab: int, positions: int) -> list[tuple[int, ...]]:
    """fp32 parameter shapes of a GPT-2 model (HF Conv1D layout: (in, out))."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]  # final layer norm
    return shapes


class Timer:
    """Per-interval device time: CUDA events on a GPU (read after one sync at the end), a host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pairs.append((started, ev))
        else:
            self.pairs.append((started, time.perf_counter()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.pairs]
        return [b - a for a, b in self.pairs]


class Case:
    """One optimizer with its own parameters and rotating gradient sets."""

    def __init__(self, label: str, kind: str, make: Callable, base: list[torch.Tensor],
                 grads: list[list[torch.Tensor]]):
        self.label, self.kind = label, kind
        self.params = [torch.nn.Parameter(t.clone()) for t in base]
        self.grads = [[g.clone() for g in gs] for gs in grads]
        self.opt = make(self.params)
        self.k = 0
        self.timer: Optional[Timer] = None

    def point_grads(self) -> None:
        for p, g in zip(self.params, self.grads[self.k % len(self.grads)]):
            p.grad = g
        self.k += 1

    def step(self) -> None:
        self.point_grads()
        self.opt.step()

    def timed_step(self) -> None:
        self.point_grads()
        t = self.timer.start()
        self.opt.step()
        self.timer.stop(t)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--layers", type=int, default=8, help="GPT-2 blocks (8: ~153M params; 24: GPT-2 medium)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (the fused op's load, allocator)")
    ap.add_argument("--rotate", type=int, default=3, help="gradient sets per optimizer, used in turn")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and few steps: checks the script, times nothing")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.d_model, args.vocab, args.positions = 2, 64, 512, 128
        args.steps, args.warmup, args.rotate = 3, 1, 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_cuda_step: error: --device cuda but torch.cuda.is_available() is False; "
                  "run on a GPU, or pass --device cpu --tiny to check the script", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())

    from novograd_ds import NovoGrad

    shapes = gpt2_shapes(args.layers, args.d_model, args.vocab, args.positions)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(s, device=device, generator=gen) * 0.02 for s in shapes]
    grads = [[torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes] for _ in range(args.rotate)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {n_params / 1e6:.2f}M fp32 params in {len(shapes)} tensors (GPT-2, {args.layers} blocks x "
          f"{args.d_model}, vocab {args.vocab}), {where}, torch {torch.__version__}; median of {args.steps} rounds "
          f"after {args.warmup}, {args.rotate} gradient sets per optimizer", flush=True)
    if n_params < 100e6 and not args.tiny:
        print("# note: fewer than 100M parameters; the step may fit in cache and time the cache", flush=True)

    hp = dict(lr=1e-3, weight_decay=1e-3)

    def fused(params):
        return NovoGrad(params, **hp, fused=True)

    def foreach(params):
        return NovoGrad(params, **hp, foreach=True)

    def adamw(params):
        return torch.optim.AdamW(params, **hp, fused=True)

    def torch_optimizer_novograd(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch_optimizer

        return torch_optimizer.NovoGrad(params, **hp)

    cases: list[Case] = []
    notes: list[str] = []
    for label, kind, make in (("novograd_ds fused", "novograd", fused), ("novograd_ds foreach", "novograd", foreach),
                              (ADAMW, "adamw", adamw), ("torch-optimizer NovoGrad", "novograd",
                                                        torch_optimizer_novograd)):
        try:
            case = Case(label, kind, make, base, grads)
            for _ in range(args.warmup):
                case.step()
            if label == "novograd_ds fused" and case.opt.backend != "fused":
                raise RuntimeError(f"asked for fused=True but the step ran {case.opt.backend!r}")
            case.timer = Timer(device)
            cases.append(case)
        except Exception as exc:  # a competitor that cannot run here is reported, not fatal
            notes.append(f"{label}: skipped ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})")
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
    del base, grads

    # The copy: as many fp32 elements as there are parameters, from one of two sources in turn.
    srcs = [torch.randn(n_params, device=device, generator=gen) for _ in range(2)]
    dst = torch.empty(n_params, device=device)
    copy_timer = Timer(device)
    for _ in range(args.warmup):
        dst.copy_(srcs[0])
    for r in range(args.steps):
        for case in cases:
            case.timed_step()
        t = copy_timer.start()
        dst.copy_(srcs[r % 2])
        copy_timer.stop(t)

    copy_s = statistics.median(copy_timer.seconds())
    copy_bw = 8 * n_params / copy_s
    rows = []
    for case in cases:
        sec = statistics.median(case.timer.seconds())
        moved = BYTES_PER_PARAM[case.kind] * n_params
        rows.append(dict(optimizer=case.label, step_ms=sec * 1e3, bytes_per_param=BYTES_PER_PARAM[case.kind],
                         gb_per_s=moved / sec / 1e9, of_copy=moved / sec / copy_bw))
    adamw_ms = next((r["step_ms"] for r in rows if r["optimizer"] == ADAMW), None)
    for r in rows:
        r["vs_adamw"] = r["step_ms"] / adamw_ms if adamw_ms else None

    # Not a test, a sanity line: the two backends of ours saw the same gradients the same number of times.
    by = {c.label: c for c in cases}
    agree = None
    if "novograd_ds fused" in by and "novograd_ds foreach" in by:
        a, b = by["novograd_ds fused"].params, by["novograd_ds foreach"].params
        agree = max(float((x.detach() - y.detach()).norm() / y.detach().norm().clamp_min(1e-30)) for x, y in zip(a, b))

    result = dict(device=where, torch=torch.__version__, n_params=n_params, tensors=len(shapes), layers=args.layers,
                  d_model=args.d_model, steps=args.steps, warmup=args.warmup, rotate=args.rotate,
                  copy_ms=copy_s * 1e3, copy_gb_per_s=copy_bw / 1e9, rows=rows, notes=notes,
                  fused_vs_foreach_max_rel_diff=agree, tiny=args.tiny)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    for note in notes:
        print(f"# {note}")
    if agree is not None:
        print(f"# fused vs foreach parameters after {args.warmup + args.steps} steps: max relative difference "
              f"{agree:.2e}")
    width = max([len(r["optimizer"]) for r in rows] + [len("device-to-device copy")])
    print(f"{'step of'.ljust(width)}  {'ms':>8}  {'vs AdamW':>8}  {'B/param':>7}  {'GB/s':>8}  {'of copy':>7}")
    for r in rows:
        vs = f"{r['vs_adamw']:.3f}" if r["vs_adamw"] is not None else "-"
        print(f"{r['optimizer'].ljust(width)}  {r['step_ms']:8.3f}  {vs:>8}  {r['bytes_per_param']:7d}  "
              f"{r['gb_per_s']:8.1f}  {r['of_copy']:7.3f}")
    print(f"{'device-to-device copy'.ljust(width)}  {copy_s * 1e3:8.3f}  {'':>8}  {8:7d}  {copy_bw / 1e9:8.1f}  "
          f"{1.0:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
