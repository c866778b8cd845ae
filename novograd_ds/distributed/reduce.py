"""Combining per-layer partial squared norms across ranks.

NOTE: [the collective contract] For every bound flat tensor, every rank of the flat's data-parallel group calls
:func:`reduce_layer_sq` exactly once per optimizer step, in the same order (DeepSpeed steps flats in group /
sub-group order on every rank, and skips overflowing steps on every rank), with a vector of the same length
(the flat's ``n_layers``), even when the rank holds no segment of some or all layers. The decision to reduce
never depends on the local segments. One ``all_reduce(SUM)`` per flat per step.

Tensor parallelism (issue 6) adds a second reduction: after the data-parallel SUM, layers marked in
``layout.tp_mask`` (split across tensor-parallel ranks) are summed again over ``layout.tp_group`` (one more
collective per flat, on every TP rank; NOTE: [tensor-parallel layer norms] in tp.py).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from .layout import FlatLayout

__all__ = ["reduce_layer_sq"]


def reduce_layer_sq(partial: Tensor, layout: FlatLayout) -> Tensor:
    """Sum the per-layer partial ``sum(g*g)`` over the layout's data-parallel group; returns the full norms."""
    full = partial
    if layout.group is not None:
        device = layout.comm_device if layout.comm_device is not None else partial.device
        buf = partial if partial.device == device else partial.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=layout.group)
        full = buf if buf.device == partial.device else buf.to(partial.device)
    if layout.tp_group is not None and layout.tp_mask is not None:
        # tensor parallelism (issue 6): TP-split layers summed again over the TP group; see distributed/tp.py
        from .tp import masked_tp_all_reduce

        full = masked_tp_all_reduce(full, layout.tp_mask, layout.tp_group, device=layout.comm_device)
    return full


def reduce_layer_max(values: Tensor, layout: FlatLayout) -> Tensor:
    """All-reduce MAX over the layout's group (used to restore per-layer values after a checkpoint load)."""
    if layout.group is None:
        return values
    device = layout.comm_device if layout.comm_device is not None else values.device
    buf = values.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=layout.group)
    return buf.to(values.device)
