"""The reference backend: one tensor at a time, in the order the update rule is written.

This is the executable form of the rule in ``novograd_ds/optimizer.py`` (and the README). Faster backends
are tested against it, parameters and state alike. It computes in fp32 (fp64 for fp64 tensors) and writes
results back in each tensor's own dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import KernelBackend


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


class ReferenceBackend(KernelBackend):
    name = "reference"

    def sq_norms(self, grads: Sequence[Tensor]) -> Tensor:
        if len(grads) == 0:
            return torch.zeros(0)
        acc = accumulate_dtype(grads)
        # n = sum(g*g), accumulated in fp32 or wider whatever the grad dtype (no overflow at 65504).
        return torch.stack([g.to(acc).square().sum() for g in grads])

    def update_(self, params, grads, exp_avgs, denoms, *, lr, beta1, grad_scale, weight_decay, decoupled):
        for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
            om = opmath_dtype(p.dtype)
            w = p.to(om)
            gh = g.to(om) / denoms[i].to(om)                 # gh = g / (sqrt(v) + eps)
            if weight_decay != 0 and not decoupled:
                gh = gh + weight_decay * w                   # gh = gh + wd*w
            m_new = beta1 * m.to(om) + grad_scale * gh       # m = b1*m + c*gh (b1=0, c=1 on step 1)
            upd = m_new + weight_decay * w if decoupled else m_new
            p.copy_(w - lr * upd)                            # w = w - lr*m  (or lr*(m + wd*w))
            m.copy_(m_new)
