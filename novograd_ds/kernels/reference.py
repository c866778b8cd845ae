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
from . import eightbit as eb


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

    # -- 8-bit state: one tensor at a time, blocks found by index arithmetic (NOTE: [8-bit moment]) ----------
    @staticmethod
    def _q8_moment(i, p, g, c, s, denoms, runs, lo, hi, q8, **scalars):
        """m_new and w_new of elements [lo, hi) of run i (fp32), and their blocks' indices in the run's scales."""
        start = runs.starts[i]
        first = start // eb.BLOCK
        idx = torch.arange(start + lo, start + hi, device=g.device)
        blk = idx // eb.BLOCK - first
        om = eb.opmath_for_q8(p)
        m_old = eb.dequantize(c[lo:hi], eb.dequant_step(s, q8.qmap).index_select(0, blk), q8.qmap)
        m_new, w_new = eb.moment_and_weight(p[lo:hi].to(om), g[lo:hi].to(om), m_old, denoms[i].to(om), **scalars)
        return m_new, w_new, idx, blk

    def q8_boundary_absmax(self, params, grads, codes, scales, denoms, runs, *, beta1, grad_scale, weight_decay,
                           decoupled, q8):
        numels = eb.check_q8_tensors(params, grads, codes, scales, runs)
        out = torch.zeros(len(numels), 2, dtype=torch.float32, device=grads[0].device if grads else "cpu")
        scalars = dict(lr=0.0, beta1=beta1, grad_scale=grad_scale, weight_decay=weight_decay, decoupled=decoupled)
        for i, (p, g, c, s, n) in enumerate(zip(params, grads, codes, scales, numels)):
            p, g, c = p.reshape(-1), g.reshape(-1), c.reshape(-1)
            fp, lp = runs.partial_ends(i, n)
            start = runs.starts[i]
            first, end = eb.block_range(start, n)
            for col, partial, b in ((0, fp, first), (1, lp, end - 1)):
                if partial:  # the run's elements in layer block b
                    lo, hi = max(0, b * eb.BLOCK - start), min(n, (b + 1) * eb.BLOCK - start)
                    m_new = self._q8_moment(i, p, g, c, s, denoms, runs, lo, hi, q8, **scalars)[0]
                    out[i, col] = m_new.abs().max()
        return out

    def q8_update_(self, params, grads, codes, scales, denoms, runs, boundary=None, *, lr, beta1, grad_scale,
                   weight_decay, decoupled, q8, step):
        numels = eb.check_q8_tensors(params, grads, codes, scales, runs)
        eb.check_boundary(boundary, len(numels), runs.has_partial(numels))
        scalars = dict(lr=lr, beta1=beta1, grad_scale=grad_scale, weight_decay=weight_decay, decoupled=decoupled)
        for i, (p, g, c, s, n) in enumerate(zip(params, grads, codes, scales, numels)):
            if n == 0:
                continue
            pf, gf, cf = p.reshape(-1), g.reshape(-1), c.reshape(-1)
            m_new, w_new, idx, blk = self._q8_moment(i, pf, gf, cf, s, denoms, runs, 0, n, q8, **scalars)
            absmax = torch.zeros(s.numel(), dtype=torch.float32, device=s.device)
            absmax.scatter_reduce_(0, blk, m_new.abs(), reduce="amax")   # A = max |m_new| per block
            fp, lp = runs.partial_ends(i, n)
            if fp:
                absmax[0] = boundary[i, 0]                                 # boundary blocks: every rank's max
            if lp and not (fp and s.numel() == 1):
                absmax[-1] = boundary[i, 1]
            inv = eb.quant_inv(absmax, q8.qmap).index_select(0, blk)
            u = eb.uniform(q8.seed, runs.keys[i], step, idx) if q8.rounding == "stochastic" else None
            c.copy_(eb.quantize(m_new, inv, q8.qmap, u).view(c.shape))
            s.copy_(absmax)
            p.copy_(w_new.view(p.shape))
