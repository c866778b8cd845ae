"""The multi-tensor backend over ``torch._foreach_*``: one call per operation for a whole list of tensors.

No Python loop over elements and no host/device synchronisation: the per-tensor denominators stay on the
device as 0-dim tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import KernelBackend
from .reference import accumulate_dtype, opmath_dtype


class ForeachBackend(KernelBackend):
    name = "foreach"

    def sq_norms(self, grads: Sequence[Tensor]) -> Tensor:
        if len(grads) == 0:
            return torch.zeros(0)
        grads = list(grads)
        acc = accumulate_dtype(grads)
        big = [i for i, g in enumerate(grads) if g.device.type == "cpu" and g.numel() > _CPU_CHUNK]
        if not big:
            return torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).square()
        # NOTE: [accurate CPU norms] torch's CPU norm kernels accumulate a whole tensor in one fp32 running sum:
        # 3.5e-3 relative error for 25M elements (measured; CUDA's tree reduction is fine). Large CPU tensors are
        # summed in chunks of _CPU_CHUNK elements (fp32 within a chunk, float64 across chunks, as the fused op).
        out = torch.empty(len(grads), dtype=acc)
        small = [i for i in range(len(grads)) if i not in set(big)]
        if small:
            out[small] = torch.stack(torch._foreach_norm([grads[i] for i in small], 2, dtype=acc)).square()
        for i in big:
            out[i] = _chunked_sq_norm(grads[i], acc)
        return out


    def update_(self, params, grads, exp_avgs, denoms, *, lr, beta1, grad_scale, weight_decay, decoupled):
        if len(params) == 0:
            return
        params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
        om = opmath_dtype(params[0].dtype)
        low = params[0].dtype != om
        w = [p.to(om) for p in params] if low else params
        m = [x.to(om) for x in exp_avgs] if low else exp_avgs
        g = [x.to(om) for x in grads] if grads[0].dtype != om else grads
        d = list(denoms.to(om).unbind(0))

        gh = torch._foreach_div(g, d)                        # gh = g / (sqrt(v) + eps)
        if weight_decay != 0 and not decoupled:
            torch._foreach_add_(gh, w, alpha=weight_decay)   # gh = gh + wd*w
        torch._foreach_mul_(m, beta1)                        # m = b1*m + c*gh
        torch._foreach_add_(m, gh, alpha=grad_scale)
        if decoupled and weight_decay != 0:
            torch._foreach_mul_(w, 1.0 - lr * weight_decay)  # w = w - lr*(m + wd*w)
        torch._foreach_add_(w, m, alpha=-lr)
        if low:
            torch._foreach_copy_(params, w)
            torch._foreach_copy_(exp_avgs, m)


_CPU_CHUNK = 1024


def _chunked_sq_norm(g: Tensor, acc: torch.dtype) -> Tensor:
    flat = g.reshape(-1)
    n = flat.numel()
    m = n - n % _CPU_CHUNK
    total = torch.linalg.vector_norm(flat[:m].view(-1, _CPU_CHUNK), 2, dim=1, dtype=acc).double().square().sum()
    if m < n:
        total = total + torch.linalg.vector_norm(flat[m:], 2, dtype=acc).double().square()
    return total.to(acc)
