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
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .kernels import eightbit as eb

__all__ = ["CODES", "SCALES", "SMALL", "Q8_KEYS", "q8_config", "is_quantized", "shared_blocks", "SlotMap",
           "RunGeometry", "check_state_bits", "FlatQ8", "dequantize_flat_fragment", "run_boundary_max"]

CODES, SCALES, SMALL = "exp_avg_codes", "exp_avg_scales", "exp_avg_small"
#: State keys of the 8-bit moment (their dtypes are kept as they are by NovoGrad.load_state_dict).
Q8_KEYS = (CODES, SCALES, SMALL)


def check_state_bits(group: dict[str, Any]) -> None:
    bits = group.get("state_bits", 32)
    if bits not in (8, 32):
        raise ValueError(f"NovoGrad: state_bits={bits!r}; it must be 32 (fp32 first moment) or 8 (blockwise 8-bit)")
    if bits == 8:
        # the defaults are resolved into the group, so a checkpoint records the map its codes are in
        group["quant_map"] = group.get("quant_map") or eb.DEFAULT_MAP
        group["quant_rounding"] = group.get("quant_rounding") or eb.DEFAULT_ROUNDING
        eb.Q8Config(group["quant_map"], group["quant_rounding"], int(group.get("quant_seed") or 0))


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


def run_boundary_max(m: Tensor, start: int, layer_numel: int) -> Tensor:
    """``[2]`` fp32: max ``|m|`` over the run's partial first / last block (0 for an end that is not partial), where a
    run ``m`` (this rank's piece of a layer, starting at ``start``) shares blocks with other ranks."""
    flat = m.reshape(-1).to(torch.float32)
    n = flat.numel()
    out = torch.zeros(2, dtype=torch.float32, device=flat.device)
    first, end = eb.block_range(start, n)
    fp, lp = eb.partial_ends(start, n, layer_numel)
    if fp:
        out[0] = flat[: min(n, (first + 1) * eb.BLOCK - start)].abs().max()
    if lp:
        out[1] = flat[max(0, (end - 1) * eb.BLOCK - start):].abs().max()
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


