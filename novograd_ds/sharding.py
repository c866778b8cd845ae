"""What the optimizer core knows about sharding: which slices of which layers a tensor holds, and over which process
groups a layer's partial sum of squares must be added. Nothing here knows DeepSpeed, FSDP or Megatron.

NOTE: [the sharding contract] Every engine adapter (``novograd_ds/integrations/``) answers two questions and nothing
else, in the vocabulary of this module:

* **Which slices of which layers does this rank hold?** Either a :class:`FlatLayout` for a flat tensor the engine
  hands to ``step()`` (DeepSpeed ZeRO's fp32 partitions: ``(offset, length, layer)`` segments, installed with
  :meth:`NovoGrad.bind_layouts`), or a :class:`ParamShard` for a parameter whose local piece the optimizer steps in
  place (an FSDP2 DTensor: its ``to_local()``), found by a resolver registered with :func:`register_param_resolver`.
* **Over which groups is a layer's partial sum added?** A tuple of :class:`LayerReduction` (a process group and,
  optionally, the layers it applies to). Adapters that add a reduction to *some* layers of every layout and parameter
  (Megatron tensor parallelism: the layers marked ``tensor_model_parallel``) register it on the optimizer with
  :meth:`NovoGrad.set_layer_reduction`.

The core then computes each piece's local ``sum(g*g)``, combines all of them with :func:`reduce_layer_sums` (one
``all_reduce(SUM)`` per distinct process group per ``step()``, issued by every rank whatever it holds), updates the
per-layer second moments, and runs the element-wise update on the local pieces through the kernel backends.

NOTE: [the collective contract] Which reductions run, with vectors of which length, depends only on the model's
structure and the engine's partitioning, never on which segments a rank happens to hold or on the data: a rank
holding nothing of a layer still contributes a zero. Every rank therefore issues the same collectives in the same
order. The order is the first appearance of each group in the optimizer's param groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import comm_device
from .kernels import SegmentTable

__all__ = [
    "LayerReduction",
    "FlatLayout",
    "ParamShard",
    "whole_tensor_layout",
    "register_param_resolver",
    "unregister_param_resolver",
    "resolve_param",
    "reduce_layer_sums",
    "reduce_layer_max",
    "group_ranks",
    "group_spans",
    "expand_layer_values",
    "compact_layer_values",
]


@dataclass(frozen=True)
class LayerReduction:
    """Add the partial sums of ``layers`` (a CPU bool mask; ``None``: all) over the ranks of ``group``.

    ``group`` is a ``torch.distributed`` process group (``None``: the default group). ``label`` names it in messages
    ("data parallel", "tensor parallel", "mesh dim 0").
    """

    group: Any
    layers: Optional[Tensor] = None
    label: str = ""

    def __post_init__(self):
        if self.layers is not None and (self.layers.dtype != torch.bool or self.layers.dim() != 1):
            raise ValueError(f"LayerReduction {self.label}: layers must be a 1-D bool mask, got {self.layers!r}")


@dataclass
class FlatLayout:
    """One flat tensor the engine hands to ``step()``, cut into ``(offset, length, layer)`` segments.

    Elements in no segment (padding, alignment gaps) are never read or written. ``reductions``: the groups whose ranks
    hold the other slices of the same layers (empty: the tensor holds whole layers). ``layer_params[k]`` is the model
    tensor of layer ``k`` (its attributes, e.g. ``tensor_model_parallel``, select layers for optimizer-wide
    reductions); ``tensor`` is the flat tensor itself, so its ``id()`` stays unique while bound.
    """

    segments: SegmentTable
    n_layers: int
    numel: int
    reductions: tuple = ()
    label: str = ""
    tensor: Any = field(default=None, repr=False)
    layer_params: Any = field(default=None, repr=False)
    # For 8-bit state (NOTE: [8-bit state] in quantized.py), per layer: its element count, every rank's piece
    # boundaries in it (``cuts``, the same list on every rank) and a stable stochastic-rounding key; and per segment
    # its start in its layer (``segments.starts``). Adapters that cannot say leave them None: 8-bit is then refused.
    layer_numels: Optional[Sequence[int]] = field(default=None, repr=False)
    layer_cuts: Optional[Sequence[Sequence[int]]] = field(default=None, repr=False)
    layer_keys: Optional[Sequence[int]] = field(default=None, repr=False)

    @property
    def has_run_geometry(self) -> bool:
        return (self.layer_numels is not None and self.layer_cuts is not None
                and getattr(self.segments, "starts", None) is not None)

    def __post_init__(self):
        self.reductions = tuple(self.reductions)
        for o, n, k in zip(self.segments.offsets, self.segments.lengths, self.segments.layers):
            if o < 0 or n <= 0 or o + n > self.numel or not 0 <= k < self.n_layers:
                raise ValueError(f"FlatLayout {self.label}: segment ({o}, {n}, {k}) outside a flat of {self.numel} "
                                 f"elements with {self.n_layers} layers")
        for r in self.reductions:
            if r.layers is not None and r.layers.numel() != self.n_layers:
                raise ValueError(f"FlatLayout {self.label}: reduction {r.label!r} has a mask of {r.layers.numel()} "
                                 f"entries for {self.n_layers} layers")


def whole_tensor_layout(tensor: Tensor, label: str = "", key: int = 0) -> FlatLayout:
    """One tensor that is one whole layer (e.g. DeepSpeed FP16_UnfusedOptimizer's fp32 clones): no reduction."""
    n = tensor.numel()
    return FlatLayout(SegmentTable([0] if n else [], [n] if n else [], [0] if n else [], [0] if n else []), 1, n,
                      label=label, tensor=tensor, layer_numels=[n], layer_cuts=[[]], layer_keys=[key])


@dataclass(frozen=True)
class ParamShard:
    """How one parameter is split across ranks: the optimizer steps ``local(p)`` with ``local(p.grad)``.

    ``local(t)`` returns this rank's piece of ``t`` (the parameter, its gradient or a state tensor laid out like the
    parameter) as a plain tensor that shares storage with ``t`` (writes go through). ``grad(p)`` returns the gradient
    in the parameter's layout (it may redistribute, e.g. a pending-sum DTensor gradient) or ``None``.
    ``new_state(p, dtype=None)`` allocates a per-element state tensor laid out like ``p`` (a DTensor for a DTensor parameter, so checkpoint tools
    can reshard it). ``reductions``: the groups over which the piece's ``sum(g*g)`` is added.
    """

    local: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Optional[Tensor]]
    new_state: Callable[..., Tensor]
    reductions: tuple = ()
    label: str = ""
    # For 8-bit state: ``run(p) -> (start, layer_numel, cuts)`` when this rank's piece is one contiguous run of the
    # flattened layer (FSDP2 Shard(0)), None otherwise (8-bit is then refused for the parameter).
    run: Optional[Callable[[Tensor], Optional[tuple]]] = None


