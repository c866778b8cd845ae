"""Elementwise kernels of NovoGrad, one module per backend.

NOTE: [the kernel seam] Every backend implements the same two operations, and nothing else:

``sq_norms(grads) -> Tensor[len(grads)]``
    ``sum(g * g)`` of each tensor, accumulated in fp32 (fp64 when the gradient is fp64), whatever the
    gradient dtype. This is the *local* part of a layer's squared norm; under ZeRO a layer's segments are
    summed per layer and all-reduced by the caller before the second moment is updated.

``update_(params, grads, exp_avgs, denoms, *, lr, beta1, grad_scale, weight_decay, decoupled)``
    for every tensor ``i``, with ``d = denoms[i]`` (the already computed ``sqrt(v) + eps``)::

        gh = g / d
        gh = gh + weight_decay * w          unless decoupled
        m  = beta1 * m + grad_scale * gh
        w  = w - lr * m                     decoupled: w = w - lr * (m + weight_decay * w), w before the step

    ``beta1``/``grad_scale`` are the *step-dependent* factors computed once in Python by
    :func:`novograd_ds.optimizer.step_factors` (``0``/``1`` on a tensor's first step), so kernels never
    see the step count and hold no state.

Each backend also has segment forms (``sq_norms_segments`` / ``update_segments_``) that work on one flat
tensor cut into ``(offset, length, layer)`` segments; the defaults in :class:`KernelBackend` build views and
call the list forms. A native backend overrides them with one call.

8-bit state (NOTE: [8-bit moment] in eightbit.py): the first moment of a tensor or run as int8 ``codes`` (one per
element) and fp32 ``scales`` (one per block of 256 elements of the layer that the run touches). Two more operations,
each with a segment form; ``sq_norms`` and the second moment are unchanged::

    q8_boundary_absmax(params, grads, codes, scales, denoms, runs, *, beta1, grad_scale, weight_decay, decoupled, q8)
        -> fp32 [n, 2]: each run's local max |m_new| over its first and last block where that block is partial
           (0 where it is not). The caller all-reduces it with MAX over the ranks that share blocks.
    q8_update_(params, grads, codes, scales, denoms, runs, boundary, *, lr, beta1, grad_scale, weight_decay,
               decoupled, q8, step)
        dequantise, update m and w (w from the fp32 m_new), new block scales (boundary blocks: the all-reduced
        values in ``boundary``, None when no run has a partial block), quantise. ``q8`` is an
        :class:`eightbit.Q8Config` (map, rounding, seed), ``step`` the layers' step count (stochastic rounding).

``runs`` is an :class:`eightbit.Q8Runs` (per tensor: start in its layer, the layer's size, the layer's key); the
segment forms take an :class:`eightbit.Q8SegmentTable` instead of ``runs``, a flat int8 codes tensor parallel to
the flat parameter, and a flat fp32 scales tensor holding each run's scales at its ``scale_offsets`` entry.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class KernelBackend:
    """Base class of a backend. Subclasses implement :meth:`sq_norms` and :meth:`update_`."""

    name = "abstract"

    def sq_norms(self, grads: Sequence[Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def update_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        denoms: Tensor,
        *,
        lr: float,
        beta1: float,
        grad_scale: float,
        weight_decay: float,
        decoupled: bool,
    ) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- segment forms (one flat tensor, many layers) -------------------------------------------
    def sq_norms_segments(self, flat_grad: Tensor, segments: "SegmentTable", n_layers: int) -> Tensor:
        """Per-layer partial ``sum(g*g)`` over this tensor's segments; layers with no segment get 0."""
        acc = torch.float64 if flat_grad.dtype == torch.float64 else torch.float32
        out = torch.zeros(n_layers, dtype=acc, device=flat_grad.device)
        if len(segments):
            views = segments.views(flat_grad)
            out.index_add_(0, segments.layer_index(flat_grad.device), self.sq_norms(views).to(acc))
        return out

    def update_segments_(
        self,
        flat_param: Tensor,
        flat_grad: Tensor,
        flat_exp_avg: Tensor,
        segments: "SegmentTable",
        layer_denoms: Tensor,
        **scalars,
    ) -> None:
        """:meth:`update_` on every segment, each divided by its layer's denominator."""
        if not len(segments):
            return
        denoms = layer_denoms.index_select(0, segments.layer_index(layer_denoms.device))
        self.update_(
            segments.views(flat_param),
            segments.views(flat_grad),
            segments.views(flat_exp_avg),
            denoms,
            **scalars,
        )


    # -- 8-bit state (NOTE: [8-bit moment] in eightbit.py) ------------------------------------------------
    def q8_boundary_absmax(self, params, grads, codes, scales, denoms, runs, *, beta1, grad_scale, weight_decay,
                           decoupled, q8) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"the {self.name} backend has no 8-bit state")

    def q8_update_(self, params, grads, codes, scales, denoms, runs, boundary=None, *, lr, beta1, grad_scale,
                   weight_decay, decoupled, q8, step) -> None:  # pragma: no cover - interface
        raise NotImplementedError(f"the {self.name} backend has no 8-bit state")

    def q8_boundary_absmax_segments(self, flat_param, flat_grad, flat_codes, flat_scales, table, layer_denoms,
                                    **scalars) -> Tensor:
        """:meth:`q8_boundary_absmax` on every run of a :class:`eightbit.Q8SegmentTable`: fp32 ``[len(table), 2]``."""
        if not len(table):
            return torch.zeros(0, 2, dtype=torch.float32, device=flat_param.device)
        denoms = layer_denoms.index_select(0, table.layer_index(layer_denoms.device))
        return self.q8_boundary_absmax(table.views(flat_param), table.views(flat_grad), table.views(flat_codes),
                                       table.scale_views(flat_scales), denoms, table.runs, **scalars)

    def q8_update_segments_(self, flat_param, flat_grad, flat_codes, flat_scales, table, layer_denoms,
                            boundary=None, **scalars) -> None:
        """:meth:`q8_update_` on every run of a :class:`eightbit.Q8SegmentTable`."""
        if not len(table):
            return
        denoms = layer_denoms.index_select(0, table.layer_index(layer_denoms.device))
        self.q8_update_(table.views(flat_param), table.views(flat_grad), table.views(flat_codes),
                        table.scale_views(flat_scales), denoms, table.runs, boundary, **scalars)


