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
from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .kernels import KernelBackend
from .kernels.foreach import ForeachBackend
from .kernels.reference import ReferenceBackend

logger = logging.getLogger("novograd_ds")

__all__ = ["NovoGrad", "step_factors", "second_moment_"]

# State keys. These names are what DeepSpeed's checkpoint tools understand (DEEPSPEED_NOTES §5.3).
STEP, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"
# Bound flat tensors keep v compact, one entry per layer; state_dict() expands it to an Adam-shaped exp_avg_sq.
EXP_AVG_LAYER, MAX_EXP_AVG_LAYER = "exp_avg_sq_layer", "max_exp_avg_sq_layer"
_LAYER_STATE_KEYS = (EXP_AVG_SQ, MAX_EXP_AVG_SQ)

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
        )
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
        # id(flat tensor) -> FlatLayout, set by novograd_ds.bind(engine) (see novograd_ds/distributed).
        self._layouts: dict[int, Any] = {}
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
        for p in group["params"]:
            _check_param(p)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("grad_averaging", False), ("amsgrad", False), ("decoupled_weight_decay", False),
                               ("foreach", None), ("fused", None)):
                group.setdefault(key, value)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("_backend_cache", {})
        self.__dict__.setdefault("_own_ids", {id(p) for g in self.param_groups for p in g["params"]})
        self.__dict__.setdefault("_layouts", {})
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

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            state[STEP] = 0
            state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[EXP_AVG_SQ] = torch.zeros((), dtype=vdtype, device=p.device)
        if group["amsgrad"] and MAX_EXP_AVG_SQ not in state:
            state[MAX_EXP_AVG_SQ] = torch.zeros_like(state[EXP_AVG_SQ])
        return state

    def _step_group(self, group: dict[str, Any]) -> None:
        plain: list[tuple[int, Tensor]] = []
        flats: list[tuple[Tensor, Any]] = []
        unknown: list[Tensor] = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue  # skipped: keeps its state and its step count
            layout = self._layouts.get(id(p))
            if layout is not None and layout.tensor is p:
                flats.append((p, layout))
            elif id(p) in self._own_ids or self._naive_per_tensor:
                plain.append((i, p))
            else:
                unknown.append(p)
        if unknown:
            self._check_unknown(unknown)
        if plain:
            self._step_plain(group, plain)
        for p, layout in flats:
            self._step_flat(group, p, layout)

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

    def _step_plain(self, group: dict[str, Any], indexed: list[tuple[int, Tensor]]) -> None:
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for i, p in indexed:
            g = p.grad
            if g.is_sparse:
                raise RuntimeError(
                    f"NovoGrad does not support sparse gradients (param {i} of its group, shape {tuple(p.shape)}): "
                    "it needs each layer's dense squared norm. Use a dense layer, e.g. nn.Embedding(sparse=False)"
                )
            state = self._init_state(p, group)
            if isinstance(state[STEP], Tensor):  # a checkpoint written by another tool; normalise once
                state[STEP] = int(state[STEP].cpu())
            state[STEP] += 1
            buckets[(p.device, p.dtype, g.dtype, state[STEP] == 1)].append(p)

        for (device, _, _, _), params in buckets.items():
            kernels = self._kernels(group, device)
            self.backend = kernels.name
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            a1, c1, a2, c2 = step_factors(states[0][STEP], beta1, beta2, group["grad_averaging"])

            layer_step = getattr(kernels, "layer_step_", None)
            if layer_step is not None and getattr(self, "_tp_group", None) is None and layer_step(
                params, grads, [s[EXP_AVG] for s in states], [s[EXP_AVG_SQ] for s in states],
                [s[MAX_EXP_AVG_SQ] for s in states] if group["amsgrad"] else None,
                lr=group["lr"], a1=a1, c1=c1, a2=a2, c2=c2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            ):
                continue  # the fused CPU op did the whole step, one layer at a time (same numbers)

            n = kernels.sq_norms(grads)                              # n = sum(g*g) per layer
            if getattr(self, "_tp_group", None) is not None:  # issue 6: TP-split layers, see distributed/tp.py
                from .distributed.tp import reduce_plain_sq

                n = reduce_plain_sq(n, params, self._tp_group)
            v = torch.stack([s[EXP_AVG_SQ] for s in states])
            vmax = torch.stack([s[MAX_EXP_AVG_SQ] for s in states]) if group["amsgrad"] else None
            denoms = second_moment_(v, n, vmax, a2=a2, c2=c2, eps=group["eps"])
            torch._foreach_copy_([s[EXP_AVG_SQ] for s in states], list(v.unbind(0)))
            if vmax is not None:
                torch._foreach_copy_([s[MAX_EXP_AVG_SQ] for s in states], list(vmax.unbind(0)))

            kernels.update_(
                params, grads, [s[EXP_AVG] for s in states], denoms,
                lr=group["lr"], beta1=a1, grad_scale=c1,
                weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            )

    # -- bound flat tensors (DeepSpeed ZeRO / bf16 / fp16 wrappers) ------------------------------------------
    def _bind_layouts(self, layouts: dict[int, Any]) -> None:
        """Install ``id(flat) -> FlatLayout`` (see :mod:`novograd_ds.distributed`); replaces earlier bindings."""
        self._layouts = dict(layouts)

    @property
    def is_bound(self) -> bool:
        """True once a DeepSpeed wrapper's flat tensors have been bound (``novograd_ds.bind``)."""
        return bool(self._layouts)

    def _init_flat_state(self, p: Tensor, layout: Any, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if EXP_AVG_LAYER not in state:
            per_element = state.pop(EXP_AVG_SQ, None)
            per_element_max = state.pop(MAX_EXP_AVG_SQ, None)
            if per_element is not None and per_element.numel() == p.numel():
                # restored from a checkpoint written by state_dict() (or a universal checkpoint): fold back
                state[EXP_AVG_LAYER] = self._fold_layer_values(per_element, layout, vdtype)
                if per_element_max is not None and per_element_max.numel() == p.numel():
                    state[MAX_EXP_AVG_LAYER] = self._fold_layer_values(per_element_max, layout, vdtype)
            else:
                state[STEP] = 0
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[EXP_AVG_LAYER] = torch.zeros(layout.n_layers, dtype=vdtype, device=p.device)
            state[EXP_AVG_LAYER].swappable = False  # DeepSpeed's NVMe swapper must leave this small vector alone
        if group["amsgrad"] and MAX_EXP_AVG_LAYER not in state:
            state[MAX_EXP_AVG_LAYER] = state[EXP_AVG_LAYER].clone() if state[STEP] else torch.zeros_like(
                state[EXP_AVG_LAYER])
        if isinstance(state[STEP], Tensor):
            state[STEP] = int(state[STEP].cpu())
        return state

    @staticmethod
    def _fold_layer_values(per_element: Tensor, layout: Any, vdtype: torch.dtype) -> Tensor:
        """Per-layer values from a per-element (constant per layer) tensor; every rank of the group agrees."""
        from .distributed.layout import compact_layer_values
        from .distributed.reduce import reduce_layer_max

        values, _ = compact_layer_values(per_element.detach().to(dtype=vdtype), layout.segments, layout.n_layers)
        # v >= 0, so a MAX over the group fills in layers this rank holds no segment of (those are 0 here)
        return reduce_layer_max(values, layout)

    def _step_flat(self, group: dict[str, Any], p: Tensor, layout: Any) -> None:
        """One step of a flat tensor whose elements are slices of ``layout.n_layers`` layers.

        NOTE: [the collective contract] in novograd_ds/distributed/reduce.py: the per-layer reduction below is
        issued on every rank for every bound flat, whatever this rank's segments are.
        """
        from .distributed.reduce import reduce_layer_sq

        g = p.grad
        if g.is_sparse:
            raise RuntimeError("NovoGrad: a DeepSpeed flat partition has a sparse gradient; this is not supported")
        beta1, beta2 = group["betas"]
        state = self._init_flat_state(p, layout, group)
        k = state[STEP] + 1
        a1, c1, a2, c2 = step_factors(k, beta1, beta2, group["grad_averaging"])
        kernels = self._kernels(group, p.device)
        self.backend = kernels.name

        partial = kernels.sq_norms_segments(g, layout.segments, layout.n_layers)
        n = reduce_layer_sq(partial, layout)
        v = state[EXP_AVG_LAYER]
        vmax = state.get(MAX_EXP_AVG_LAYER) if group["amsgrad"] else None
        denoms = second_moment_(v, n, vmax, a2=a2, c2=c2, eps=group["eps"])
        kernels.update_segments_(
            p, g, state[EXP_AVG], layout.segments, denoms,
            lr=group["lr"], beta1=a1, grad_scale=c1,
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
        )
        state[STEP] = k


    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The torch state dict; for each bound flat also an Adam-shaped per-element ``exp_avg_sq``.

        DeepSpeed's checkpoint tools only know per-element ``exp_avg``/``exp_avg_sq`` with the flat's shape
        (DEEPSPEED_NOTES §5.3; the universal converter also trims padding off EVERY tensor state). So each bound
        flat's entry carries, instead of the compact per-layer ``exp_avg_sq_layer``, an ``exp_avg_sq`` in which
        every element holds its layer's v (0 on padding). After a load, the first step folds it back to per-layer
        values (exactly: the elements are copies) and drops it.
        """
        from .distributed.layout import expand_layer_values

        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                layout = self._layouts.get(id(p))
                st = sd["state"].get(index)
                if layout is not None and layout.tensor is p and st is not None and EXP_AVG_LAYER in st:
                    st = dict(st)
                    st[EXP_AVG_SQ] = expand_layer_values(st.pop(EXP_AVG_LAYER), layout.segments, p.numel())
                    if MAX_EXP_AVG_LAYER in st:
                        st[MAX_EXP_AVG_SQ] = expand_layer_values(st.pop(MAX_EXP_AVG_LAYER), layout.segments,
                                                                 p.numel())
                    sd["state"][index] = st
                index += 1
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the per-layer moments keep their fp32 (fp64) dtype whatever the params' dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
        dtype, which would round ``v`` to bf16 for bf16 parameters. The per-layer entries are taken out
        before that cast and put back afterwards, moved to the parameter's device only.
        """
        state_dict = copy.copy(state_dict)
        layer_state: dict[Any, dict[str, Tensor]] = {}
        new_state = {}
        for key, st in state_dict["state"].items():
            st = dict(st)
            layer_state[key] = {k: st.pop(k) for k in _LAYER_STATE_KEYS if k in st and isinstance(st[k], Tensor)
                                and st[k].dim() == 0}
            new_state[key] = st
        state_dict["state"] = new_state
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, current))
        for key, entries in layer_state.items():
            p = id_to_param.get(key)
            if p is None:
                continue
            vdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for k, t in entries.items():
                self.state[p][k] = t.detach().to(device=p.device, dtype=vdtype).clone()
