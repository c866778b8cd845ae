"""DeepSpeed adapters: the ONLY module that reads DeepSpeed wrapper internals (tested on DeepSpeed 0.16 to 0.19).

For each wrapper DeepSpeed may put around the basic optimizer, :func:`layouts_for_engine` returns one
:class:`~novograd_ds.sharding.FlatLayout` per tensor the wrapper will hand to ``NovoGrad.step()``, keyed
by ``id(tensor)``. See docs/zero.md for what each wrapper hands over.

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): flat = ``single_partition_of_fp32_groups[i]``; offsets from
  ``round_robin_bit16_offsets`` (NOT ``lp._hp_mapping``: DeepSpeed builds that in the wrong order with
  ``round_robin_gradients`` and no ``parameter_alignment``); layer = ``param.param_idx_in_group``.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): flat = ``fp32_partitioned_groups_flat[sg]`` per sub-group; each
  tensor partitioned on its own; layer = index inside the sub-group.
* ``BF16_Optimizer``: flat = ``fp32_groups_flat_partition[i]``, tensors packed back to back.
* ``FP16_UnfusedOptimizer``: per-tensor fp32 clones; whole layers, gradients already all-reduced: no reduction.
* no wrapper: the model's own tensors; nothing to bind.

NOTE: [DeepSpeed versions] Where DeepSpeed releases differ in what a wrapper exposes, the difference is handled in
one small function below ("what versions differ" section), named for what it derives and saying which versions need
it. Everything else in this module reads attributes that every supported release (0.16.0 to 0.19.x) has. Checked
against the released sources of 0.16.9, 0.17.6, 0.18.9, 0.19.2 and 0.19.8 (tests/test_zero_traps.py and the
per-version CI step run them).
"""

from __future__ import annotations

from typing import Any

from ..sharding import FlatLayout, LayerReduction, whole_tensor_layout
from .zero_layout import contiguous_segments, zero12_cuts, zero12_segments, zero3_cuts, zero3_segments

__all__ = ["layouts_for_engine", "layouts_for_wrapper"]

_DP = "data parallel"


# -- what versions differ (NOTE: [DeepSpeed versions]) ------------------------------------------------------------------
def zero12_flat_offsets(zo: Any, i: int) -> list[int]:
    """Where each tensor of ``round_robin_bit16_groups[i]`` starts in ZeRO-1/2's flat buffer of group ``i``.

    DeepSpeed >= 0.19.7 records it (``round_robin_bit16_offsets``; per-parameter padding with
    ``parameter_alignment``). 0.16.0-0.19.6 have neither: the tensors lie back to back in round-robin order
    (``flatten_dense_tensors_aligned`` pads only the end of the group), so the offsets are the running sum of
    ``round_robin_bit16_meta`` (meta tensors with the shapes, in the same order).
    """
    offsets = getattr(zo, "round_robin_bit16_offsets", None)
    if offsets is not None:
        return [int(o) for o in offsets[i]]
    out, acc = [], 0
    for meta in zo.round_robin_bit16_meta[i]:
        out.append(acc)
        acc += meta.numel()
    return out


def zero12_partition_size(zo: Any, i: int) -> int:
    """Elements per rank in ZeRO-1/2 group ``i``: ``partition_size[i]``, a float (``len(flat) / dp``) before
    0.19.7 and an int since; the flat is padded to a multiple of ``2 * dp``, so it is always whole."""
    return int(zo.partition_size[i])


def zero3_sub_group_process_group(z3: Any, sg: int) -> Any:
    """The group a ZeRO-3 sub-group's tensors are partitioned over.

    DeepSpeed >= 0.19.3 keeps one per sub-group (``_get_sub_group_process_group``; it may differ from the data
    parallel group for AutoTP/AutoEP placement). 0.16.0-0.19.2 partition every tensor over ``dp_process_group``
    (the stage-3 optimizer reduces, partitions and all-gathers over that one group).
    """
    getter = getattr(z3, "_get_sub_group_process_group", None)
    if getter is not None:
        return getter(sg)
    return z3.dp_process_group


