"""Tensor (Megatron-style) model parallelism: which layers' squared gradient norms need a second sum.

NOTE: [tensor-parallel layer norms] With tensor parallelism a weight is split across the ranks of the
tensor-parallel (TP) group: column-parallel layers split the output dimension, row-parallel ones the input
dimension. Each TP rank then holds the gradient of its own slice only, so a split layer's true ``sum(g*g)`` is the
SUM of the TP ranks' partial sums. Replicated tensors (layer norms, the bias of a row-parallel layer) hold their
full gradient on every TP rank and must NOT be summed again. NovoGrad's ``v`` is therefore per *logical* layer,
the same at every TP degree.

Which tensors are split: those with ``tensor_model_parallel=True`` (Megatron-LM, Megatron-DeepSpeed and DeepSpeed
AutoTP set it, together with ``partition_dim``/``partition_stride``, which a sum of squares does not need) or the
older ``model_parallel=True`` (the same test as ``deepspeed.runtime.utils.is_model_parallel_parameter``).

The reduction, per flat tensor (``reduce.reduce_layer_sq``) or per plain-path bucket (``reduce_plain_sq``),
after the data-parallel SUM::

    sq_tp = where(mask, sq, 0); all_reduce(sq_tp, SUM, tp_group); sq = where(mask, sq_tp, sq)

one collective, issued on every TP rank: the mask only depends on the model's structure, which is the same on
every rank of a TP group, never on which segments this rank happens to hold.

Exception (ZeRO-3): when a tensor's ZeRO partition group already contains every rank of the TP group (e.g.
``deepspeed.zero.Init`` partitioned over all ranks before AutoTP built its groups), the data-parallel SUM has
already added the TP ranks' pieces; a second SUM would double-count, so such a layout gets no TP reduction
(the rule of DeepSpeed's ``stage3.py: _grad_norm_counts_every_rank``).

Public API: :func:`set_tensor_parallel_group` (also ``novograd_ds.set_tensor_parallel_group``). Under
``deepspeed.initialize(..., mpu=...)`` it is called for you when the engine binds NovoGrad.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger("novograd_ds")

__all__ = [
    "set_tensor_parallel_group",
    "get_tensor_parallel_group",
    "resolve_tp_group",
    "is_tensor_parallel",
    "tp_layer_mask",
    "masked_tp_all_reduce",
    "reduce_plain_sq",
    "attach_tp_group",
    "group_spans",
    "configure_from_engine",
]

# attribute names on the NovoGrad instance (it is created before any of this runs, so they are read with getattr)
_GROUP_ATTR = "_tp_group"          # the resolved TP group, or None (no tensor parallelism / TP degree 1)
_EXPLICIT_ATTR = "_tp_explicit"    # True once the user called set_tensor_parallel_group (wins over engine.mpu)


# -- which tensors are split --------------------------------------------------------------------------------------
def is_tensor_parallel(param: Tensor) -> bool:
    """True for a tensor split across the TP group (``tensor_model_parallel`` or ``model_parallel`` set)."""
    return bool(getattr(param, "tensor_model_parallel", False) or getattr(param, "model_parallel", False))


def tp_layer_mask(params: Sequence[Tensor]) -> Optional[Tensor]:
    """``bool[len(params)]`` (CPU): which layers are TP-split; ``None`` when none is (then no collective at all).

    ``params`` must be in layer-index order and carry the model's attributes (for FP16_UnfusedOptimizer's fp32
    clones pass the fp16 originals, the clones have lost the attributes).
    """
    flags = [is_tensor_parallel(p) for p in params]
    if not any(flags):
        return None
    return torch.tensor(flags, dtype=torch.bool)


# -- process groups -----------------------------------------------------------------------------------------------
def _group_size(group: Any) -> int:
    return dist.get_world_size(group=group)


def _group_ranks(group: Any) -> list[int]:
    """Global ranks of ``group`` (``None`` = the default group)."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def group_spans(outer: Any, inner: Any) -> bool:
    """True if every global rank of ``inner`` is also in ``outer``."""
    return set(_group_ranks(outer)).issuperset(_group_ranks(inner))


