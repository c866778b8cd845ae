"""CPU step time of NovoGrad's fused op against other optimizers and the memory-bandwidth floor.

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_step.py [--params 25e6] [--steps 20] [--threads 2]

25M fp32 parameters in transformer-shaped tensors (embedding, attention, MLP, norms, biases), gradients set
once, 3 warm-up steps, then ``--steps`` rounds of one timed ``step()`` of each (round robin, medians), for: our fused op, our
foreach path, torch AdamW(fused=True), DeepSpeedCPUAdam (skipped with a note if it cannot build),
torch-optimizer NovoGrad, apex FusedNovoGrad (only if importable; it is CUDA-only). The floor is NovoGrad's
24 bytes/param (read g twice, read w and m, write w and m) at the best streaming bandwidth measured in this
run (torch.add(a, b, out=c), a.add_(b) and copy_ over 256 MiB arrays, interleaved with the steps).

8-bit rows (``--eightbit``, on by default; NOTE: [8-bit moment]): the fused op's 8-bit NovoGrad step for each map and
rounding, driven through the kernel seam the way the plain path steps (one ``q8_layer_step_`` call for the tensors of
>= 4096 elements and one fp32 ``layer_step_`` for the others, each a layer at a time: norm, second moment, update),
with its state as the 8-bit layout allocates it; and rows of ``NovoGrad(state_bits=8, fused=True)`` itself (the same
op behind the optimizer's param groups and buckets) for both maps with stochastic rounding. It moves 18 bytes per
parameter (read g twice, read and write w and the codes) against AdamW's 28 (read g, w, m, v; write w, m, v); its
floor is 18 B/param at the same bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NOVOGRAD_DS_AUTOREGISTER", "0")

import torch  # noqa: E402

BYTES_PER_PARAM = 24
BYTES_PER_PARAM_8BIT = 18  # + 2 x 4/256 for the block scales
BYTES_PER_PARAM_ADAMW = 28
EIGHTBIT_VARIANTS = (("linear", "nearest"), ("linear", "stochastic"), ("sqrt", "nearest"), ("sqrt", "stochastic"))
# the same step through the optimizer itself (param groups, state dict, buckets: its Python overhead included)
OPTIMIZER_8BIT_VARIANTS = (("linear", "stochastic"), ("sqrt", "stochastic"))


class EightBitNovoGrad:
    """NovoGrad with the 8-bit moment on the fused CPU op, the plain path (whole tensors), as the optimizer will
    drive the kernels: per-layer second moments in fp32, 8-bit codes + block scales for tensors of at least
    MIN_QUANTIZED_NUMEL elements, an fp32 exp_avg for the others. Benchmark driver only (no param groups)."""

    def __init__(self, params, *, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.0, qmap="linear",
                 rounding="nearest"):
        from novograd_ds.kernels import eightbit as eb
        from novograd_ds.kernels.native import load_backend

        self.eb, self.backend = eb, load_backend(torch.device("cpu"))
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.q8 = eb.Q8Config(qmap, rounding, seed=0)
        params = list(params)
        self.big = [p for p in params if p.numel() >= eb.MIN_QUANTIZED_NUMEL]
        self.small = [p for p in params if p.numel() < eb.MIN_QUANTIZED_NUMEL]
        self.codes = [torch.zeros(p.numel(), dtype=eb.CODE_DTYPE) for p in self.big]
        self.scales = [torch.zeros(eb.n_blocks(0, p.numel())) for p in self.big]
        self.exp_avg = [torch.zeros_like(p) for p in self.small]
        self.vs = [torch.zeros(()) for _ in params]  # exp_avg_sq of each tensor: big ones first, then small
        self.runs = eb.Q8Runs.plain([p.numel() for p in self.big])
        self.k = 0

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.codes, *self.scales, *self.exp_avg, *self.vs))

    @torch.no_grad()
    def step(self):
        from novograd_ds.optimizer import step_factors

        self.k += 1
        a1, c1, a2, c2 = step_factors(self.k, self.betas[0], self.betas[1], False)
        nb = len(self.big)
        # one call per kind of state, each a layer at a time (norm, v, update): NOTE: [8-bit layer at a time]
        kw = dict(lr=self.lr, a1=a1, c1=c1, a2=a2, c2=c2, eps=self.eps, weight_decay=self.wd, decoupled=False)
        done = self.backend.q8_layer_step_([p.data for p in self.big], [p.grad for p in self.big], self.codes,
                                           self.scales, self.vs[:nb], None, self.runs, q8=self.q8, step=self.k, **kw)
        done = done and self.backend.layer_step_([p.data for p in self.small], [p.grad for p in self.small],
                                                 self.exp_avg, self.vs[nb:], None, **kw)
        assert done, "the fused CPU op did not take the 8-bit step"


def transformer_shapes(target: float) -> list[tuple[int, ...]]:
    d, vocab = 640, 8192
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    while sum(torch.Size(s).numel() for s in shapes) + 12 * d * d < target:
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eightbit", dest="eightbit", action="store_false", help="skip the 8-bit NovoGrad rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from novograd_ds import NovoGrad

    shapes = transformer_shapes(args.params)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"# {n_params / 1e6:.2f}M fp32 params in {len(shapes)} tensors, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, median of {args.steps} round-robin steps")

    rows: dict[str, float] = {}
    notes: list[str] = []
    opts: dict[str, object] = {}

    def add(label, make):
        try:
            opt = make(make_params(shapes))
            for _ in range(3):  # warm-up (and the fused op's build or load)
                opt.step()
            opts[label] = opt
        except Exception as exc:  # a competitor that cannot run here is reported, not fatal
            notes.append(f"{label}: skipped ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]})")

    def fused(params):
        opt = NovoGrad(params, lr=1e-3, weight_decay=1e-3, fused=True)
        opt.step()
        assert opt.backend == "fused", opt.backend
        return opt

    add("novograd_ds fused", fused)
    add("novograd_ds foreach", lambda p: NovoGrad(p, lr=1e-3, weight_decay=1e-3, foreach=True))
    if args.eightbit:
        for qmap, rounding in EIGHTBIT_VARIANTS:
            add(f"novograd_ds fused 8-bit {qmap}/{rounding}",
                lambda p, m=qmap, r=rounding: EightBitNovoGrad(p, lr=1e-3, weight_decay=1e-3, qmap=m, rounding=r))
        for qmap, rounding in OPTIMIZER_8BIT_VARIANTS:
            def q8_optimizer(params, m=qmap, r=rounding):
                opt = NovoGrad(params, lr=1e-3, weight_decay=1e-3, fused=True, state_bits=8, quant_map=m,
                               quant_rounding=r)
                opt.step()
                assert opt.backend == "fused", opt.backend
                return opt

            add(f"NovoGrad(state_bits=8) 8-bit {qmap}/{rounding}", q8_optimizer)
    add("torch AdamW fused=True", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-3, fused=True))

    def ds_cpu_adam(params):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=1e-3, adamw_mode=True)

    add("DeepSpeedCPUAdam", ds_cpu_adam)

    def torch_optimizer_novograd(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch_optimizer

        return torch_optimizer.NovoGrad(params, lr=1e-3, weight_decay=1e-3)

    add("torch-optimizer NovoGrad", torch_optimizer_novograd)
    try:
        from apex.optimizers import FusedNovoGrad  # noqa: F401

        notes.append("apex FusedNovoGrad: importable but CUDA-only; not timed on the CPU")
    except Exception:
        notes.append("apex FusedNovoGrad: not importable (it is CUDA-only anyway)")

    # Round robin: one timed step of each optimizer and one bandwidth probe per round, so load from other
    # processes on a shared machine hits every row alike; medians per row, best bandwidth over all rounds.
    n = 64 << 20  # fp32 elements: 256 MiB per array
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    times: dict[str, list[float]] = {k: [] for k in opts}
    bw, how = 0.0, ""
    for _ in range(args.steps):
        for label, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t0)
        for name, fn, moved in (("add", lambda: torch.add(a, b, out=c), 12 * n), ("add_", lambda: a.add_(b), 12 * n),
                                ("copy", lambda: c.copy_(a), 8 * n)):
            t0 = time.perf_counter()
            fn()
            probe = moved / (time.perf_counter() - t0)
            if probe > bw:
                bw, how = probe, name
    for label in opts:
        rows[label] = statistics.median(times[label])
    floor = BYTES_PER_PARAM * n_params / bw
    rows["bandwidth floor (24 B/param)"] = floor

    width = max(len(k) for k in rows)
    print(f"{'optimizer'.ljust(width)}  step ms")
    for k, v in rows.items():
        print(f"{k.ljust(width)}  {v * 1e3:7.2f}")
    print(f"# best streaming bandwidth {bw / 1e9:.2f} GB/s ({how})")
    for note in notes:
        print(f"# {note}")

    f = rows.get("novograd_ds fused")
    adamw = rows.get("torch AdamW fused=True")
    if f is not None:
        print("ratios (target):")
        if adamw is not None:
            print(f"  fused / AdamW-fused          {f / adamw:.3f}  (<= 0.80)")
        if "torch-optimizer NovoGrad" in rows:
            print(f"  torch-optimizer / fused      {rows['torch-optimizer NovoGrad'] / f:.2f}   (>= 3)")
        print(f"  fused / floor                {f / floor:.3f}  (<= 1.15)")
    eight = [k for k in rows if "8-bit" in k]
    if eight:
        print(f"8-bit NovoGrad ({BYTES_PER_PARAM_8BIT} B/param moved, state "
              f"{opts[eight[0]].state_bytes() / n_params:.3f} B/param; AdamW {BYTES_PER_PARAM_ADAMW} B/param moved, "
              f"state 8 B/param; floor at 18 B/param {BYTES_PER_PARAM_8BIT * n_params / bw * 1e3:.2f} ms):")
        for k in eight:
            name = k.replace("novograd_ds fused 8-bit ", "op ").replace("NovoGrad(state_bits=8) 8-bit ", "NovoGrad ")
            line = f"  {name:26s} {rows[k] * 1e3:7.2f} ms"
            if adamw is not None:
                line += f"   / AdamW-fused {rows[k] / adamw:.3f} (<= 0.70)"
            line += f"   / floor {rows[k] / (BYTES_PER_PARAM_8BIT * n_params / bw):.3f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
