"""The optimizer's side of 8-bit NovoGrad (``state_bits=8``): which tensors are quantised, their state, and the
blocks that several ranks share. The kernels' side (layout, math, backends) is NOTE: [8-bit moment] in
``kernels/eightbit.py``; this module knows no engine either.

NOTE: [8-bit state] A layer of at least ``MIN_QUANTIZED_NUMEL`` elements keeps its first moment as int8 codes (one
per element this rank holds, ``exp_avg_codes``) and fp32 block scales (one per 256-element block of the layer that
this rank's run touches, ``exp_avg_scales``); smaller layers keep the fp32 ``exp_avg``. The per-layer second moment
is unchanged. Whether a layer is quantised depends on the *layer's* size, never on a rank's piece of it, so every
sharding quantises the same layers as one process.

Blocks are aligned to the layer's element 0, so where an engine cuts a layer between ranks at a position that is not
a multiple of 256, the block around the cut is *shared*: each rank computes the max of ``|m_new|`` over its piece of
it, and one all-reduce MAX gives every rank the block's scale. To reduce them in one buffer that means the same on
every rank, each shared block gets a *slot*: the adapters describe every cut of every layer (``cuts``: all ranks'
piece boundaries, known to all ranks from the partitioning alone), and :class:`SlotMap` numbers the shared blocks of
a set of layers in order. A rank writes the values of its runs' partial blocks into their slots (0 elsewhere: MAX
ignores it), the optimizer all-reduces the vector (batched with every other such vector of the step, one collective
per group), and reads its slots back. ``shared_blocks(numel, cuts)`` is the set of blocks a cut falls strictly inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .kernels import eightbit as eb

__all__ = ["CODES", "SCALES", "SMALL", "Q8_KEYS", "q8_config", "is_quantized", "shared_blocks", "SlotMap",
           "RunGeometry", "check_state_bits"]

CODES, SCALES, SMALL = "exp_avg_codes", "exp_avg_scales", "exp_avg_small"
#: State keys of the 8-bit moment (their dtypes are kept as they are by NovoGrad.load_state_dict).
Q8_KEYS = (CODES, SCALES, SMALL)


def check_state_bits(group: dict[str, Any]) -> None:
    bits = group.get("state_bits", 32)
    if bits not in (8, 32):
        raise ValueError(f"NovoGrad: state_bits={bits!r}; it must be 32 (fp32 first moment) or 8 (blockwise 8-bit)")
    if bits == 8:
        eb.Q8Config(group.get("quant_map") or eb.DEFAULT_MAP, group.get("quant_rounding") or eb.DEFAULT_ROUNDING,
                    int(group.get("quant_seed") or 0))


def q8_config(group: dict[str, Any]) -> Optional[eb.Q8Config]:
    """The group's 8-bit settings, or ``None`` for an fp32 first moment."""
    if group.get("state_bits", 32) != 8:
        return None
    return eb.Q8Config(group.get("quant_map") or eb.DEFAULT_MAP, group.get("quant_rounding") or eb.DEFAULT_ROUNDING,
                       int(group.get("quant_seed") or 0))


def is_quantized(layer_numel: int) -> bool:
    """Whether a layer of this many elements keeps an 8-bit moment (the threshold is by layer, not by piece)."""
    return layer_numel >= eb.MIN_QUANTIZED_NUMEL


