"""The multi-tensor backend over ``torch._foreach_*``: one call per operation for a whole list of tensors.

No Python loop over elements and no host/device synchronisation: the per-tensor denominators stay on the
device as 0-dim tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import KernelBackend
from . import eightbit as eb
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

    # -- 8-bit state: every run's blocks in one padded [blocks, 256] matrix, no Python loop over blocks ----------
    # (NOTE: [8-bit moment] in eightbit.py; the loop over tensors only builds the index of that matrix)
    def q8_boundary_absmax(self, params, grads, codes, scales, denoms, runs, **scalars):
        return _q8_foreach_boundary(params, grads, codes, scales, denoms, runs, **scalars)

    def q8_update_(self, params, grads, codes, scales, denoms, runs, boundary=None, **scalars):
        _q8_foreach_update(params, grads, codes, scales, denoms, runs, boundary, **scalars)


_CPU_CHUNK = 1024


def _chunked_sq_norm(g: Tensor, acc: torch.dtype) -> Tensor:
    flat = g.reshape(-1)
    n = flat.numel()
    m = n - n % _CPU_CHUNK
    total = torch.linalg.vector_norm(flat[:m].view(-1, _CPU_CHUNK), 2, dim=1, dtype=acc).double().square().sum()
    if m < n:
        total = total + torch.linalg.vector_norm(flat[m:], 2, dtype=acc).double().square()
    return total.to(acc)


class _Q8Geometry:
    """Where each run's elements sit in one padded ``[total_blocks, 256]`` matrix of all runs' blocks."""

    def __init__(self, numels, runs, device):
        self.numels = numels
        self.nbs = [runs.n_blocks(i, n) for i, n in enumerate(numels)]
        self.total_blocks = sum(self.nbs)
        block0, pos, layer_block, bases_idx = 0, [], [], []
        self.first_rows, self.last_rows = [], []  # (block row, run) of partial first / last blocks
        for i, (n, nb) in enumerate(zip(numels, self.nbs)):
            if n == 0:
                continue
            start = runs.starts[i]
            front = start % eb.BLOCK
            pos.append(torch.arange(block0 * eb.BLOCK + front, block0 * eb.BLOCK + front + n))
            layer_block.append(torch.arange(start // eb.BLOCK, start // eb.BLOCK + nb))
            bases_idx.append(torch.full((nb,), i, dtype=torch.long))
            fp, lp = runs.partial_ends(i, n)
            if fp:
                self.first_rows.append((block0, i))
            if lp and not (fp and nb == 1):
                self.last_rows.append((block0 + nb - 1, i))
            block0 += nb
        cat = lambda xs, dt=torch.long: torch.cat(xs).to(device) if xs else torch.zeros(0, dtype=dt, device=device)
        self.pos = cat(pos)                       # padded position of each element, runs concatenated in order
        self.layer_block = cat(layer_block)       # each block row's block index in its layer
        self.block_run = cat(bases_idx)           # each block row's run
        self.device = device

    def pad(self, tensors, dtype) -> Tensor:
        out = torch.zeros(self.total_blocks * eb.BLOCK, dtype=dtype, device=self.device)
        live = [t.reshape(-1) for t, n in zip(tensors, self.numels) if n > 0]
        if live:
            out[self.pos] = torch.cat([t.to(dtype) for t in live])
        return out.view(self.total_blocks, eb.BLOCK)

    def unpad_into(self, padded: Tensor, tensors) -> None:
        vals = padded.reshape(-1).index_select(0, self.pos)
        live = [t for t, n in zip(tensors, self.numels) if n > 0]
        for t, part in zip(live, vals.split([t.numel() for t in live])):
            t.copy_(part.view(t.shape))


def _q8_blocks(geo, params, grads, codes, scales, denoms, q8, scalars):
    """m_new and w_new of every padded block row (pads: g = w = code = 0, so m_new = 0 there)."""
    om = eb.opmath_for_q8(params[0])
    G, W = geo.pad(grads, om), geo.pad(params, om)
    C = geo.pad(codes, eb.CODE_DTYPE)
    live_scales = [s for s, n in zip(scales, geo.numels) if n > 0]
    A_old = torch.cat(live_scales) if live_scales else torch.zeros(0, device=geo.device)
    d = denoms.to(device=geo.device, dtype=om).index_select(0, geo.block_run).unsqueeze(1)
    m_old = eb.dequantize(C, eb.dequant_step(A_old, q8.qmap).unsqueeze(1), q8.qmap)
    return eb.moment_and_weight(W, G, m_old, d, **scalars)


def _q8_foreach_boundary(params, grads, codes, scales, denoms, runs, *, beta1, grad_scale, weight_decay, decoupled,
                         q8):
    numels = eb.check_q8_tensors(params, grads, codes, scales, runs)
    dev = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(numels), 2, dtype=torch.float32, device=dev)
    # only the partial blocks: each one a sub-run of one block, all of them in one padded matrix
    pieces, where = [], []
    for i, n in enumerate(numels):
        start = runs.starts[i]
        first, end = eb.block_range(start, n)
        for col, partial, b in zip((0, 1), runs.partial_ends(i, n), (first, end - 1)):
            if partial:
                lo, hi = max(0, b * eb.BLOCK - start), min(n, (b + 1) * eb.BLOCK - start)
                pieces.append((i, lo, hi, b - first))
                where.append((i, col))
    if not pieces:
        return out
    sub = eb.Q8Runs([runs.starts[i] + lo for i, lo, _, _ in pieces], [runs.layer_numels[i] for i, *_ in pieces],
                    [runs.keys[i] for i, *_ in pieces])
    cut = lambda ts: [ts[i].reshape(-1)[lo:hi] for i, lo, hi, _ in pieces]
    geo = _Q8Geometry([hi - lo for _, lo, hi, _ in pieces], sub, dev)
    scalars = dict(lr=0.0, beta1=beta1, grad_scale=grad_scale, weight_decay=weight_decay, decoupled=decoupled)
    m_new, _ = _q8_blocks(geo, cut(params), cut(grads), cut(codes), [scales[i][j:j + 1] for i, _, _, j in pieces],
                          denoms.index_select(0, torch.tensor([i for i, *_ in pieces], device=denoms.device)), q8,
                          scalars)
    absmax = m_new.abs().amax(dim=1)
    rows, cols = zip(*where)
    out[list(rows), list(cols)] = absmax
    return out


def _q8_foreach_update(params, grads, codes, scales, denoms, runs, boundary=None, *, lr, beta1, grad_scale,
                       weight_decay, decoupled, q8, step):
    numels = eb.check_q8_tensors(params, grads, codes, scales, runs)
    eb.check_boundary(boundary, len(numels), runs.has_partial(numels))
    if not numels or sum(numels) == 0:
        return
    dev = grads[0].device
    geo = _Q8Geometry(numels, runs, dev)
    scalars = dict(lr=lr, beta1=beta1, grad_scale=grad_scale, weight_decay=weight_decay, decoupled=decoupled)
    m_new, w_new = _q8_blocks(geo, params, grads, codes, scales, denoms, q8, scalars)
    absmax = m_new.abs().amax(dim=1)                                  # A = max |m_new| per block
    for col, rows in ((0, geo.first_rows), (1, geo.last_rows)):       # boundary blocks: every rank's max
        if rows:
            r, i = zip(*rows)
            absmax[list(r)] = boundary[list(i), col].to(absmax.device)
    u = None
    if q8.rounding == "stochastic":
        bases = torch.tensor([eb.stream_base(q8.seed, k, step) for k in runs.keys], dtype=torch.long, device=dev)
        index = geo.layer_block.unsqueeze(1) * eb.BLOCK + torch.arange(eb.BLOCK, device=dev)
        u = eb.uniform_at(bases.index_select(0, geo.block_run).unsqueeze(1), index)
    q = eb.quantize(m_new, eb.quant_inv(absmax, q8.qmap).unsqueeze(1), q8.qmap, u)
    geo.unpad_into(q, codes)
    geo.unpad_into(w_new, params)
    live = [s for s, n in zip(scales, numels) if n > 0]
    if live:
        torch._foreach_copy_(live, list(absmax.split([s.numel() for s in live])))