# -- parameter resolvers (registered by engine adapters; the core calls them, it does not import them) ---------------
_resolvers: list[Callable[[Tensor], Optional[ParamShard]]] = []


def register_param_resolver(resolver: Callable[[Tensor], Optional[ParamShard]]) -> None:
    """Add ``resolver(p) -> ParamShard | None``; the first non-None answer describes ``p``. Idempotent."""
    if resolver not in _resolvers:
        _resolvers.append(resolver)


def unregister_param_resolver(resolver: Callable[[Tensor], Optional[ParamShard]]) -> None:
    while resolver in _resolvers:
        _resolvers.remove(resolver)


def resolve_param(p: Tensor) -> Optional[ParamShard]:
    """The :class:`ParamShard` of ``p``, or ``None`` for an ordinary (whole, local) tensor."""
    for resolver in _resolvers:
        shard = resolver(p)
        if shard is not None:
            return shard
    return None


# -- process groups ----------------------------------------------------------------------------------------------------
def group_ranks(group: Any) -> list[int]:
    """Global ranks of ``group`` (``None``: the default group)."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def group_spans(outer: Any, inner: Any) -> bool:
    """True if every global rank of ``inner`` is also in ``outer``."""
    return set(group_ranks(outer)).issuperset(group_ranks(inner))


def _same_group(a: Any, b: Any) -> bool:
    if a is b:
        return True
    world = dist.group.WORLD
    if (a is None and b is world) or (a is world and b is None):
        return True
    name_a, name_b = getattr(a, "group_name", None), getattr(b, "group_name", None)
    return name_a is not None and name_a == name_b


# -- the collectives -----------------------------------------------------------------------------------------------------
_mask_cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _mask_on(mask: Tensor, device: torch.device) -> Tensor:
    key = (id(mask), device)
    hit = _mask_cache.get(key)
    if hit is None or hit[0] is not mask:
        hit = (mask, mask.to(device))
        _mask_cache[key] = hit
    return hit[1]


def reduce_layer_sums(entries: Sequence[tuple[Tensor, Sequence[LayerReduction]]], op: Any = None) -> list[Tensor]:
    """Add each 1-D vector of partial ``sum(g*g)`` over its reductions' groups; returns the summed vectors.

    ``op=dist.ReduceOp.MAX`` combines non-negative values by their maximum instead (the 8-bit boundary blocks,
    NOTE: [8-bit state]); masked-out entries contribute 0 either way.

    ``entries[i] = (partial_i, reductions_i)``. For every distinct group, in order of first appearance, the entries
    (or the masked layers of the entries) that reduce over it are concatenated into one buffer and all-reduced once
    (SUM), on the device the group's backend takes (NOTE: [the communication device] in comm.py). Reductions over
    different groups compose: a layer split over a data-parallel and a tensor-parallel group is summed over both.
    Entries without reductions come back unchanged. Issues no collective when no entry has a reduction.
    """
    op = dist.ReduceOp.SUM if op is None else op
    out = [vec for vec, _ in entries]
    order: list[Any] = []
    for _, reds in entries:
        for r in reds:
            if not any(_same_group(r.group, g) for g in order):
                order.append(r.group)
    for group in order:
        members = [(i, r) for i, (_, reds) in enumerate(entries) for r in reds if _same_group(r.group, group)]
        dtype = torch.float64 if any(out[i].dtype == torch.float64 for i, _ in members) else torch.float32
        device = comm_device(group, prefer=out[members[0][0]].device)
        pieces = []
        for i, r in members:
            vec = out[i].to(device=device, dtype=dtype)
            if r.layers is not None:
                vec = torch.where(_mask_on(r.layers, device), vec, torch.zeros((), dtype=dtype, device=device))
            pieces.append(vec)
        buf = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        dist.all_reduce(buf, op=op, group=group)
        offset = 0
        for i, r in members:
            n = out[i].numel()
            summed = buf.narrow(0, offset, n).to(device=out[i].device, dtype=out[i].dtype)
            offset += n
            out[i] = summed if r.layers is None else torch.where(_mask_on(r.layers, out[i].device), summed, out[i])
    return out


def reduce_layer_max(values: Tensor, reductions: Sequence[LayerReduction]) -> Tensor:
    """All-reduce MAX of per-layer values over every reduction's group (restoring per-layer state after a load)."""
    for r in reductions:
        device = comm_device(r.group, prefer=values.device)
        buf = values.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=r.group)
        values = buf.to(values.device)
    return values


# -- per-element forms of per-layer values (checkpoints of flat tensors) ------------------------------------------------
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
