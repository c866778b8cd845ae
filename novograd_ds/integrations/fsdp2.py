"""PyTorch FSDP2 (``fully_shard``) and DTensor tensor parallelism: NovoGrad on DTensor parameters.

NOTE: [DTensor parameters] FSDP2 turns every parameter into a DTensor sharded along dim 0 over its mesh (uneven
shards allowed: a rank may hold rows of a layer, nothing of it, or padding that ``to_local()`` leaves out);
``parallelize_module`` adds a tensor-parallel mesh dimension (``Shard(0)`` for colwise, ``Shard(1)`` for rowwise,
``Replicate()`` for the rest). A layer's squared gradient norm is then the sum of the local pieces' ``sum(g*g)`` over
every mesh dimension on which the parameter is sharded, and over no dimension on which it is replicated.

This adapter describes each DTensor parameter to the core (a :class:`~novograd_ds.sharding.ParamShard`): its local
piece is ``_local_tensor`` (the element-wise update runs there, through the ordinary backends, not through a DTensor
op dispatch), and it sums over ``mesh.get_group(dim)`` for each sharded ``dim``. The core batches the sums of all
parameters into one all-reduce per mesh dimension per step. Gradients that are still pending a sum (a ``Partial``
placement) are redistributed to the parameter's placements first, so the norm is that of the true gradient (not the
sum of squares of partial values: pytorch issue #159856 is about exactly that mistake).

Per-element state (``exp_avg``) is a DTensor laid out like its parameter, so ``torch.distributed.checkpoint`` can
reshard it; the per-layer moment ``exp_avg_sq`` is a plain 0-dim tensor, identical on every rank, saved once.

Nothing to call: ``import novograd_ds`` registers the resolver (``install()``); ``NovoGrad(model.parameters())`` on a
``fully_shard``-ed model is correct as it stands. Only DTensor itself is read here; FSDP's internals are not.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from torch import Tensor

from ..sharding import LayerReduction, ParamShard, register_param_resolver, unregister_param_resolver

__all__ = ["install", "uninstall", "resolve_dtensor"]


def _dtensor_class() -> Optional[type]:
    """DTensor's class once torch.distributed.tensor is imported (no DTensor can exist before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _local(t: Tensor) -> Tensor:
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def _grad(p: Tensor) -> Optional[Tensor]:
    g = p.grad
    if g is None:
        return None
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(g, dtensor):
        raise RuntimeError(
            f"NovoGrad: the parameter of shape {tuple(p.shape)} is a DTensor but its gradient is a plain "
            f"{type(g).__name__}; set DTensor gradients (FSDP2 and parallelize_module do) or call "
            "optimizer.zero_grad(set_to_none=True) before assigning gradients by hand")
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        # e.g. Partial (a sum still pending) on a tensor-parallel dimension: finish it, in the parameter's layout
        g = g.redistribute(p.device_mesh, p.placements)
    return g


def _new_state(p: Tensor, dtype=None) -> Tensor:
    import torch

    return torch.zeros_like(p, dtype=dtype)  # a DTensor with p's mesh and placements


def _run(p: Tensor) -> Optional[tuple]:
    """``(start, numel, cuts)`` of this rank's piece of ``p`` in the flattened layer, when every rank's piece is one
    contiguous run of it (every sharded mesh dimension is a plain Shard(0)); None otherwise.

    FSDP2 splits rows with ``torch.chunk`` semantics (pieces of ``ceil(rows / n)`` rows, the last ones shorter or
    empty), mesh dimension by mesh dimension; the cuts are all those row boundaries, the same list on every rank."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(p.shape)
    if not shape:
        return 0, 1, ()
    mesh = p.device_mesh
    sharded = [(d, pl) for d, pl in enumerate(p.placements) if not pl.is_replicate() and mesh.size(d) > 1]
    if any(type(pl) is not Shard or pl.dim != 0 for _, pl in sharded):
        return None
    row = 1
    for n in shape[1:]:
        row *= int(n)
    pieces = [(0, int(shape[0]))]
    for d, _ in sharded:
        parts = []
        for lo, hi in pieces:
            size = hi - lo
            step = -(-size // mesh.size(d)) if size else 0
            for i in range(mesh.size(d)):
                a = min(lo + i * step, hi) if step else lo
                parts.append((a, min(a + step, hi) if step else lo))
        pieces = parts
    cuts = sorted({lo * row for lo, _ in pieces if 0 < lo < shape[0]})
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
    return int(offset[0]) * row, p.numel(), tuple(cuts)


def _mesh_dim_label(mesh: Any, dim: int) -> str:
    names = getattr(mesh, "mesh_dim_names", None)
    return f"mesh dim {dim}" + (f" ({names[dim]})" if names else "")


def resolve_dtensor(p: Tensor) -> Optional[ParamShard]:
    """The :class:`ParamShard` of a DTensor parameter; ``None`` for anything else."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(p, dtensor):
        return None
    mesh = p.device_mesh
    reductions = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(f"NovoGrad: the DTensor parameter of shape {tuple(p.shape)} has a Partial placement on "
                             f"{_mesh_dim_label(mesh, dim)}; parameters must be sharded or replicated")
        # Anything that is neither replicated nor pending a sum splits the tensor over this dimension: Shard, and
        # _StridedShard (FSDP2 over a tensor-parallel dim 0), whose is_shard() is False in recent torch.
        if not placement.is_replicate() and mesh.size(dim) > 1:
            reductions.append(LayerReduction(mesh.get_group(dim), None, _mesh_dim_label(mesh, dim)))
    return ParamShard(local=_local, grad=_grad, new_state=_new_state, reductions=tuple(reductions),
                      label=f"DTensor {tuple(p.shape)} {tuple(p.placements)}", run=_run)


def install() -> None:
    """Let NovoGrad recognise DTensor parameters (``import novograd_ds`` does this)."""
    register_param_resolver(resolve_dtensor)


def uninstall() -> None:
    unregister_param_resolver(resolve_dtensor)