def resolve_tp_group(group: Any = None, *, mpu: Any = None) -> Any:
    """The TP process group from a group or an ``mpu``; ``None`` when there is no TP (or its degree is 1).

    ``mpu``: anything ``deepspeed.utils.bwc.bwc_tensor_model_parallel_group`` understands: Megatron's
    ``parallel_state``/``mpu`` (``get_tensor_model_parallel_group``), DeepSpeed's pipeline grid
    (``get_slice_parallel_group``), DeepSpeed AutoTP's ``deepspeed.utils.groups`` or an old-style
    ``get_model_parallel_group``.
    """
    if group is not None and mpu is not None:
        raise ValueError("NovoGrad: pass either a tensor-parallel group or an mpu, not both")
    if mpu is not None:
        group = _group_from_mpu(mpu)
        if group is None:
            return None
    elif group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("NovoGrad: a tensor-parallel group was given but torch.distributed is not initialised; "
                           "call torch.distributed.init_process_group (or deepspeed.init_distributed) first")
    return group if _group_size(group) > 1 else None


def _group_from_mpu(mpu: Any) -> Any:
    try:
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_group
    except ImportError:  # DeepSpeed absent: the Megatron convention only
        if hasattr(mpu, "get_tensor_model_parallel_group"):
            return mpu.get_tensor_model_parallel_group()
        raise TypeError(f"NovoGrad: {type(mpu).__name__} has no get_tensor_model_parallel_group(); pass "
                        "tp_group=<the tensor-parallel ProcessGroup> instead of mpu") from None
    try:
        return bwc_tensor_model_parallel_group(mpu)
    except AttributeError as err:
        raise TypeError(
            f"NovoGrad: cannot get the tensor-parallel group from mpu={type(mpu).__name__} ({err}); it needs "
            "get_tensor_model_parallel_group(), get_slice_parallel_group() or get_model_parallel_group(). Pass the "
            "group itself instead: novograd_ds.set_tensor_parallel_group(optimizer, group)"
        ) from err


# -- the public switch --------------------------------------------------------------------------------------------
def set_tensor_parallel_group(optimizer: Any, group: Any = None, *, mpu: Any = None) -> None:
    """Make ``optimizer`` (a NovoGrad) sum TP-split layers' squared gradient norms over the TP group.

    Give either the group (a ``torch.distributed`` ProcessGroup) or an ``mpu`` (Megatron's ``parallel_state``,
    DeepSpeed's pipeline grid, ...). ``group=None, mpu=None`` turns tensor parallelism off. Call it before the
    first step, before or after ``deepspeed.initialize``. Not needed when DeepSpeed was given ``mpu=``: binding the
    engine does it from ``engine.mpu``; an explicit call takes precedence over ``engine.mpu``.
    """
    from ..optimizer import NovoGrad

    if not isinstance(optimizer, NovoGrad):
        raise TypeError(f"set_tensor_parallel_group: expected a novograd_ds.NovoGrad, got {type(optimizer).__name__}"
                        "; with DeepSpeed pass engine.basic_optimizer (not engine.optimizer, the ZeRO wrapper)")
    _install(optimizer, resolve_tp_group(group, mpu=mpu))
    setattr(optimizer, _EXPLICIT_ATTR, True)


def get_tensor_parallel_group(optimizer: Any) -> Any:
    """The TP group ``optimizer`` reduces over, or ``None``."""
    return getattr(optimizer, _GROUP_ATTR, None)


def _install(optimizer: Any, group: Any) -> None:
    setattr(optimizer, _GROUP_ATTR, group)
    layouts = getattr(optimizer, "_layouts", None)
    if layouts:
        attach_tp_group(layouts.values(), group)