class SegmentTable:
    """Which elements of one flat tensor belong to which layer: rows of ``(offset, length, layer)``.

    Segments are disjoint and lie inside the flat tensor; elements covered by no segment (ZeRO padding,
    alignment gaps) are never read or written by a kernel.
    """

    def __init__(self, offsets: Sequence[int], lengths: Sequence[int], layers: Sequence[int],
                 starts: Optional[Sequence[int]] = None):
        if not (len(offsets) == len(lengths) == len(layers)):
            raise ValueError("SegmentTable: offsets, lengths and layers must have the same length")
        self.offsets = [int(o) for o in offsets]
        self.lengths = [int(n) for n in lengths]
        self.layers = [int(k) for k in layers]
        #: where each segment starts in its layer (flattened), when the engine adapter knows it (8-bit state needs it)
        self.starts = None if starts is None else [int(s) for s in starts]
        if self.starts is not None and len(self.starts) != len(self.offsets):
            raise ValueError("SegmentTable: starts must have one entry per segment")
        self._index_cache: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __repr__(self) -> str:
        rows = ", ".join(f"({o}, {n}, {k})" for o, n, k in zip(self.offsets, self.lengths, self.layers))
        return f"SegmentTable[(offset, length, layer): {rows}]"

    def views(self, flat: Tensor) -> list[Tensor]:
        """The segments as 1-D views of ``flat`` (offsets count elements: a whole-tensor layout of a 2-D tensor has
        one segment of its numel). ``flat`` must be contiguous, so the views alias it and writes go through."""
        if flat.dim() != 1:
            if not flat.is_contiguous():
                raise ValueError("SegmentTable.views: the tensor must be contiguous (its segments are views of it)")
            flat = flat.view(-1)
        return [flat.narrow(0, o, n) for o, n in zip(self.offsets, self.lengths)]

    def layer_index(self, device) -> Tensor:
        device = torch.device(device)
        idx = self._index_cache.get(device)
        if idx is None:
            idx = torch.tensor(self.layers, dtype=torch.long, device=device)
            self._index_cache[device] = idx
        return idx

    def as_tensor(self) -> Tensor:
        """``int64 [n_segments, 3]`` on the CPU, the form native ops take."""
        return torch.tensor(list(zip(self.offsets, self.lengths, self.layers)), dtype=torch.int64).reshape(-1, 3)
