"""Worst relative error of each backend against the float64 rule and against torch-optimizer's NovoGrad.

Runs the trajectory of tests/test_optimizer.py (five layers whose gradient scales span six orders of magnitude,
one that skips steps, one that starts late; 12 steps) for every flag combination and betas of that test, and
prints, per backend and dtype, the largest ``max|w - w_ref| / max|w_ref|`` over layers and cases (and the same
for ``exp_avg`` and ``exp_avg_sq``). torch-optimizer is compared in fp32 with grad_averaging off (the one setting
where it follows the same rule).

    python benchmarks/accuracy.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_optimizer import BETAS, FLAGS, STEPS, make_grads, make_params, run_beside_rule  # noqa: E402

from novograd_ds import NovoGrad  # noqa: E402
from novograd_ds.kernels.native import NativeOpUnavailable  # noqa: E402

BACKENDS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def against_rule(backend: str, dtype: torch.dtype) -> dict[str, float] | None:
    worst = {"w": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for flags, betas in itertools.product(FLAGS, BETAS):
        params = make_params(dtype)
        try:
            opt = NovoGrad(params, lr=0.01, betas=betas, eps=1e-8, weight_decay=0.01, **flags, **BACKENDS[backend])
            ref = run_beside_rule(opt, params, dtype, betas, flags)
        except NativeOpUnavailable:
            return None
        for i, p in enumerate(params):
            worst["w"] = max(worst["w"], rel(p.detach(), ref.w[i]))
            worst["exp_avg"] = max(worst["exp_avg"], rel(opt.state[p]["exp_avg"], ref.state[i]["m"]))
            worst["exp_avg_sq"] = max(worst["exp_avg_sq"], rel(opt.state[p]["exp_avg_sq"],
                                                               torch.tensor(ref.state[i]["v"], dtype=torch.float64)))
    return worst


def against_torch_optimizer(backend: str) -> dict[str, float] | None:
    import torch_optimizer

    worst = {"w": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for amsgrad, wd in itertools.product([False, True], [0.0, 0.01]):
        ours_p, theirs_p = make_params(torch.float32), make_params(torch.float32)
        hp = dict(lr=0.01, betas=(0.95, 0.98), eps=1e-8, weight_decay=wd, amsgrad=amsgrad)
        ours = NovoGrad(ours_p, **hp, **BACKENDS[backend])
        theirs = torch_optimizer.NovoGrad(theirs_p, grad_averaging=False, **hp)
        try:
            for step in range(1, STEPS + 1):
                for a, b, g in zip(ours_p, theirs_p, make_grads(step, torch.float32)):
                    a.grad = None if g is None else g.clone()
                    b.grad = None if g is None else g.clone()
                ours.step()
                theirs.step()
        except NativeOpUnavailable:
            return None
        for a, b in zip(ours_p, theirs_p):
            worst["w"] = max(worst["w"], rel(a.detach(), b.detach()))
            worst["exp_avg"] = max(worst["exp_avg"], rel(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"]))
            worst["exp_avg_sq"] = max(worst["exp_avg_sq"], rel(ours.state[a]["exp_avg_sq"],
                                                               theirs.state[b]["exp_avg_sq"]))
    return worst


def main() -> int:
    print(f"# worst max|x - x_ref| / max|x_ref| over layers and cases ({len(FLAGS) * len(BETAS)} flag/beta cases, "
          f"{STEPS} steps); '-' = the backend refuses that dtype")
    print(f"{'backend':<10} {'reference':<22} {'dtype':<9} {'w':>10} {'exp_avg':>10} {'exp_avg_sq':>11}")
    for backend in BACKENDS:
        for dtype in DTYPES:
            r = against_rule(backend, dtype)
            name = str(dtype).split(".")[-1]
            if r is None:
                print(f"{backend:<10} {'float64 rule':<22} {name:<9} {'-':>10} {'-':>10} {'-':>11}")
            else:
                print(f"{backend:<10} {'float64 rule':<22} {name:<9} {r['w']:>10.2e} {r['exp_avg']:>10.2e} "
                      f"{r['exp_avg_sq']:>11.2e}")
        r = against_torch_optimizer(backend)
        if r is not None:
            print(f"{backend:<10} {'torch-optimizer (fp32)':<22} {'float32':<9} {r['w']:>10.2e} {r['exp_avg']:>10.2e} "
                  f"{r['exp_avg_sq']:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