def configure_from_engine(optimizer: Any, engine: Any) -> None:
    """Called by ``novograd_ds.bind(engine)``: take the TP group from ``engine.mpu`` unless one was set explicitly,
    and attach it to the freshly bound layouts."""
    if getattr(optimizer, _EXPLICIT_ATTR, False):
        group = getattr(optimizer, _GROUP_ATTR, None)
    else:
        group = resolve_tp_group(mpu=getattr(engine, "mpu", None))
    _install(optimizer, group)
    if group is None and any(is_tensor_parallel(p) for p in _model_params(engine)):
        logger.warning(
            "NovoGrad: the model has tensor-parallel parameters (tensor_model_parallel=True) but DeepSpeed got no "
            "mpu with a tensor-parallel degree > 1, so their layer norms are NOT summed across TP ranks. If tensor "
            "parallelism is on, pass mpu= to deepspeed.initialize or call "
            "novograd_ds.set_tensor_parallel_group(engine.basic_optimizer, tp_group)"
        )


def _model_params(engine: Any) -> Iterable[Tensor]:
    module = getattr(engine, "module", None)
    return module.parameters() if module is not None else ()


def attach_tp_group(layouts: Iterable[Any], group: Any) -> None:
    """Give every layout its TP mask (from ``layout.layer_params``) and ``tp_group``, or clear both.

    ``layout.layer_params[k]`` is the model tensor of layer ``k`` (for FP16_UnfusedOptimizer's fp32 clones the
    fp16 original, which still carries ``tensor_model_parallel``). A layout with no TP-split layer gets no mask
    and so no collective. Applies the ZeRO-3 exception: a layout whose partition group already spans the TP
    ranks gets ``tp_group=None``.
    """
    for layout in layouts:
        params = getattr(layout, "layer_params", None)
        if params is not None:
            layout.tp_mask = tp_layer_mask(params)
        if group is None or layout.tp_mask is None:
            layout.tp_group = None
        elif layout.group is not None and group_spans(layout.group, group):
            layout.tp_group = None
            logger.info("NovoGrad: %s: its partition group spans the tensor-parallel ranks; no TP reduction "
                        "(the data-parallel sum already covers them)", layout.label)
        else:
            if layout.tp_mask.numel() != layout.n_layers:
                raise ValueError(f"NovoGrad: {layout.label}: tp_mask has {layout.tp_mask.numel()} entries for "
                                 f"{layout.n_layers} layers")
            layout.tp_group = group


# -- the collective -----------------------------------------------------------------------------------------------
def masked_tp_all_reduce(sq: Tensor, mask: Tensor, group: Any, device: Optional[torch.device] = None) -> Tensor:
    """``sq`` with the entries in ``mask`` summed over ``group``, the others unchanged. One all-reduce.

    ``device``: where the collective runs (the backend's device, e.g. CUDA for NCCL); default: the accelerator's
    current device for a CPU ``sq`` when DeepSpeed is importable, else ``sq.device``.
    """
    device = torch.device(device) if device is not None else _comm_device(sq)
    buf = sq.to(device)
    m = mask.to(device)
    part = torch.where(m, buf, torch.zeros_like(buf))
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
    out = torch.where(m, part, buf)
    return out if out.device == sq.device else out.to(sq.device)


def reduce_plain_sq(sq: Tensor, params: Sequence[Tensor], group: Any) -> Tensor:
    """The plain path (no ZeRO wrapper): ``sq[i]`` is ``params[i]``'s whole local ``sum(g*g)``; TP-split ones get
    summed over ``group``. No collective when no param of the list is split (the same on every TP rank)."""
    mask = tp_layer_mask(params)
    if group is None or mask is None:
        return sq
    return masked_tp_all_reduce(sq, mask, group, device=_comm_device(sq))


def _comm_device(t: Tensor) -> torch.device:
    """The device a collective on ``t``'s values must use: the accelerator's for NCCL-like backends."""
    if t.device.type != "cpu":
        return t.device
    try:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    except Exception:  # deepspeed absent: a CPU tensor on a CPU (gloo) group
        return t.device