def _zero12(zo: Any) -> dict[int, FlatLayout]:
    import deepspeed.comm as dist

    out = {}
    key_base = 0  # stochastic-rounding keys: a layer's index in the optimizer's param order, as one process has it
    for i, flat in enumerate(zo.single_partition_of_fp32_groups):
        pg = zo.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        params = zo.round_robin_bit16_groups[i]
        offsets, numels = zero12_flat_offsets(zo, i), [m.numel() for m in zo.round_robin_bit16_meta[i]]
        layers, psz = [p.param_idx_in_group for p in params], zero12_partition_size(zo, i)
        segments = zero12_segments(offsets, numels, layers, rank=rank, partition_size=psz)
        layer_params = list(zo.bit16_groups[i])
        out[id(flat)] = FlatLayout(
            segments, len(layer_params), flat.numel(), (LayerReduction(pg, None, _DP),), label=f"zero12 group {i}",
            tensor=flat, layer_params=layer_params, layer_numels=[p.numel() for p in layer_params],
            layer_cuts=zero12_cuts(offsets, numels, layers, world=world, partition_size=psz,
                                   n_layers=len(layer_params)),
            layer_keys=[key_base + k for k in range(len(layer_params))])
        key_base += len(layer_params)
    return out


def _zero3(z3: Any) -> dict[int, FlatLayout]:
    import deepspeed.comm as dist

    out = {}
    key_base = 0
    for sg, flat in enumerate(z3.fp32_partitioned_groups_flat):
        pg = zero3_sub_group_process_group(z3, sg)
        params = z3.fp16_groups[sg]
        part, full = [p.partition_numel() for p in params], [p.ds_numel for p in params]
        segments = zero3_segments(part, full, rank=dist.get_rank(group=pg))
        out[id(flat)] = FlatLayout(
            segments, len(params), flat.numel(), (LayerReduction(pg, None, _DP),), label=f"zero3 sub-group {sg}",
            tensor=flat, layer_params=list(params), layer_numels=full,
            layer_cuts=zero3_cuts(part, full, world=dist.get_world_size(group=pg)),
            layer_keys=[key_base + k for k in range(len(params))])
        key_base += len(params)
    return out


def _bf16(bo: Any) -> dict[int, FlatLayout]:
    import deepspeed.comm as dist

    out = {}
    key_base = 0
    for i, flat in enumerate(bo.fp32_groups_flat_partition):
        pg = bo.real_dp_process_group[i]
        world = dist.get_world_size(group=pg)
        numels = [p.numel() for p in bo.bf16_groups[i]]
        psz = bo.bf16_groups_flat[i].numel() // world
        segments = contiguous_segments(numels, rank=dist.get_rank(group=pg), partition_size=psz)
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        out[id(flat)] = FlatLayout(
            segments, len(numels), flat.numel(), (LayerReduction(pg, None, _DP),), label=f"bf16 group {i}",
            tensor=flat, layer_params=list(bo.bf16_groups[i]), layer_numels=numels,
            layer_cuts=zero12_cuts(offsets, numels, range(len(numels)), world=world, partition_size=psz,
                                   n_layers=len(numels)),
            layer_keys=[key_base + k for k in range(len(numels))])
        key_base += len(numels)
    return out


def _fp16_unfused(fo: Any) -> dict[int, FlatLayout]:
    out = {}
    key = 0
    for i, group in enumerate(fo.fp32_groups):
        for j, t in enumerate(group):
            lay = whole_tensor_layout(t, label=f"fp16-unfused group {i} tensor {j}", key=key)
            lay.layer_params = [fo.fp16_groups[i][j]]
            out[id(t)] = lay
            key += 1
    return out


def layouts_for_wrapper(wrapper: Any, basic: Any) -> dict[int, FlatLayout]:
    """Layouts for every tensor ``wrapper`` hands to ``basic.step()``; empty when there is no wrapper."""
    if wrapper is basic or wrapper is None:
        return {}
    name = type(wrapper).__name__
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return _zero3(wrapper)
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return _zero12(wrapper)
    if isinstance(wrapper, BF16_Optimizer):
        return _bf16(wrapper)
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return _fp16_unfused(wrapper)
    raise NotImplementedError(
        f"NovoGrad: DeepSpeed wrapped it in {name}, which novograd_ds does not know how to bind (supported: ZeRO "
        "stage 1/2/3, BF16_Optimizer, FP16_UnfusedOptimizer, no wrapper). Change the fp16/bf16/zero_optimization "
        "settings, or open an issue with your DeepSpeed config"
    )


def layouts_for_engine(engine: Any, basic: Any) -> dict[int, FlatLayout]:
    """Layouts for the NovoGrad ``basic`` inside ``engine.optimizer``."""
    return layouts_for_wrapper(getattr(engine, "optimizer", None), basic)