# -- bound flat tensors (ZeRO partitions) ----------------------------------------------------------------------------
class FlatQ8:
    """The 8-bit geometry of one bound flat tensor (a ZeRO partition, :class:`~novograd_ds.sharding.FlatLayout`).

    NOTE: [8-bit flats] A flat holds segments of many layers. The segments of quantised layers are the rows of
    :attr:`table` (a :class:`~novograd_ds.kernels.eightbit.Q8SegmentTable`): their codes live in an int8 tensor
    parallel to the flat (``exp_avg_codes``; elements of other layers are never read), their block scales packed
    in row order in ``exp_avg_scales``. The segments of small layers keep an fp32 moment packed in segment order in
    ``exp_avg_small`` (:attr:`small_rows`: ``(offset, length, small_offset)``), stepped through the list-form kernels.
    Shared blocks get slots over the flat's layers from the layout's ``layer_cuts`` (the same on every rank), so the
    boundary values of a step are one vector of :attr:`n_slots` floats, all-reduced MAX over the layout's groups.
    """

    def __init__(self, layout: Any):
        if not layout.has_run_geometry:
            raise ValueError(
                f"NovoGrad(state_bits=8): {layout.label or 'a bound flat tensor'} comes from an engine adapter that does "
                "not describe where its segments lie in their layers, so its 8-bit blocks could not be shared between "
                "ranks. Use state_bits=32 with this engine")
        seg = layout.segments
        numels = [int(n) for n in layout.layer_numels]
        keys = list(layout.layer_keys) if layout.layer_keys is not None else list(range(layout.n_layers))
        self.q_rows = [j for j, k in enumerate(seg.layers) if is_quantized(numels[k])]
        self.s_rows = [j for j, k in enumerate(seg.layers) if not is_quantized(numels[k])]
        self.table = eb.Q8SegmentTable([seg.offsets[j] for j in self.q_rows], [seg.lengths[j] for j in self.q_rows],
                                       [seg.layers[j] for j in self.q_rows], [seg.starts[j] for j in self.q_rows],
                                       [numels[seg.layers[j]] for j in self.q_rows],
                                       [keys[seg.layers[j]] for j in self.q_rows])
        self.small_rows, total = [], 0
        for j in self.s_rows:
            self.small_rows.append((seg.offsets[j], seg.lengths[j], total))
            total += seg.lengths[j]
        self.small_numel = total
        self.small_layers = [seg.layers[j] for j in self.s_rows]
        per_layer = [(numels[k], layout.layer_cuts[k] if is_quantized(numels[k]) else ()) for k in range(layout.n_layers)]
        slots = SlotMap(per_layer)
        self.n_slots = slots.n
        self.slot_layers = [k for k, (n, cuts) in enumerate(per_layer) for _ in shared_blocks(n, cuts)]
        self.pairs = torch.tensor([slots.pair(seg.layers[j], seg.starts[j], seg.lengths[j]) for j in self.q_rows],
                                  dtype=torch.long).reshape(-1, 2)
        self.reductions = tuple(
            type(r)(r.group, None if r.layers is None else r.layers[torch.tensor(self.slot_layers, dtype=torch.long)],
                    r.label) for r in layout.reductions)
        self._subsets: dict[bytes, tuple[list[int], eb.Q8SegmentTable, list[int]]] = {}

    def subset(self, mask: Optional[Tensor]) -> tuple[list[int], eb.Q8SegmentTable, list[int]]:
        """For the layers ``mask`` selects (``None``: all): the table's row indices, their table (same scales), and
        the indices into :attr:`small_rows`."""
        if mask is None:
            return list(range(len(self.q_rows))), self.table, list(range(len(self.s_rows)))
        key = bytes(mask.numpy().tobytes())
        hit = self._subsets.get(key)
        if hit is None:
            rows = [i for i, k in enumerate(self.table.layers) if bool(mask[k])]
            small = [i for i, k in enumerate(self.small_layers) if bool(mask[k])]
            if len(self._subsets) > 1024:
                self._subsets.clear()
            hit = self._subsets[key] = (rows, self.table.select(rows), small)
        return hit

    def small_views(self, flat: Tensor, small: Tensor, which: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Views of the flat (param or grad) and of the packed small moment for the small rows ``which``."""
        rows = [self.small_rows[i] for i in which]
        return ([flat.narrow(0, o, n) for o, n, _ in rows], [small.narrow(0, s, n) for _, n, s in rows])

    def new_state(self, p: Tensor) -> dict[str, Tensor]:
        return {CODES: torch.zeros(p.shape, dtype=eb.CODE_DTYPE, device=p.device),
                SCALES: torch.zeros(self.table.n_scales, dtype=torch.float32, device=p.device),
                SMALL: torch.zeros(self.small_numel, dtype=torch.float32, device=p.device)}

    def index(self, qmap: str) -> dict[str, Any]:
        """What a reader needs to turn saved codes, scales and small moments back into a per-element moment."""
        t = self.table
        rows = torch.tensor([t.offsets, t.lengths, t.runs.starts, t.scale_offsets], dtype=torch.int64).reshape(4, -1)
        small = torch.tensor([[o for o, _, _ in self.small_rows], [n for _, n, _ in self.small_rows],
                              [s for _, _, s in self.small_rows]], dtype=torch.int64).reshape(3, -1)
        return {"map": qmap, "rows": rows, "small": small}

    def check_saved(self, scales: Tensor, small: Tensor, where: str) -> None:
        if scales.numel() != self.table.n_scales or small.numel() != self.small_numel:
            raise ValueError(
                f"NovoGrad: {where}: the saved 8-bit state has {scales.numel()} block scales and {small.numel()} small-"
                f"layer moments; this partition needs {self.table.n_scales} and {self.small_numel}: the checkpoint "
                "was written for another partitioning. Convert it with python -m novograd_ds.universal and load it "
                "with \"checkpoint\": {\"load_universal\": true}")

    def quantize(self, m: Tensor, state: dict[str, Tensor], q8: eb.Q8Config,
                 reduce_max: Optional[Callable[[Tensor], Tensor]]) -> None:
        """Codes, scales and small moments from an fp32 per-element moment ``m`` of the flat (a 32-bit or universal
        checkpoint loaded into ``state_bits=8``), nearest rounding. ``reduce_max`` all-reduces the slot vector (MAX
        over the layout's groups): collective, called on every rank whenever :attr:`n_slots` is not 0."""
        m = m.reshape(-1).to(torch.float32)
        t = self.table
        boundary = torch.zeros(len(t), 2, dtype=torch.float32)
        for r, (o, n) in enumerate(zip(t.offsets, t.lengths)):
            boundary[r] = run_boundary_max(m.narrow(0, o, n), t.runs.starts[r], t.runs.layer_numels[r]).cpu()
        if self.n_slots:
            vec = reduce_max(SlotMap.gather(boundary, self.pairs, self.n_slots))
            boundary = SlotMap.scatter(vec.to("cpu"), self.pairs)
        codes, scales = state[CODES].reshape(-1), state[SCALES]
        for r, (o, n) in enumerate(zip(t.offsets, t.lengths)):
            start = t.runs.starts[r]
            geom = RunGeometry(start, t.runs.layer_numels[r])
            quantize_into(m.narrow(0, o, n), codes.narrow(0, o, n),
                          scales.narrow(0, t.scale_offsets[r], eb.n_blocks(start, n)), geom, q8,
                          boundary[r].to(m.device))
        for o, n, s in self.small_rows:
            state[SMALL].narrow(0, s, n).copy_(m.narrow(0, o, n))

    def dequantize(self, state: Mapping[str, Tensor], qmap: str, numel: int) -> Tensor:
        """The fp32 per-element moment the 8-bit state stands for (elements in no segment 0)."""
        return dequantize_flat_fragment(state[CODES].reshape(-1), state[SCALES], state[SMALL], self.index(qmap),
                                        0, numel)


def dequantize_flat_fragment(codes: Tensor, scales: Tensor, small: Tensor, index: Mapping[str, Any], start: int,
                             length: int) -> Tensor:
    """Elements ``[start, start + length)`` of the fp32 moment a flat's saved 8-bit state stands for, from the
    ``index`` of :meth:`FlatQ8.index` (universal conversion: one parameter fragment at a time, on the CPU)."""
    out = torch.zeros(int(length), dtype=torch.float32, device=codes.device)
    end = start + length
    offsets, lengths, starts, scale_offsets = index["rows"].reshape(4, -1).tolist()
    for o, n, s, so in zip(offsets, lengths, starts, scale_offsets):
        lo, hi = max(o, start), min(o + n, end)
        if hi <= lo:
            continue
        first, _ = eb.block_range(s, n)
        piece_start = s + (lo - o)  # the piece's first element in its layer
        b0, b1 = eb.block_range(piece_start, hi - lo)
        piece_scales = scales.narrow(0, so + b0 - first, b1 - b0)
        out[lo - start:hi - start] = dequantize_run(codes.narrow(0, lo, hi - lo), piece_scales, piece_start,
                                                    index["map"])
    for o, n, s in zip(*index["small"].reshape(3, -1).tolist()):
        lo, hi = max(o, start), min(o + n, end)
        if hi > lo:
            out[lo - start:hi - start] = small.narrow(0, s + lo - o, hi - lo).to(torch.float32)
    return out