def shared_blocks(layer_numel: int, cuts: Sequence[int]) -> list[int]:
    """Blocks of a layer that more than one rank holds a piece of: those a cut falls strictly inside."""
    return sorted({int(c) // eb.BLOCK for c in cuts if 0 < int(c) < layer_numel and int(c) % eb.BLOCK})


@dataclass(frozen=True)
class RunGeometry:
    """Where one rank's run of a layer lies: ``start`` in the layer, the layer's ``numel``, every rank's piece
    boundaries (``cuts``), and the layer's stochastic-rounding ``key``."""

    start: int
    numel: int
    cuts: tuple = ()
    key: int = 0


class SlotMap:
    """Slots for the shared blocks of a sequence of layers, numbered in layer order then block order.

    ``layers``: ``(layer_numel, cuts)`` per layer. :meth:`pair` gives a run's ``(first, last)`` slot, -1 for an end
    whose block no other rank shares.
    """

    def __init__(self, layers: Sequence[tuple[int, Sequence[int]]]):
        self._slot: list[dict[int, int]] = []
        n = 0
        for numel, cuts in layers:
            blocks = shared_blocks(numel, cuts)
            self._slot.append({b: n + i for i, b in enumerate(blocks)})
            n += len(blocks)
        self.n = n

    def pair(self, layer: int, start: int, length: int) -> tuple[int, int]:
        if length <= 0:
            return -1, -1
        slots = self._slot[layer]
        first, end = eb.block_range(start, length)
        return slots.get(first, -1), slots.get(end - 1, -1)

    @staticmethod
    def gather(boundary: Tensor, pairs: Tensor, n: int) -> Tensor:
        """A ``[n]`` fp32 vector with each run's boundary values (``[R, 2]``) in its slots (MAX where two meet)."""
        vec = torch.zeros(n, dtype=torch.float32, device=boundary.device)
        if n == 0 or boundary.numel() == 0:
            return vec
        pairs = pairs.to(boundary.device)
        valid = pairs >= 0
        if bool(valid.any()):
            vec.scatter_reduce_(0, pairs[valid], boundary.to(torch.float32)[valid], reduce="amax")
        return vec

    @staticmethod
    def scatter(vec: Tensor, pairs: Tensor) -> Tensor:
        """``[R, 2]``: each run's slots read back from the all-reduced ``vec`` (0 where a run has no slot)."""
        pairs = pairs.to(vec.device)
        out = torch.zeros(pairs.shape, dtype=torch.float32, device=vec.device)
        valid = pairs >= 0
        if bool(valid.any()):
            out[valid] = vec.index_select(0, pairs[valid])
        return out


def quantize_into(m: Tensor, codes: Tensor, scales: Tensor, geom: RunGeometry, q8: eb.Q8Config,
                  boundary_max: Optional[Tensor] = None) -> None:
    """Quantise an fp32 moment ``m`` (this rank's run) into ``codes``/``scales`` with nearest rounding: used when a
    checkpoint without codes (an fp32 or universal one) is loaded into an 8-bit optimizer. ``boundary_max``: the
    all-reduced max of the run's partial first/last block (``[2]``), or ``None`` when it has none."""
    n = m.numel()
    flat = m.reshape(-1).to(torch.float32)
    first, _ = eb.block_range(geom.start, n)
    idx = torch.arange(n, device=m.device) + geom.start
    blk = torch.div(idx, eb.BLOCK, rounding_mode="floor") - first
    absmax = torch.zeros(scales.numel(), dtype=torch.float32, device=m.device)
    if n:
        absmax.scatter_reduce_(0, blk, flat.abs(), reduce="amax")
    if boundary_max is not None:
        fp, lp = eb.partial_ends(geom.start, n, geom.numel)
        if fp:
            absmax[0] = torch.maximum(absmax[0], boundary_max[0])
        if lp:
            absmax[-1] = torch.maximum(absmax[-1], boundary_max[1])
    inv = eb.quant_inv(absmax, q8.qmap).index_select(0, blk) if n else absmax[:0]
    codes.copy_(eb.quantize(flat, inv, q8.qmap, None).view(codes.shape) if n else codes)
    scales.copy_(absmax)


def dequantize_run(codes: Tensor, scales: Tensor, start: int, qmap: str) -> Tensor:
    """The fp32 moment a run's codes and scales stand for (checkpoint conversion, tests)."""
    n = codes.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    first, _ = eb.block_range(start, n)
    idx = torch.arange(n, device=codes.device) + start
    blk = torch.div(idx, eb.BLOCK, rounding_mode="floor") - first
    step = eb.dequant_step(scales.to(torch.float32), qmap).index_select(0, blk)
    return eb.dequantize(codes.reshape(-1), step, qmap)
