"""ZeRO's segment recipes for flat partitions: pure arithmetic, no DeepSpeed import and no process group.

A ZeRO wrapper concatenates a param group's tensors ("layers") into one flat buffer, possibly reordered and with
alignment gaps, pads it, and gives rank ``r`` the slice ``[r*psz, (r+1)*psz)``. The rank's fp32 master partition is
the flat tensor its inner optimizer steps. The functions below turn that description into a
:class:`~novograd_ds.kernels.SegmentTable` of ``(offset in the partition, length, layer)`` rows: the elements of the
partition that belong to each layer. Elements in no segment (padding, gaps) are never read or written.
"""

from __future__ import annotations

from typing import Sequence

from ..kernels import SegmentTable

__all__ = ["zero12_segments", "zero3_segments", "contiguous_segments", "zero12_cuts", "zero3_cuts"]


def zero12_segments(flat_offsets: Sequence[int], numels: Sequence[int], layers: Sequence[int], *,
                    rank: int, partition_size: int) -> SegmentTable:
    """Segments of rank ``rank``'s partition ``[rank*psz, (rank+1)*psz)`` of a flat buffer.

    ``flat_offsets[j]``/``numels[j]``/``layers[j]``: where tensor ``j`` (in flat order) starts in the whole flat
    buffer, its element count and its layer index. Offsets may leave gaps (alignment) but must not overlap.
    """
    if partition_size < 0 or rank < 0:
        raise ValueError(f"zero12_segments: bad rank={rank} or partition_size={partition_size}")
    start, end = rank * partition_size, (rank + 1) * partition_size
    offs, lens, lays, starts = [], [], [], []
    for off, n, layer in zip(flat_offsets, numels, layers):
        lo, hi = max(int(off), start), min(int(off) + int(n), end)
        if lo < hi:
            offs.append(lo - start)
            lens.append(hi - lo)
            lays.append(int(layer))
            starts.append(lo - int(off))
    order = sorted(range(len(offs)), key=offs.__getitem__)
    return SegmentTable([offs[i] for i in order], [lens[i] for i in order], [lays[i] for i in order],
                        [starts[i] for i in order])


def zero12_cuts(flat_offsets: Sequence[int], numels: Sequence[int], layers: Sequence[int], *, world: int,
                partition_size: int, n_layers: int) -> list[list[int]]:
    """For each layer, where the partition edges ``e * psz`` (0 < e < world) cut it (positions in the layer): the
    same on every rank, for the 8-bit moment's shared blocks (NOTE: [8-bit state] in quantized.py)."""
    cuts: list[list[int]] = [[] for _ in range(n_layers)]
    for off, n, layer in zip(flat_offsets, numels, layers):
        off, n = int(off), int(n)
        for e in range(1, world):
            edge = e * partition_size
            if off < edge < off + n:
                cuts[int(layer)].append(edge - off)
    return cuts


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
    offs, lens, lays, starts = [], [], [], []
    off = 0
    for k, (psz, numel) in enumerate(zip(partition_numels, full_numels)):
        valid = max(0, min(int(psz), int(numel) - rank * int(psz)))
        if valid:
            offs.append(off)
            lens.append(valid)
            lays.append(k)
            starts.append(rank * int(psz))
        off += int(psz)
    return SegmentTable(offs, lens, lays, starts)


def zero3_cuts(partition_numels: Sequence[int], full_numels: Sequence[int], *, world: int) -> list[list[int]]:
    """For each tensor of a ZeRO-3 sub-group, where its per-rank partitions cut it: ``e * psz`` for 0 < e < world."""
    return [[e * int(psz) for e in range(1, world) if e * int(psz) < int(numel)]
            for psz, numel in zip(partition_numels, full_numels)]
