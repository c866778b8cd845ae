"""Segment computation for flat partitions: pure arithmetic, no DeepSpeed and no process group.

A ZeRO wrapper concatenates a param group's tensors ("layers") into one flat buffer, possibly reordered and with
alignment gaps, pads it, and gives rank ``r`` the slice ``[r*psz, (r+1)*psz)``. The rank's fp32 master partition is
the flat tensor its inner optimizer steps. The functions below turn that description into a
:class:`~novograd_ds.kernels.SegmentTable` of ``(offset in the partition, length, layer)`` rows: the elements of the
partition that belong to each layer. Elements in no segment (padding, gaps) are never read or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..kernels import SegmentTable

__all__ = ["FlatLayout", "zero12_segments", "zero3_segments", "contiguous_segments", "whole_tensor_layout",
           "expand_layer_values", "compact_layer_values"]


def zero12_segments(flat_offsets: Sequence[int], numels: Sequence[int], layers: Sequence[int], *,
                    rank: int, partition_size: int) -> SegmentTable:
    """Segments of rank ``rank``'s partition ``[rank*psz, (rank+1)*psz)`` of a flat buffer.

    ``flat_offsets[j]``/``numels[j]``/``layers[j]``: where tensor ``j`` (in flat order) starts in the whole flat
    buffer, its element count and its layer index. Offsets may leave gaps (alignment) but must not overlap.
    """
    if partition_size < 0 or rank < 0:
        raise ValueError(f"zero12_segments: bad rank={rank} or partition_size={partition_size}")
    start, end = rank * partition_size, (rank + 1) * partition_size
    offs, lens, lays = [], [], []
    for off, n, layer in zip(flat_offsets, numels, layers):
        lo, hi = max(int(off), start), min(int(off) + int(n), end)
        if lo < hi:
            offs.append(lo - start)
            lens.append(hi - lo)
            lays.append(int(layer))
    order = sorted(range(len(offs)), key=offs.__getitem__)
    return SegmentTable([offs[i] for i in order], [lens[i] for i in order], [lays[i] for i in order])


def contiguous_segments(numels: Sequence[int], *, rank: int, partition_size: int) -> SegmentTable:
    """:func:`zero12_segments` for tensors packed back to back in layer order (BF16_Optimizer)."""
    offsets, acc = [], 0
    for n in numels:
        offsets.append(acc)
        acc += int(n)
    return zero12_segments(offsets, numels, range(len(numels)), rank=rank, partition_size=partition_size)


def zero3_segments(partition_numels: Sequence[int], full_numels: Sequence[int], *, rank: int) -> SegmentTable:
    """Segments of a ZeRO-3 sub-group's fp32 flat on rank ``rank``.

    ZeRO-3 partitions each tensor on its own: tensor ``k`` (``full_numels[k]`` elements, padded to a multiple of the
    world size) gives each rank ``partition_numels[k]`` elements, of which rank ``r`` holds the valid ones
    ``[r*psz, min((r+1)*psz, numel))``; the sub-group's flat is the concatenation of these partitions.
    """
    offs, lens, lays = [], [], []
    off = 0
    for k, (psz, numel) in enumerate(zip(partition_numels, full_numels)):
        valid = max(0, min(int(psz), int(numel) - rank * int(psz)))
        if valid:
            offs.append(off)
            lens.append(valid)
            lays.append(k)
        off += int(psz)
    return SegmentTable(offs, lens, lays)


@dataclass
class FlatLayout:
    """Everything NovoGrad needs to step one flat tensor as a set of layer slices.

    ``group`` is the process group whose ranks hold the other slices of the same layers (``None``: nothing to
    reduce, the tensor holds whole layers). ``comm_device`` is where the reduction vector must live for that group's
    backend. ``tp_mask``/``tp_group``: the seam for tensor parallelism (issue 6): layers whose gradient is split
    across the tensor-parallel group would get a second SUM over ``tp_group``; not implemented yet, so a layout
    with ``tp_mask`` set is refused at reduce time.
    """

    segments: SegmentTable
    n_layers: int
    numel: int
    group: Any = None
    comm_device: Optional[torch.device] = None
    tp_mask: Optional[Tensor] = None
    tp_group: Any = None
    label: str = ""
    tensor: Any = field(default=None, repr=False)  # the flat tensor itself, so its id() stays unique while bound
    layer_params: Any = field(default=None, repr=False)  # the model tensor of each layer index (for inspection)

    def __post_init__(self):
        for o, n, k in zip(self.segments.offsets, self.segments.lengths, self.segments.layers):
            if o < 0 or n <= 0 or o + n > self.numel or not 0 <= k < self.n_layers:
                raise ValueError(f"FlatLayout {self.label}: segment ({o}, {n}, {k}) outside a flat of {self.numel} "
                                 f"elements with {self.n_layers} layers")


def whole_tensor_layout(tensor: Tensor, label: str = "") -> FlatLayout:
    """One tensor that is one whole layer (FP16_UnfusedOptimizer's fp32 clones): no reduction."""
    n = tensor.numel()
    return FlatLayout(SegmentTable([0] if n else [], [n] if n else [], [0] if n else []), 1, n, label=label,
                      tensor=tensor)


def expand_layer_values(values: Tensor, segments: SegmentTable, numel: int) -> Tensor:
    """A flat tensor of ``numel`` elements with each segment filled with its layer's value; elsewhere 0."""
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    for o, n, k in zip(segments.offsets, segments.lengths, segments.layers):
        out.narrow(0, o, n).fill_(values[k])
    return out


def compact_layer_values(flat: Tensor, segments: SegmentTable, n_layers: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`expand_layer_values`: ``(values, present)``, one entry per layer.

    ``values[k]`` is the first element of layer ``k``'s first local segment; ``present[k]`` says whether this
    rank holds any segment of layer ``k`` (else ``values[k]`` is 0 and another rank must supply it).
    """
    values = torch.zeros(n_layers, dtype=flat.dtype, device=flat.device)
    present = torch.zeros(n_layers, dtype=torch.bool, device=flat.device)
    flat = flat.reshape(-1)
    for o, _, k in zip(segments.offsets, segments.lengths, segments.layers):
        if not present[k]:
            values[k] = flat[o]
            present[k] = True
    return values, present
