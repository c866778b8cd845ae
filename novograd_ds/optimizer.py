r"""NovoGrad: stochastic gradient normalised by layer-wise adaptive second moments.

NOTE: [the update rule] This is the contract every backend implements. For each parameter tensor ("layer")
with gradient ``g`` at that tensor's ``k``-th update (``k`` counts per tensor, from 1)::

    n  = sum(g*g)                         accumulated in fp32 or wider, whatever the grad dtype
    v  = n                                if k == 1
    v  = b2*v + (1-b2)*n                  otherwise
       (amsgrad: vmax = v if k == 1 else max(vmax, v); use vmax in place of v below)
    gh = g / (sqrt(v) + eps)              eps outside the root
    gh = gh + wd*w                        unless decoupled_weight_decay
    m  = gh                               if k == 1   (bias-free initialisation, also with grad_averaging)
    m  = b1*m + c*gh                      otherwise; c = (1-b1) with grad_averaging, else 1
    w  = w - lr*m                         decoupled_weight_decay: w = w - lr*(m + wd*w), w before the step

The class only keeps books (validation, state, choosing a backend); the per-layer scalar math is in
:func:`step_factors` and :func:`second_moment_`, the per-element math in ``novograd_ds/kernels``.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from .checkpoint import COMPACT, COMPACT_FORMAT, CheckpointError, compact_entry, segment_index, segments_from_index
from .kernels import KernelBackend, SegmentTable
from .kernels import eightbit as eb
from .quantized import (CODES, Q8_KEYS, SCALES, SMALL, FlatQ8, RunGeometry, SlotMap, check_state_bits,
                        dequantize_run, is_quantized, q8_config, quantize_into, run_boundary_max, shared_blocks)
from .kernels.foreach import ForeachBackend
from .kernels.reference import ReferenceBackend
from .sharding import (FlatLayout, LayerReduction, ParamShard, compact_layer_values, group_spans, reduce_layer_max,
                       reduce_layer_sums, resolve_param)

logger = logging.getLogger("novograd_ds")

__all__ = ["NovoGrad", "step_factors", "second_moment_"]

# State keys. These names are what DeepSpeed's checkpoint tools understand (DEEPSPEED_NOTES §5.3).
STEP, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"
# Bound flat tensors keep v compact, one entry per layer, in memory and on disk (NOTE: [the compact checkpoint form]).
EXP_AVG_LAYER, MAX_EXP_AVG_LAYER = "exp_avg_sq_layer", "max_exp_avg_sq_layer"
_LAYER_STATE_KEYS = (EXP_AVG_SQ, MAX_EXP_AVG_SQ)
# Param-group keys of how the first moment is stored: the run's choice, kept from the constructor across
# load_state_dict (and by the DeepSpeed adapter across its universal loaders)
STORAGE_KEYS = ("state_bits", "quant_map", "quant_rounding", "quant_seed")
# Key, in a flat's compact entry, of the index that places its 8-bit codes, scales and small moments
Q8_INDEX = "q8"

BACKENDS = ("reference", "foreach", "fused")


def step_factors(k: int, beta1: float, beta2: float, grad_averaging: bool) -> tuple[float, float, float, float]:
    """The step-dependent scalars ``(a1, c1, a2, c2)`` of ``m = a1*m + c1*gh`` and ``v = a2*v + c2*n``.

    Computed once in Python (double precision) and passed to every backend, so kernels never see ``k``.
    On a tensor's first step ``(0, 1, 0, 1)``: ``m = gh`` and ``v = n``.
    """
    if k <= 1:
        return 0.0, 1.0, 0.0, 1.0
    return beta1, (1.0 - beta1) if grad_averaging else 1.0, beta2, 1.0 - beta2


def second_moment_(v: Tensor, n: Tensor, vmax: Optional[Tensor], *, a2: float, c2: float, eps: float) -> Tensor:
    """Update the per-layer second moments in place and return the denominators ``sqrt(v) + eps``.

    ``v``, ``n`` (and ``vmax``) are 1-D, one entry per layer, fp32 or fp64. With amsgrad ``vmax`` is
    updated to ``max(vmax, v)`` and used in place of ``v`` (on a first step ``vmax`` is 0, so it becomes v).
    """
    # NOTE: [v in double] The EMA and the denominator are evaluated in float64 and rounded once to v's dtype,
    # each product and sum rounded separately (no alpha=, which torch may evaluate as a fused multiply-add; and
    # no fp32 sqrt, which torch's vectorised CPU kernel does not always round correctly). A native kernel that
    # updates v itself (the fused backend's layer_step_) then reproduces it to the last bit.
    v.copy_(v.double().mul_(a2).add_(n.double().mul_(c2)))
    used = v
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
        used = vmax
    return used.double().sqrt().add_(eps).to(v.dtype)


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, Tensor):
        raise ValueError("NovoGrad: lr must be a Python float, not a tensor (got a tensor); pass float(lr)")
    if not lr >= 0.0:
        raise ValueError(f"NovoGrad: invalid learning rate lr={lr}; it must be >= 0")
    if not eps >= 0.0:
        raise ValueError(f"NovoGrad: invalid eps={eps}; it must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"NovoGrad: invalid weight_decay={weight_decay}; it must be >= 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"NovoGrad: betas must be a pair (beta1, beta2), got betas={betas!r}") from None
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"NovoGrad: invalid beta1={b1} in betas={tuple(betas)}; it must be in [0, 1)")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"NovoGrad: invalid beta2={b2} in betas={tuple(betas)}; it must be in [0, 1)")


def _check_param(p: Tensor) -> None:
    if p.is_complex():
        raise ValueError(
            f"NovoGrad does not support complex parameters (got a {p.dtype} tensor of shape {tuple(p.shape)}); "
            "optimise torch.view_as_real(p) instead"
        )
    if not p.is_floating_point():
        raise ValueError(f"NovoGrad needs floating-point parameters, got {p.dtype} of shape {tuple(p.shape)}")


class NovoGrad(Optimizer):
    r"""NovoGrad (Ginsburg et al., 2019): momentum on gradients normalised by a per-layer second moment.

    One second moment ``v`` per parameter tensor (a scalar, the EMA of the tensor's squared gradient norm)
    instead of Adam's per-element one, so optimizer state is about half of Adam's. The gradient is
    normalised *before* the momentum, and weight decay is added to the normalised gradient. See
    NOTE: [the update rule] at the top of this module for the exact math.

    Args:
        params: iterable of parameters or of param-group dicts (each group may override any hyperparameter).
        lr: learning rate.
        betas: ``(beta1, beta2)``: momentum and second-moment decay, each in ``[0, 1)``.
        eps: added to ``sqrt(v)`` (outside the root).
        weight_decay: L2 factor added to the normalised gradient (or, decoupled, to the step).
        grad_averaging: scale the normalised gradient by ``1 - beta1`` in the momentum (not on step 1).
        amsgrad: use the running maximum of ``v``.
        decoupled_weight_decay: ``w -= lr * (m + wd * w)`` instead of adding ``wd * w`` to the gradient.
        foreach: ``True`` for the multi-tensor ``torch._foreach_*`` backend; ``False`` (with ``fused`` not
            ``True``) for the single-tensor reference backend.
        fused: ``True`` for the native fused op (built on first use); raises if it cannot be built.
            With both left ``None``, the fastest available backend is chosen on the first step and
            recorded in :attr:`backend`.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = NovoGrad(model.parameters(), lr=0.01, weight_decay=1e-3)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        grad_averaging: bool = False,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_bits: int = 32,
        quant_map: Optional[str] = None,
        quant_rounding: Optional[str] = None,
        quant_seed: int = 0,
    ):
        _check_hparams(lr, betas, eps, weight_decay)
        if fused and foreach:
            raise ValueError("NovoGrad: fused=True and foreach=True cannot both be set; choose one backend")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            fused=fused,
            state_bits=state_bits,
            quant_map=quant_map,
            quant_rounding=quant_rounding,
            quant_seed=quant_seed,
        )
        check_state_bits(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                _check_param(p)
        #: Name of the backend the last step used ("reference", "foreach" or "fused"); None before a step.
        self.backend: Optional[str] = None
        self._backend_cache: dict[tuple, KernelBackend] = {}
        # Tensors this optimizer may step as whole layers: the ones it was built with. A tensor that is neither
        # one of these nor bound (a ZeRO flat partition DeepSpeed swapped in) is refused in step().
        self._own_ids: set[int] = {id(p) for g in self.param_groups for p in g["params"]}
        # id(flat tensor) -> FlatLayout, installed by an engine adapter (bind_layouts; NOTE: [the sharding contract]).
        self._layouts: dict[int, FlatLayout] = {}
        # name -> (group, select): optimizer-wide extra reductions (set_layer_reduction; e.g. tensor parallelism).
        self._extra_reductions: dict[str, tuple[Any, Callable[[Tensor], bool]]] = {}
        self._flat_reductions: dict[int, tuple[FlatLayout, tuple]] = {}
        self._param_reductions: dict[int, tuple] = {}
        self._param_shards: dict[int, Optional[ParamShard]] = {}
        # True where an engine stands in zeros for a missing gradient (skip_zero_gradients; NOTE: [no gradient, no step])
        self._zero_grad_is_missing = False
        # 8-bit state (NOTE: [8-bit state] in quantized.py): per parameter its run geometry (None: fp32 moment)
        self._q8_geoms: dict[int, Optional[RunGeometry]] = {}
        self._flat_q8: dict[int, Any] = {}
        # id(param) -> the map of 8-bit state loaded into a 32-bit group (converted on the next step)
        self._loaded_maps: dict[int, str] = {}
        # Test/diagnostic switch: step unknown tensors as if each were one layer (the per-shard mistake).
        self._naive_per_tensor = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if hasattr(self, "_own_ids"):
            self._own_ids.update(id(p) for p in group["params"])
        _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if group["fused"] and group["foreach"]:
            raise ValueError("NovoGrad: fused=True and foreach=True cannot both be set in one param group")
        check_state_bits(group)
        for p in group["params"]:
            _check_param(p)
        if hasattr(self, "_q8_geoms"):
            self._q8_geoms.clear()  # stochastic-rounding keys follow the parameter order

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("grad_averaging", False), ("amsgrad", False), ("decoupled_weight_decay", False),
                               ("foreach", None), ("fused", None), ("state_bits", 32), ("quant_map", None),
                               ("quant_rounding", None), ("quant_seed", 0)):
                group.setdefault(key, value)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("_backend_cache", {})
        self.__dict__.setdefault("_own_ids", {id(p) for g in self.param_groups for p in g["params"]})
        self.__dict__.setdefault("_layouts", {})
        for name in ("_extra_reductions", "_flat_reductions", "_param_reductions", "_param_shards"):
            self.__dict__.setdefault(name, {})
        self.__dict__.setdefault("_zero_grad_is_missing", False)
        self.__dict__.setdefault("_q8_geoms", {})
        self.__dict__.setdefault("_flat_q8", {})
        self.__dict__.setdefault("_loaded_maps", {})
        self.__dict__.setdefault("_naive_per_tensor", False)

    # -- backend choice ----------------------------------------------------------------------------
    def _kernels(self, group: dict[str, Any], device: torch.device) -> KernelBackend:
        """The backend for ``group`` on ``device``; chosen once per (choice, device type) and cached."""
        fused, foreach = group["fused"], group["foreach"]
        key = (fused, foreach, device.type)
        backend = self._backend_cache.get(key)
        if backend is None:
            backend = self._choose_backend(fused, foreach, device)
            self._backend_cache[key] = backend
        return backend

    @staticmethod
    def _choose_backend(fused: Optional[bool], foreach: Optional[bool], device: torch.device) -> KernelBackend:
        from .kernels import native

        if fused:
            return native.load_backend(device)  # raises, naming what is missing and the fix
        if foreach is False:
            return ReferenceBackend()
        if foreach is None and fused is None:
            backend = native.load_backend_or_none(device)  # says once why it fell back
            if backend is not None:
                return backend
        return ForeachBackend()

    # -- the engine seam (NOTE: [the sharding contract] in sharding.py) ---------------------------------------------
    def bind_layouts(self, layouts: Mapping[int, FlatLayout]) -> None:
        """Install ``id(flat) -> FlatLayout`` for the flat tensors an engine hands to ``step()``; replaces earlier
        bindings. Engine adapters call this (``novograd_ds.bind(engine)`` for DeepSpeed)."""
        self._layouts = dict(layouts)
        self._flat_reductions = {}
        self._flat_q8 = {}

    _bind_layouts = bind_layouts  # the name the DeepSpeed adapter used before the engine seam was public

    @property
    def is_bound(self) -> bool:
        """True once an engine's flat tensors have been bound (``novograd_ds.bind`` for DeepSpeed)."""
        return bool(self._layouts)

    def set_layer_reduction(self, name: str, group: Any, select: Optional[Callable[[Tensor], bool]] = None) -> None:
        """Also sum the squared gradient norm of every layer ``select(param)`` picks over ``group``.

        For a split that cuts *some* layers across ranks on top of whatever the engine does, e.g. Megatron tensor
        parallelism (``novograd_ds.set_tensor_parallel_group`` calls this with ``is_tensor_parallel``). It applies to
        plain parameters and to every bound flat's layers (through ``FlatLayout.layer_params``), except where a flat's
        own reduction group already contains every rank of ``group`` (the sum already covers them). ``group=None``
        removes the reduction ``name``.
        """
        if group is None:
            self._extra_reductions.pop(name, None)
        else:
            self._extra_reductions[name] = (group, select or (lambda p: True))
        self._flat_reductions = {}
        self._param_reductions = {}

    def skip_zero_gradients(self, enabled: bool = True) -> None:
        """Treat a layer whose whole gradient is exactly zero as one without a gradient: it takes no step.

        For engines that hand over zeros where a parameter got no gradient (DeepSpeed does, at every stage; its
        adapter turns this on when it binds). Bound flat tensors always behave this way; this extends it to the plain
        parameters, at the cost of one small device-to-host read per bucket and step (NOTE: [no gradient, no step]).
        """
        self._zero_grad_is_missing = bool(enabled)

    def layer_reductions(self, tensor: Tensor) -> tuple[LayerReduction, ...]:
        """The reductions applied to ``tensor``'s partial sums: a bound flat's (per layer) or a parameter's."""
        layout = self._layouts.get(id(tensor))
        if layout is not None and layout.tensor is tensor:
            return self._reductions_of_flat(layout)
        return self._reductions_of_param(tensor, self._shard_of(tensor))

    def _reductions_of_flat(self, layout: FlatLayout) -> tuple[LayerReduction, ...]:
        cached = self._flat_reductions.get(id(layout))
        if cached is not None and cached[0] is layout:
            return cached[1]
        reds = list(layout.reductions)
        params = layout.layer_params
        for name, (group, select) in self._extra_reductions.items():
            if params is None:
                continue
            mask = torch.tensor([bool(select(p)) for p in params], dtype=torch.bool)
            if not bool(mask.any()):
                continue
            if any(group_spans(r.group, group) for r in layout.reductions):
                logger.info("NovoGrad: %s: its partition group spans the ranks of the %s group; no second sum "
                            "(the first already covers them)", layout.label, name)
                continue
            reds.append(LayerReduction(group, mask, name))
        result = tuple(reds)
        self._flat_reductions[id(layout)] = (layout, result)
        return result

    def _shard_of(self, p: Tensor) -> Optional[ParamShard]:
        key = id(p)
        if key not in self._param_shards:
            self._param_shards[key] = resolve_param(p)
        return self._param_shards[key]

    def _reductions_of_param(self, p: Tensor, shard: Optional[ParamShard]) -> tuple[LayerReduction, ...]:
        key = id(p)
        cached = self._param_reductions.get(key)
        if cached is not None:
            return cached
        reds = list(shard.reductions) if shard is not None else []
        for name, (group, select) in self._extra_reductions.items():
            if select(p) and not any(group_spans(r.group, group) for r in reds):
                reds.append(LayerReduction(group, None, name))
        result = tuple(reds)
        self._param_reductions[key] = result
        return result

    # -- the step ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss.

        Three phases over all param groups: each piece's local ``sum(g*g)``; one batched reduction per process group
        (:func:`~novograd_ds.sharding.reduce_layer_sums`; none without sharding); then the second moments and the
        element-wise updates. Tensors with no reduction may run all three at once in the fused op.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[_Work] = []
        for group in self.param_groups:
            work.extend(self._prepare_group(group))
        sums = reduce_layer_sums([(w.partial, w.reductions) for w in work])
        pending = []
        for w, n in zip(work, sums):
            request = w.finish(n)
            if request is not None:  # 8-bit blocks shared between ranks: their scales need one MAX (NOTE: [8-bit state])
                pending.append((w, request))
        if pending:
            maxed = reduce_layer_sums([r for _, r in pending], op=torch.distributed.ReduceOp.MAX)
            for (w, _), m in zip(pending, maxed):
                w.complete(m)
        return loss

    # -- 8-bit state of plain parameters ------------------------------------------------------------------------
    def _param_key(self, p: Tensor) -> int:
        """A stable per-layer key for stochastic rounding: the parameter's index in the optimizer's param order."""
        for i, q in enumerate(q for g in self.param_groups for q in g["params"]):
            if q is p:
                return i
        return 0

    def _q8_geometry(self, p: Tensor, group: dict[str, Any], shard: Optional[ParamShard]) -> Optional[RunGeometry]:
        """Where this rank's piece of ``p`` lies, when ``p`` keeps an 8-bit moment; None for an fp32 moment."""
        key = id(p)
        if key in self._q8_geoms:
            return self._q8_geoms[key]
        geom = None
        if q8_config(group) is not None and is_quantized(p.numel()):
            if shard is None:
                geom = RunGeometry(0, p.numel(), (), self._param_key(p))
            else:
                run = shard.run(p) if shard.run is not None else None
                if run is None:
                    raise ValueError(
                        f"NovoGrad(state_bits=8): {shard.label or 'a sharded parameter'} is split so that a rank's "
                        "piece is not one contiguous run of the flattened tensor (e.g. tensor parallelism along dim 1 "
                        "or FSDP over a tensor-parallel dim 0); its 8-bit blocks could not be shared between ranks. "
                        "Put such parameters in a param group with state_bits=32")
                start, numel, cuts = run
                geom = RunGeometry(int(start), int(numel), tuple(int(c) for c in cuts), self._param_key(p))
        self._q8_geoms[key] = geom
        return geom

    def _init_state(self, p: Tensor, group: dict[str, Any], shard: Optional[ParamShard] = None) -> dict[str, Any]:
        state = self.state[p]
        geom = self._q8_geometry(p, group, shard)
        local = shard.local(p) if shard is not None else p
        if len(state) == 0:
            vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            state[STEP] = 0
            if geom is None:
                state[EXP_AVG] = (shard.new_state(p) if shard is not None
                                  else torch.zeros_like(p, memory_format=torch.preserve_format))
            else:
                state[CODES] = (shard.new_state(p, dtype=eb.CODE_DTYPE) if shard is not None
                                else torch.zeros_like(p, dtype=eb.CODE_DTYPE))
                state[SCALES] = torch.zeros(eb.n_blocks(geom.start, local.numel()), dtype=torch.float32,
                                            device=local.device)
            state[EXP_AVG_SQ] = torch.zeros((), dtype=vdtype, device=local.device)
        elif geom is not None and CODES not in state:
            self._quantize_loaded_param(p, state, geom, group, shard)
        elif geom is None and CODES in state:
            self._dequantize_loaded_param(p, state, group, shard)
        if group["amsgrad"] and MAX_EXP_AVG_SQ not in state:
            state[MAX_EXP_AVG_SQ] = torch.zeros_like(state[EXP_AVG_SQ])
        if isinstance(state[STEP], Tensor):  # a checkpoint written by another tool; normalise once
            state[STEP] = int(state[STEP].cpu())
        return state

    def _quantize_loaded_param(self, p: Tensor, state: dict[str, Any], geom: RunGeometry, group: dict[str, Any],
                               shard: Optional[ParamShard]) -> None:
        """An fp32 ``exp_avg`` (a checkpoint of a 32-bit run) into codes and scales for ``state_bits=8``; collective
        over the parameter's groups when its blocks are shared (every rank loads the same checkpoint)."""
        m = state.pop(EXP_AVG)
        local_m = shard.local(m) if shard is not None else m
        state[CODES] = (shard.new_state(p, dtype=eb.CODE_DTYPE) if shard is not None
                        else torch.zeros_like(p, dtype=eb.CODE_DTYPE))
        codes = shard.local(state[CODES]) if shard is not None else state[CODES]
        state[SCALES] = torch.zeros(eb.n_blocks(geom.start, codes.numel()), dtype=torch.float32, device=codes.device)
        boundary = None
        if shard is not None and geom.cuts:
            vals = run_boundary_max(local_m, geom.start, geom.numel)
            slots = SlotMap([(geom.numel, geom.cuts)])
            pair = torch.tensor([slots.pair(0, geom.start, local_m.numel())], dtype=torch.long)
            vec = SlotMap.gather(vals.reshape(1, 2), pair, slots.n)
            vec = reduce_layer_sums([(vec, tuple(shard.reductions))], op=torch.distributed.ReduceOp.MAX)[0]
            boundary = SlotMap.scatter(vec, pair)[0]
        quantize_into(local_m, codes, state[SCALES], geom, q8_config(group), boundary)

    def _dequantize_loaded_param(self, p: Tensor, state: dict[str, Any], group: dict[str, Any],
                                 shard: Optional[ParamShard]) -> None:
        """Codes and scales (a checkpoint of an 8-bit run) into an fp32 ``exp_avg`` for ``state_bits=32``."""
        codes = state.pop(CODES)
        scales = state.pop(SCALES)
        run = shard.run(p) if shard is not None and shard.run is not None else (0, p.numel(), ())
        local_codes = shard.local(codes) if shard is not None else codes
        qmap = self._loaded_maps.pop(id(p), None) or group.get("quant_map") or eb.DEFAULT_MAP
        m = dequantize_run(local_codes, scales, int(run[0]), qmap)
        state[EXP_AVG] = shard.new_state(p) if shard is not None else torch.zeros_like(p)
        target = shard.local(state[EXP_AVG]) if shard is not None else state[EXP_AVG]
        target.copy_(m.view(target.shape))

    def _prepare_group(self, group: dict[str, Any]) -> list[_Work]:
        plain: list[tuple[int, Tensor, Optional[ParamShard], Tensor]] = []
        idle: list[Tensor] = []  # sharded parameters without a gradient: they still take part in the reductions
        flats: list[tuple[Tensor, FlatLayout]] = []
        unknown: list[Tensor] = []
        for i, p in enumerate(group["params"]):
            layout = self._layouts.get(id(p))
            if layout is not None and layout.tensor is p:
                flats.append((p, layout))
            elif id(p) in self._own_ids or self._naive_per_tensor:
                shard = self._shard_of(p)
                g = p.grad if shard is None or p.grad is None else shard.grad(p)
                if g is not None:
                    plain.append((i, p, shard, g))
                    continue
                if p.requires_grad:
                    # NOTE: [state for every trainable parameter] allocated (zeros, step 0) but not stepped, so that a
                    # checkpoint holds state for every trainable parameter: torch.distributed.checkpoint's loader
                    # creates state for all of them and fails on a key the saved checkpoint lacks.
                    self._init_state(p, group, shard)
                if self._reductions_of_param(p, shard):
                    idle.append(p)
            elif p.grad is not None:
                unknown.append(p)
        if unknown:
            self._check_unknown(unknown)
        work: list[_Work] = []
        if plain:
            work.extend(self._prepare_plain(group, plain))
        if idle:
            work.append(_IdleWork(self, idle))
        for p, layout in flats:
            work.append(_FlatWork(self, group, p, layout))
        return work

    def _check_unknown(self, tensors: list[Tensor]) -> None:
        """Refuse tensors we were not built with and not bound to (a DeepSpeed wrapper's flat partitions).

        One exception, which steps nothing: DeepSpeed's FP16_UnfusedOptimizer calls ``step()`` once inside its
        ``__init__`` with all-zero gradients on its fp32 clones, before any bind can run. That call must neither
        count a step nor decay weights, so it is ignored.
        """
        if all(len(self.state.get(p, {})) == 0 and not p.grad.any() for p in tensors):
            return
        shapes = ", ".join(str(tuple(p.shape)) for p in tensors[:4]) + (" ..." if len(tensors) > 4 else "")
        raise RuntimeError(
            f"NovoGrad was asked to step {len(tensors)} tensor(s) it was not constructed with and is not bound to "
            f"(shapes {shapes}). This happens inside a DeepSpeed ZeRO/bf16/fp16 wrapper, which swaps in flat "
            "partitions that cut through layers: stepping them would compute per-shard, not per-layer, norms. Fix: "
            "call novograd_ds.register() before deepspeed.initialize (import novograd_ds does it unless "
            "NOVOGRAD_DS_AUTOREGISTER=0), or call novograd_ds.bind(engine) right after deepspeed.initialize."
        )

    def _prepare_plain(self, group: dict[str, Any], items: list[tuple[int, Tensor, Optional[ParamShard], Tensor]]
                       ) -> list[_Work]:
        buckets: dict[tuple, list[tuple[Tensor, Optional[ParamShard], Tensor]]] = defaultdict(list)
        for i, p, shard, g in items:
            if g.is_sparse:
                raise RuntimeError(
                    f"NovoGrad does not support sparse gradients (param {i} of its group, shape {tuple(p.shape)}): "
                    "it needs each layer's dense squared norm. Use a dense layer, e.g. nn.Embedding(sparse=False)"
                )
            state = self._init_state(p, group, shard)
            local_g = shard.local(g) if shard is not None else g
            local_p = shard.local(p) if shard is not None else p
            sharded = bool(self._reductions_of_param(p, shard))
            q8 = self._q8_geometry(p, group, shard) is not None
            # stochastic rounding draws from the layer's step count: one count per 8-bit bucket
            k = state[STEP] if q8 and (group.get("quant_rounding") or eb.DEFAULT_ROUNDING) == "stochastic" else None
            buckets[(local_p.device, local_p.dtype, local_g.dtype, state[STEP] == 0, sharded, q8, k)].append(
                (p, shard, g))

        work: list[_Work] = []
        for (device, _, _, first, sharded, q8, _), entries in buckets.items():
            kernels = self._kernels(group, device)
            self.backend = kernels.name
            if not first and not sharded and not self._zero_grad_is_missing and self._layer_step(group, kernels,
                                                                                                 entries, q8):
                continue  # the fused CPU op did norm, v and update one layer at a time (same numbers)
            work.append(_PlainWork(self, group, kernels, entries, first, q8))
        return work

    def _layer_step(self, group: dict[str, Any], kernels: KernelBackend, entries, q8: bool = False) -> bool:
        layer_step = getattr(kernels, "q8_layer_step_" if q8 else "layer_step_", None)
        if layer_step is None:
            return False
        states = [self.state[p] for p, _, _ in entries]
        # the local pieces (a DTensor parameter on a mesh of one has no reduction but is still a DTensor)
        params = [sh.local(p) if sh is not None else p for p, sh, _ in entries]
        grads = [sh.local(g) if sh is not None else g for _, sh, g in entries]
        beta1, beta2 = group["betas"]
        k = states[0][STEP] + 1
        a1, c1, a2, c2 = step_factors(k, beta1, beta2, group["grad_averaging"])
        scalars = dict(lr=group["lr"], a1=a1, c1=c1, a2=a2, c2=c2, eps=group["eps"],
                       weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"])
        vs = [s[EXP_AVG_SQ] for s in states]
        vmaxs = [s[MAX_EXP_AVG_SQ] for s in states] if group["amsgrad"] else None
        if q8:
            geoms = [self._q8_geometry(p, group, sh) for p, sh, _ in entries]
            runs = eb.Q8Runs([g.start for g in geoms], [g.numel for g in geoms], [g.key for g in geoms])
            codes = [sh.local(s[CODES]) if sh is not None else s[CODES] for (_, sh, _), s in zip(entries, states)]
            done = layer_step(params, grads, codes, [s[SCALES] for s in states], vs, vmaxs, runs,
                              q8=q8_config(group), step=k, **scalars)
        else:
            exp_avgs = [sh.local(s[EXP_AVG]) if sh is not None else s[EXP_AVG]
                        for (_, sh, _), s in zip(entries, states)]
            done = layer_step(params, grads, exp_avgs, vs, vmaxs, **scalars)
        if done:
            for s in states:
                s[STEP] += 1
        return bool(done)

    # -- bound flat tensors: state ------------------------------------------------------------------------------------
    def _flat_q8_of(self, layout: FlatLayout, group: dict[str, Any]) -> Optional[FlatQ8]:
        """The 8-bit geometry of a bound flat (NOTE: [8-bit flats]), or None for an fp32 first moment."""
        if q8_config(group) is None:
            return None
        geom = self._flat_q8.get(id(layout.tensor))
        if geom is None:
            geom = self._flat_q8[id(layout.tensor)] = FlatQ8(layout)
        return geom

    def _init_flat_state(self, p: Tensor, layout: FlatLayout, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        q8 = self._flat_q8_of(layout, group)
        if EXP_AVG_LAYER not in state:
            if not any(k in state for k in (STEP, EXP_AVG, EXP_AVG_SQ, CODES)):
                state[STEP] = 0
                if q8 is None:
                    state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state.update(q8.new_state(p))
                state[EXP_AVG_LAYER] = torch.zeros(layout.n_layers, dtype=vdtype, device=p.device)
            else:
                self._fold_flat_state(state, layout, p)
            state[EXP_AVG_LAYER].swappable = False  # DeepSpeed's NVMe swapper must leave this small vector alone
        if q8 is not None and CODES not in state:
            # a 32-bit (or universal) checkpoint loaded into state_bits=8: quantise its exp_avg (collective: MAX)
            m = state.pop(EXP_AVG)
            state.update(q8.new_state(p))
            red = q8.reductions
            q8.quantize(m, state, q8_config(group),
                        lambda vec: reduce_layer_sums([(vec, red)], op=torch.distributed.ReduceOp.MAX)[0])
        elif q8 is None and CODES in state:
            qmap = self._loaded_maps.pop(id(p), None) or eb.DEFAULT_MAP
            state[EXP_AVG] = FlatQ8(layout).dequantize(state, qmap, p.numel()).view_as(p).to(p.dtype)
            for k in Q8_KEYS:
                state.pop(k, None)
        if group["amsgrad"] and MAX_EXP_AVG_LAYER not in state:
            if state[STEP]:
                logger.warning("NovoGrad: %s: amsgrad is on but the state has no running maximum of v (a checkpoint "
                               "saved without amsgrad); it starts from the current v", layout.label)
            state[MAX_EXP_AVG_LAYER] = state[EXP_AVG_LAYER].clone()
        if isinstance(state[STEP], Tensor):
            state[STEP] = int(state[STEP].cpu())
        return state

    @staticmethod
    def _check_flat_state(state: Mapping[str, Any], where: str, numel: int, *, expanded: bool) -> None:
        """Raise :class:`CheckpointError` naming what a flat's loaded state lacks (never start it afresh)."""
        missing = [k for k in (STEP, CODES if CODES in state else EXP_AVG) if k not in state]
        if expanded:
            per_element = state.get(EXP_AVG_SQ)
            if per_element is None:
                missing.append(f"{EXP_AVG_SQ} (or the compact {COMPACT!r} entry)")
            elif not isinstance(per_element, Tensor) or per_element.numel() != numel:
                raise CheckpointError(
                    f"NovoGrad: {where}: the loaded per-element {EXP_AVG_SQ} has "
                    f"{getattr(per_element, 'numel', lambda: '?')()} elements, the flat partition {numel}: the "
                    "checkpoint was written for another partitioning. Convert it with python -m "
                    "novograd_ds.universal and load it with \"checkpoint\": {\"load_universal\": true}")
        if missing:
            raise CheckpointError(
                f"NovoGrad: {where}: the loaded optimizer state has no {', '.join(missing)} (it has "
                f"{sorted(state)}). Refusing to start this state afresh: load a complete checkpoint, or load without "
                "optimizer states (load_optimizer_states=False) to start the optimizer from scratch")

    def _fold_flat_state(self, state: dict[str, Any], layout: FlatLayout, p: Tensor) -> None:
        """A flat loaded from the expanded form (written up to 997ee90, or put there by DeepSpeed's universal loader):
        fold the per-element moments back to per-layer values, exactly (the elements are copies of their layer's v),
        and drop them. Collective over the layout's groups (an all_reduce MAX)."""
        self._check_flat_state(state, layout.label, p.numel(), expanded=True)
        vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        per_element = state.pop(EXP_AVG_SQ)
        per_element_max = state.pop(MAX_EXP_AVG_SQ, None)
        state[EXP_AVG_LAYER] = self._fold_layer_values(per_element, layout, vdtype)
        if per_element_max is not None and per_element_max.numel() == p.numel():
            state[MAX_EXP_AVG_LAYER] = self._fold_layer_values(per_element_max, layout, vdtype)
        state[EXP_AVG_LAYER].swappable = False

    def fold_expanded_state(self) -> int:
        """Fold every bound flat's loaded per-element second moment into per-layer values now; returns how many.

        A checkpoint in the expanded form, or DeepSpeed's universal loader, leaves a per-element ``exp_avg_sq`` (4
        bytes per element) in a flat's state; the first ``step()`` folds it anyway, but calling this right after the
        load frees it before training resumes (the DeepSpeed adapter does, in ``engine.load_checkpoint``). Collective:
        every rank of the flats' groups must call it, as they all call ``load_checkpoint``.
        """
        folded = 0
        for layout in self._layouts.values():
            state = self.state.get(layout.tensor)
            if state and EXP_AVG_LAYER not in state and EXP_AVG_SQ in state:
                group = next((g for g in self.param_groups if any(q is layout.tensor for q in g["params"])), None)
                if group is not None:
                    self._init_flat_state(layout.tensor, layout, group)  # folds v; an 8-bit group quantises exp_avg
                else:  # ZeRO-3 puts a sub-group's flat in a param group only while it steps: quantised then
                    self._fold_flat_state(state, layout, layout.tensor)
                folded += 1
        return folded

    @staticmethod
    def _fold_layer_values(per_element: Tensor, layout: FlatLayout, vdtype: torch.dtype) -> Tensor:
        """Per-layer values from a per-element (constant per layer) tensor; every rank of the group agrees.

        A segment whose elements differ (not a NovoGrad moment: another optimizer's checkpoint) raises on every rank
        of the group: the flag travels in the same all-reduce as the values, so no rank is left waiting.
        """
        per_element = per_element.detach().reshape(-1)
        values, _ = compact_layer_values(per_element.to(dtype=vdtype), layout.segments, layout.n_layers)
        bad = None
        for o, n, k in zip(layout.segments.offsets, layout.segments.lengths, layout.segments.layers):
            seg = per_element.narrow(0, o, n)
            if not bool(((seg == seg[0]) | (seg.isnan() & seg[0].isnan())).all()):
                bad = (o, n, k)
                break
        flag = torch.full((1,), 1.0 if bad else 0.0, dtype=vdtype, device=values.device)
        # v >= 0, so a MAX over the group fills in layers this rank holds no segment of (those are 0 here)
        out = reduce_layer_max(torch.cat([values, flag]), layout.reductions)
        if bool(out[-1] > 0):
            where = (f"over layer {bad[2]} (elements {bad[0]}..{bad[0] + bad[1] - 1})" if bad
                     else "on another rank of the group")
            raise CheckpointError(
                f"NovoGrad: {layout.label}: the loaded per-element exp_avg_sq is not constant {where}: it is not a "
                "NovoGrad second moment (another optimizer's checkpoint?). Load without optimizer states "
                "(load_optimizer_states=False) to start NovoGrad's state from scratch")
        return out[:-1].clone()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The torch state dict; a bound flat's entry is compact (NOTE: [the compact checkpoint form]).

        Its ``exp_avg`` is the live per-element tensor; its per-layer moments and a ``[3, S]`` segment index go in a
        ``"novograd"`` dict. Nothing the size of the flat is allocated. Plain and FSDP2 parameters keep torch's form
        (``exp_avg_sq`` is one 0-dim tensor per parameter).
        """
        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                layout = self._layouts.get(id(p))
                st = sd["state"].get(index)
                if st is not None and SCALES in st and not (layout is not None and layout.tensor is p):
                    st = sd["state"][index] = dict(st)
                    st[SCALES] = self._full_layer_scales(p, st[SCALES])
                if layout is not None and layout.tensor is p and st is not None and EXP_AVG_LAYER in st:
                    st = dict(st)
                    compact = {"format": COMPACT_FORMAT, "numel": p.numel(), "segments": segment_index(layout.segments),
                               EXP_AVG_LAYER: st.pop(EXP_AVG_LAYER)}
                    if MAX_EXP_AVG_LAYER in st:
                        compact[MAX_EXP_AVG_LAYER] = st.pop(MAX_EXP_AVG_LAYER)
                    if CODES in st:  # 8-bit: codes per element stay on top, like exp_avg (NOTE: [8-bit flats])
                        compact[SCALES], compact[SMALL] = st.pop(SCALES), st.pop(SMALL)
                        compact[Q8_INDEX] = FlatQ8(layout).index(group["quant_map"])
                    st[COMPACT] = compact
                    sd["state"][index] = st
                index += 1
        return sd

    def _full_layer_scales(self, p: Tensor, scales: Tensor) -> Tensor:
        """A sharded 8-bit parameter's scales for the whole layer (one per 256-element block), the same on every rank:
        the form its checkpoint holds, so a load at another sharding takes its own blocks (collective: a MAX)."""
        shard = self._shard_of(p)
        geom = self._q8_geoms.get(id(p))
        if shard is None or geom is None or not shard.reductions:
            return scales
        local = shard.local(self.state[p][CODES])
        first, _ = eb.block_range(geom.start, local.numel())
        full = torch.zeros(eb.n_blocks(0, geom.numel), dtype=torch.float32, device=scales.device)
        if scales.numel():
            full[first:first + scales.numel()] = scales
        return reduce_layer_sums([(full, tuple(shard.reductions))], op=torch.distributed.ReduceOp.MAX)[0]

    def _local_scales(self, p: Tensor, scales: Tensor) -> Tensor:
        """Inverse of :meth:`_full_layer_scales` on load: this rank's blocks of a whole layer's scales."""
        shard = self._shard_of(p)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        geom = self._q8_geometry(p, group, shard) if shard is not None else None
        if geom is None or not shard.reductions or scales.numel() != eb.n_blocks(0, geom.numel):
            return scales
        n = shard.local(p).numel()
        first, _ = eb.block_range(geom.start, n)
        return scales[first:first + eb.n_blocks(geom.start, n)].clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict: this version's compact form, the expanded form of earlier versions, or torch's.

        The per-layer moments keep their fp32 (fp64) dtype whatever the params' dtype (torch's loader would cast
        them to the parameter's dtype, rounding v to bf16 for bf16 parameters): they are taken out before that cast
        and put back afterwards, moved to the parameter's device only. A saved entry without ``step``, without a
        first or second moment, or a bound flat without an entry while others have one raises
        :class:`~novograd_ds.checkpoint.CheckpointError` naming it; nothing is silently started afresh.
        """
        state_dict = copy.copy(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, current))
        where = {i: f"state entry {i} (param group {gi}, position {j})"
                 for gi, g in enumerate(state_dict["param_groups"]) for j, i in enumerate(g["params"])}
        layer_state: dict[Any, dict[str, Tensor]] = {}
        saved_maps: dict[Any, str] = {}  # entries holding 8-bit codes -> the map they are in
        saved_group_map = {i: g.get("quant_map") for g in state_dict["param_groups"] for i in g["params"]}
        new_state = {}
        for key, st in state_dict["state"].items():
            st = dict(st)
            p = id_to_param.get(key)
            label = where.get(key, f"state entry {key}")
            layout = self._layouts.get(id(p)) if p is not None else None
            flat = layout is not None and layout.tensor is p
            compact = compact_entry(st)
            if compact is not None:
                st.pop(COMPACT)
                if not flat:
                    raise CheckpointError(
                        f"NovoGrad.load_state_dict: {label} holds the compact state of a flat partition, but this "
                        "optimizer's parameter there is not a bound flat. Load DeepSpeed checkpoints through the "
                        "engine (engine.load_checkpoint), which binds NovoGrad to its partitions first")
                saved_layout = segments_from_index(compact["segments"])
                if (compact["numel"] != p.numel() or saved_layout.offsets != layout.segments.offsets
                        or saved_layout.lengths != layout.segments.lengths
                        or saved_layout.layers != layout.segments.layers):
                    raise CheckpointError(
                        f"NovoGrad.load_state_dict: {label} ({layout.label}) was saved for a flat of "
                        f"{compact['numel']} elements in {len(saved_layout)} segments; this one has {p.numel()} in "
                        f"{len(layout.segments)}: the partitioning changed. Convert the checkpoint with python -m "
                        "novograd_ds.universal and load it with \"checkpoint\": {\"load_universal\": true}")
                self._check_flat_state(st, f"{label} ({layout.label})", p.numel(), expanded=False)
                layer_state[key] = {k: compact[k] for k in (EXP_AVG_LAYER, MAX_EXP_AVG_LAYER, SCALES, SMALL)
                                    if k in compact}
                if CODES in st:
                    if SCALES not in compact or SMALL not in compact or Q8_INDEX not in compact:
                        raise CheckpointError(
                            f"NovoGrad.load_state_dict: {label} ({layout.label}) has 8-bit codes but its compact "
                            f"state lacks {[k for k in (SCALES, SMALL, Q8_INDEX) if k not in compact]}: the "
                            "checkpoint is damaged")
                    layer_state[key][CODES] = st.pop(CODES)
                    saved_maps[key] = compact[Q8_INDEX]["map"]
            elif flat:
                self._check_flat_state(st, f"{label} ({layout.label})", p.numel(), expanded=True)
            elif p is not None:
                self._check_param_state(st, label)
                layer_state[key] = {k: st.pop(k) for k in _LAYER_STATE_KEYS if k in st and isinstance(st[k], Tensor)
                                    and st[k].dim() == 0}
                # 8-bit state keeps its dtypes (torch's loader would cast int8 codes and fp32 scales to the param's)
                layer_state[key].update({k: st.pop(k) for k in Q8_KEYS if k in st and isinstance(st[k], Tensor)})
                if CODES in layer_state[key]:
                    saved_maps[key] = saved_group_map.get(key) or eb.DEFAULT_MAP
            new_state[key] = st
        if new_state:
            for key, p in id_to_param.items():
                layout = self._layouts.get(id(p))
                if layout is not None and layout.tensor is p and key not in new_state:
                    raise CheckpointError(
                        f"NovoGrad.load_state_dict: {where[key]} ({layout.label}) has no saved state while other "
                        "flats do: its moments are missing from the checkpoint")
        state_dict["state"] = new_state
        # The storage of the first moment is this run's choice, not a hyperparameter to restore: a checkpoint of a
        # 32-bit run loads into state_bits=8 (quantised on the first step) and the other way round.
        storage = [{k: g[k] for k in STORAGE_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, keep in zip(self.param_groups, storage):
            g.update(keep)
        self._q8_geoms.clear()
        self._check_saved_maps(saved_maps, id_to_param, where)
        for key, entries in layer_state.items():
            p = id_to_param[key]
            vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            layout = self._layouts.get(id(p))
            flat_entry = layout is not None and layout.tensor is p
            for k, t in entries.items():
                if k == CODES:
                    self.state[p][k] = t.detach().to(device=p.device).clone()
                    continue
                if k == SMALL or (k == SCALES and flat_entry):
                    self.state[p][k] = t.detach().to(device=p.device, dtype=torch.float32).clone()
                    continue
                if k == SCALES:
                    self.state[p][k] = self._local_scales(p, t.detach()).to(device=t.device if p.device.type == "meta"
                                                                            else self._local_device(p),
                                                                            dtype=torch.float32).clone()
                    continue
                self.state[p][k] = t.detach().to(device=self._local_device(p), dtype=vdtype).clone()
                if k == EXP_AVG_LAYER:
                    self.state[p][k].swappable = False

    def _check_saved_maps(self, saved_maps: Mapping[Any, str], id_to_param: Mapping[Any, Tensor],
                          where: Mapping[Any, str]) -> None:
        """Codes are only meaningful in the map they were written in: an 8-bit group must use the same map as the
        checkpoint's; a 32-bit group dequantises them with the saved map on its next step."""
        for key, qmap in saved_maps.items():
            p = id_to_param[key]
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            if q8_config(group) is None:
                self._loaded_maps[id(p)] = qmap
            elif group["quant_map"] != qmap:
                raise CheckpointError(
                    f"NovoGrad.load_state_dict: {where.get(key, key)} holds 8-bit codes in the {qmap!r} map; this "
                    f"optimizer's group uses quant_map={group['quant_map']!r}. Construct it with quant_map={qmap!r} "
                    "to resume (or state_bits=32, which converts the codes)")

    def _local_device(self, p: Tensor) -> torch.device:
        shard = self._shard_of(p)
        return shard.local(p).device if shard is not None else p.device

    @staticmethod
    def _check_param_state(st: Mapping[str, Any], label: str) -> None:
        """A plain (or FSDP2) parameter's saved state: step, exp_avg (or 8-bit codes and scales) and one second moment
        per tensor."""
        first = [EXP_AVG] if not (CODES in st or SCALES in st) else [CODES, SCALES]
        missing = [k for k in (STEP, *first, EXP_AVG_SQ) if k not in st]
        if missing:
            raise CheckpointError(f"NovoGrad.load_state_dict: {label} has no {', '.join(missing)} (it has "
                                  f"{sorted(st)}); refusing to start it afresh")
        v = st[EXP_AVG_SQ]
        if isinstance(v, Tensor) and v.dim() != 0:
            raise CheckpointError(
                f"NovoGrad.load_state_dict: {label} has a per-element exp_avg_sq of shape {tuple(v.shape)}; NovoGrad "
                "keeps one second moment per parameter tensor (a 0-dim tensor). Is this another optimizer's "
                "checkpoint (Adam)?")


# -- one piece of a step's work: its local partial sums, their reductions, and what to do with the sums ----------------
class _Work:
    """One piece of a step: its local partial sums and their reductions (phase 1), then ``finish(sums)``: the
    second moments and the update (phase 3). A piece with 8-bit blocks shared between ranks returns from ``finish``
    a ``(vector, reductions)`` of its boundary values instead of updating; the step all-reduces those (MAX, batched)
    and calls ``complete(vector)`` to update (NOTE: [8-bit state])."""

    partial: Tensor
    reductions: tuple = ()

    def finish(self, n: Tensor) -> Optional[tuple[Tensor, tuple]]:  # pragma: no cover - interface
        raise NotImplementedError

    def complete(self, maxed: Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _entry_reductions(per_entry: Sequence[tuple[LayerReduction, ...]]) -> tuple[LayerReduction, ...]:
    """Per-entry reductions of a bucket as masked reductions over the bucket's vector (one per distinct group)."""
    groups: list[tuple[Any, str]] = []
    for reds in per_entry:
        for r in reds:
            if not any(r.group is g for g, _ in groups):
                groups.append((r.group, r.label))
    out = []
    for g, label in groups:
        mask = torch.tensor([any(r.group is g for r in reds) for reds in per_entry], dtype=torch.bool)
        out.append(LayerReduction(g, None if bool(mask.all()) else mask, label))
    return tuple(out)


class _PlainWork(_Work):
    """Parameters stepped as whole layers (or, sharded, as their local pieces): one bucket of one device/dtype."""

    def __init__(self, opt: NovoGrad, group: dict[str, Any], kernels: KernelBackend, entries, first: bool,
                 q8: bool = False):
        self.opt, self.group, self.kernels, self.first, self.q8 = opt, group, kernels, first, q8
        self.params = [p for p, _, _ in entries]
        self.shards = [s for _, s, _ in entries]
        self.grads = [s.local(g) if s is not None else g for _, s, g in entries]
        self.partial = kernels.sq_norms(self.grads)                      # n = sum(g*g), this rank's piece
        self.reductions = _entry_reductions([opt._reductions_of_param(p, s) for p, s, _ in entries])
        self.slots = None
        if q8:
            self.geoms = [opt._q8_geometry(p, group, s) for p, s, _ in entries]
            slot_map = SlotMap([(g.numel, g.cuts) for g in self.geoms])
            if slot_map.n:  # blocks shared with other ranks: their scales need a MAX over the parameters' groups
                pairs = [slot_map.pair(i, g.start, x.numel()) for i, (g, x) in enumerate(zip(self.geoms, self.grads))]
                self.pairs = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
                owner = [i for i, g in enumerate(self.geoms) for _ in shared_blocks(g.numel, g.cuts)]
                per_slot = [tuple(self.shards[i].reductions) if self.shards[i] is not None else () for i in owner]
                self.slots = (slot_map.n, _entry_reductions(per_slot))

    def finish(self, n: Tensor) -> Optional[tuple[Tensor, tuple]]:
        opt, group = self.opt, self.group
        keep = list(range(len(self.params)))
        if self.first or opt._zero_grad_is_missing:
            # NOTE: [no gradient, no step] A layer's first step needs a gradient: an exactly-zero one (torch's DCP
            # initialises optimizer state with a zero-gradient step at lr=0) allocates state but counts no step, so
            # the real first gradient later gets k = 1. One small host read, on a tensor's first step only, or on
            # every step where an engine stands in zeros for missing gradients (skip_zero_gradients: DeepSpeed).
            nonzero = (n != 0).cpu().tolist()
            keep = [i for i in keep if nonzero[i]]
            if len(keep) < len(self.params):
                n = n.index_select(0, torch.tensor(keep, dtype=torch.long, device=n.device))
        self.keep = keep
        if not keep:
            return self._request(None)
        params = [self.params[i] for i in keep]
        shards = [self.shards[i] for i in keep]
        grads = [self.grads[i] for i in keep]
        states = [opt.state[p] for p in params]
        beta1, beta2 = group["betas"]
        self.k = states[0][STEP] + 1
        a1, c1, a2, c2 = step_factors(self.k, beta1, beta2, group["grad_averaging"])
        v = torch.stack([s[EXP_AVG_SQ] for s in states])
        vmax = torch.stack([s[MAX_EXP_AVG_SQ] for s in states]) if group["amsgrad"] else None
        denoms = second_moment_(v, n.to(v.device), vmax, a2=a2, c2=c2, eps=group["eps"])
        torch._foreach_copy_([s[EXP_AVG_SQ] for s in states], list(v.unbind(0)))
        if vmax is not None:
            torch._foreach_copy_([s[MAX_EXP_AVG_SQ] for s in states], list(vmax.unbind(0)))
        w = [sh.local(p) if sh is not None else p for p, sh in zip(params, shards)]
        self.scalars = dict(beta1=a1, grad_scale=c1, weight_decay=group["weight_decay"],
                            decoupled=group["decoupled_weight_decay"])
        if not self.q8:
            m = [sh.local(s[EXP_AVG]) if sh is not None else s[EXP_AVG] for sh, s in zip(shards, states)]
            self.kernels.update_(w, grads, m, denoms, lr=group["lr"], **self.scalars)
            for s in states:
                s[STEP] += 1
            return None
        geoms = [self.geoms[i] for i in keep]
        runs = eb.Q8Runs([g.start for g in geoms], [g.numel for g in geoms], [g.key for g in geoms])
        codes = [sh.local(s[CODES]) if sh is not None else s[CODES] for sh, s in zip(shards, states)]
        self.args = (w, grads, codes, [s[SCALES] for s in states], denoms, runs)
        self.states = states
        if self.slots is None:
            self._q8_update(None)
            return None
        boundary = self.kernels.q8_boundary_absmax(*self.args, q8=q8_config(group), **self.scalars)
        return self._request(boundary)

    def _request(self, boundary: Optional[Tensor]) -> Optional[tuple[Tensor, tuple]]:
        """The MAX request of this bucket's shared blocks: issued whatever this rank's data (the collective contract)."""
        if self.slots is None:
            return None
        n_slots, reductions = self.slots
        if boundary is None:
            return torch.zeros(n_slots, dtype=torch.float32), reductions
        pairs = self.pairs.index_select(0, torch.tensor(self.keep, dtype=torch.long))
        return SlotMap.gather(boundary, pairs, n_slots), reductions

    def complete(self, maxed: Tensor) -> None:
        if not self.keep:
            return
        pairs = self.pairs.index_select(0, torch.tensor(self.keep, dtype=torch.long))
        boundary = SlotMap.scatter(maxed, pairs)
        numels = [g.numel() for g in self.args[1]]
        self._q8_update(boundary if self.args[5].has_partial(numels) else None)

    def _q8_update(self, boundary: Optional[Tensor]) -> None:
        w, grads, codes, scales, denoms, runs = self.args
        self.kernels.q8_update_(w, grads, codes, scales, denoms, runs, boundary, lr=self.group["lr"],
                                q8=q8_config(self.group), step=self.k, **self.scalars)
        for s in self.states:
            s[STEP] += 1


class _IdleWork(_Work):
    """Sharded parameters without a gradient this step: they add zeros, so every rank's reductions stay the same."""

    def __init__(self, opt: NovoGrad, params: list[Tensor]):
        self.partial = torch.zeros(len(params))
        self.reductions = _entry_reductions([opt._reductions_of_param(p, opt._shard_of(p)) for p in params])

    def finish(self, n: Tensor) -> None:
        return None


class _FlatWork(_Work):
    """One bound flat tensor: segments of many layers, each with its own second moment.

    NOTE: [no gradient, no step] (flats) DeepSpeed hands a flat gradient in which a parameter that got no gradient
    is zeros, so inside a flat "no gradient" can only be seen as "a layer whose whole gradient is exactly zero" (summed
    over every rank). Such a layer takes no step: its v, m, weights and first-step state stay as they are, as a plain
    parameter whose ``grad`` is None. A layer that has never stepped has ``v == 0`` (its first step had a nonzero
    gradient, so v > 0 after it); its next step is its first (k = 1). This costs one read of two small per-layer flag
    vectors to the host per flat and step.
    """

    def __init__(self, opt: NovoGrad, group: dict[str, Any], p: Tensor, layout: FlatLayout):
        self.opt, self.group, self.p, self.layout = opt, group, p, layout
        g = p.grad
        if g is not None and g.is_sparse:
            raise RuntimeError("NovoGrad: a DeepSpeed flat partition has a sparse gradient; this is not supported")
        self.state = opt._init_flat_state(p, layout, group)
        self.q8 = opt._flat_q8_of(layout, group)
        self.plan: list = []
        self.kernels = opt._kernels(group, p.device)
        opt.backend = self.kernels.name
        if g is None:  # still part of the reduction (the collective contract); nothing to update
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            self.partial = torch.zeros(layout.n_layers, dtype=acc, device=p.device)
        else:
            self.partial = self.kernels.sq_norms_segments(g, layout.segments, layout.n_layers)
        self.reductions = opt._reductions_of_flat(layout)

    def finish(self, n: Tensor) -> Optional[tuple[Tensor, tuple]]:
        p, layout, state, group = self.p, self.layout, self.state, self.group
        if p.grad is None:
            return self._request(None)
        v = state[EXP_AVG_LAYER]
        vmax = state.get(MAX_EXP_AVG_LAYER) if group["amsgrad"] else None
        n = n.to(v.device)
        flags = torch.stack([n == 0, v == 0]).cpu()
        skip, fresh = flags[0], flags[1] & ~flags[0]
        later = ~(flags[0] | flags[1])
        if bool(skip.all()):
            return self._request(None)
        beta1, beta2 = group["betas"]
        _, c1, _, _ = step_factors(2, beta1, beta2, group["grad_averaging"])
        if bool(fresh.any()) and bool(later.any()):
            on = fresh.to(v.device)
            a2 = torch.full(v.shape, beta2, dtype=torch.float64, device=v.device).masked_fill_(on, 0.0)
            c2 = torch.full(v.shape, 1.0 - beta2, dtype=torch.float64, device=v.device).masked_fill_(on, 1.0)
        elif bool(fresh.any()):
            a2, c2 = 0.0, 1.0
        else:
            a2, c2 = beta2, 1.0 - beta2
        if bool(skip.any()):
            keep_v = v.clone()
            keep_vmax = vmax.clone() if vmax is not None else None
        denoms = second_moment_(v, n, vmax, a2=a2, c2=c2, eps=group["eps"])
        if bool(skip.any()):
            on = skip.to(v.device)
            v.copy_(torch.where(on, keep_v, v))
            if vmax is not None:
                vmax.copy_(torch.where(on, keep_vmax, vmax))
        scalars = dict(lr=group["lr"], weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"])
        if self.q8 is not None:
            return self._q8_finish(fresh, later, denoms, beta1, c1, scalars)
        for mask, a1, c in ((fresh, 0.0, 1.0), (later, beta1, c1)):
            if bool(mask.any()):
                segments = layout.segments if bool(mask.all()) else _segments_of_layers(layout, mask)
                self.kernels.update_segments_(p, p.grad, state[EXP_AVG], segments, denoms, beta1=a1, grad_scale=c,
                                              **scalars)
        state[STEP] += 1
        return None

    # 8-bit first moment (NOTE: [8-bit flats] in quantized.py)
    def _q8_finish(self, fresh: Tensor, later: Tensor, denoms: Tensor, beta1: float, c1: float,
                   scalars: dict[str, Any]) -> Optional[tuple[Tensor, tuple]]:
        """Plan the update of the stepping layers; with shared blocks, return their boundary values for the MAX.

        Stochastic rounding draws from the layer's step count: 1 for a layer's first step (as one process counts it),
        else the flat's count, which equals every layer's own while each layer steps whenever the flat does (a layer
        skipped for lack of a gradient then draws other, equally unbiased, numbers than one process would)."""
        q, state = self.q8, self.state
        # the kernels take 1-D flats (FP16_UnfusedOptimizer's whole-tensor clones keep their shape)
        p, g, codes = self.p.view(-1), self.p.grad.view(-1), state[CODES].view(-1)
        cfg = q8_config(self.group)
        self.denoms, self.scalars, self.cfg = denoms, scalars, cfg
        k = state[STEP] + 1
        for mask, a1, c, step in ((fresh, 0.0, 1.0, 1), (later, beta1, c1, k)):
            if bool(mask.any()):
                rows, table, small = q.subset(None if bool(mask.all()) else mask)
                self.plan.append((rows, table, small, a1, c, step))
        if not q.n_slots:
            self._q8_update(None)
            return None
        boundary = torch.zeros(len(q.table), 2, dtype=torch.float32, device=p.device)  # stays on the device
        for rows, table, _, a1, c, _ in self.plan:
            if len(table):
                b = self.kernels.q8_boundary_absmax_segments(
                    p, g, codes, state[SCALES], table, denoms, beta1=a1, grad_scale=c,
                    weight_decay=scalars["weight_decay"], decoupled=scalars["decoupled"], q8=cfg)
                boundary[torch.tensor(rows, dtype=torch.long, device=p.device)] = b.to(torch.float32)
        return self._request(boundary)

    def _request(self, boundary: Optional[Tensor]) -> Optional[tuple[Tensor, tuple]]:
        """The MAX request of the flat's shared blocks, issued on every step whatever this rank's data."""
        q = self.q8
        if q is None or not q.n_slots:
            return None
        if boundary is None:
            return torch.zeros(q.n_slots, dtype=torch.float32, device=self.p.device), q.reductions
        return SlotMap.gather(boundary, q.pairs, q.n_slots), q.reductions

    def complete(self, maxed: Tensor) -> None:
        if self.plan:
            self._q8_update(SlotMap.scatter(maxed.to(self.p.device), self.q8.pairs))

    def _q8_update(self, boundary: Optional[Tensor]) -> None:
        state, q, sc = self.state, self.q8, self.scalars
        p, g, codes = self.p.view(-1), self.p.grad.view(-1), state[CODES].view(-1)
        for rows, table, small, a1, c, step in self.plan:
            if len(table):
                b = None if boundary is None else boundary.index_select(
                    0, torch.tensor(rows, dtype=torch.long, device=boundary.device))
                self.kernels.q8_update_segments_(p, g, codes, state[SCALES], table, self.denoms, b, beta1=a1,
                                                 grad_scale=c, q8=self.cfg, step=step, **sc)
            if small:
                w, m = q.small_views(p, state[SMALL], small)
                grads, _ = q.small_views(g, state[SMALL], small)
                layers = torch.tensor([q.small_layers[i] for i in small], dtype=torch.long, device=self.denoms.device)
                self.kernels.update_(w, grads, m, self.denoms.index_select(0, layers), beta1=a1, grad_scale=c, **sc)
        state[STEP] += 1


_subtables: dict[tuple[int, bytes], tuple[FlatLayout, SegmentTable]] = {}


def _segments_of_layers(layout: FlatLayout, mask: Tensor) -> SegmentTable:
    """The rows of ``layout.segments`` whose layer ``mask`` selects (cached: the masks rarely change)."""
    key = (id(layout), bytes(mask.numpy().tobytes()))
    hit = _subtables.get(key)
    if hit is None or hit[0] is not layout:
        seg = layout.segments
        rows = [j for j, k in enumerate(seg.layers) if bool(mask[k])]
        table = SegmentTable([seg.offsets[j] for j in rows], [seg.lengths[j] for j in rows],
                             [seg.layers[j] for j in rows])
        if len(_subtables) > 4096:
            _subtables.clear()
        hit = (layout, table)
        _subtables[key] = hit
    return hit[1]
