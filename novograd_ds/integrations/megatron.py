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

The adapter registers one optimizer-wide reduction with the core (``NovoGrad.set_layer_reduction("tensor parallel",
tp_group, is_tensor_parallel)``): after the data-parallel SUM, the core sums the layers that ``is_tensor_parallel``
picks once more over the TP group, batched with every other reduction of the step (``sharding.reduce_layer_sums``)::

    sq_tp = where(mask, sq, 0); all_reduce(sq_tp, SUM, tp_group); sq = where(mask, sq_tp, sq)

issued on every TP rank: the mask only depends on the model's structure, which is the same on every rank of a TP
group, never on which segments this rank happens to hold.

Exception (ZeRO-3): when a tensor's ZeRO partition group already contains every rank of the TP group (e.g.
``deepspeed.zero.Init`` partitioned over all ranks before AutoTP built its groups), the data-parallel SUM has
already added the TP ranks' pieces; a second SUM would double-count, so such a layout gets no TP reduction
(the rule of DeepSpeed's ``stage3.py: _grad_norm_counts_every_rank``). The core applies that rule to every
optimizer-wide reduction.

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
    "configure_from_engine",
    "TP_REDUCTION",
]

#: The name of the optimizer-wide reduction this adapter registers (``NovoGrad.set_layer_reduction``).
TP_REDUCTION = "tensor parallel"
_EXPLICIT_ATTR = "_tp_explicit"    # set on the optimizer once the user called set_tensor_parallel_group


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
    return group if dist.get_world_size(group=group) > 1 else None


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
    from ..optimizer import NovoGrad  # for the type check only

    if not isinstance(optimizer, NovoGrad):
        raise TypeError(f"set_tensor_parallel_group: expected a novograd_ds.NovoGrad, got {type(optimizer).__name__}"
                        "; with DeepSpeed pass engine.basic_optimizer (not engine.optimizer, the ZeRO wrapper)")
    _install(optimizer, resolve_tp_group(group, mpu=mpu))
    setattr(optimizer, _EXPLICIT_ATTR, True)


def get_tensor_parallel_group(optimizer: Any) -> Any:
    """The TP group ``optimizer`` reduces over, or ``None``."""
    entry = getattr(optimizer, "_extra_reductions", {}).get(TP_REDUCTION)
    return entry[0] if entry is not None else None


def _install(optimizer: Any, group: Any) -> None:
    optimizer.set_layer_reduction(TP_REDUCTION, group, is_tensor_parallel)


def configure_from_engine(optimizer: Any, engine: Any) -> None:
    """Called by ``novograd_ds.bind(engine)``: take the TP group from ``engine.mpu`` unless one was set explicitly."""
    if getattr(optimizer, _EXPLICIT_ATTR, False):
        return
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
