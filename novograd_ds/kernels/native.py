"""The native fused backend (``fused=True``): one C++ (CPU) or CUDA call per pass for a whole list of tensors.

The ops are JIT-built with ninja on first use (:mod:`novograd_ds.ops.builder`) and cached on disk, so
constructing :class:`~novograd_ds.NovoGrad` stays cheap; the first ``step()`` builds or loads them.

What the ops support: fp32 parameters and ``exp_avg`` with fp32, bf16 or fp16 gradients, contiguous tensors on
one device. Anything else (bf16/fp16/fp64 parameters, fp64 gradients, non-contiguous tensors) goes to the
foreach backend when the backend was chosen automatically; with an explicit ``fused=True`` an unsupported dtype
raises :class:`NativeOpUnavailable` naming it (non-contiguous tensors still take the foreach path: that is
a layout matter, not a choice the user made).

Loading is rank-local, never collective (NOTE: [rank-local loading] in ops/builder.py): each process builds or
loads the op under a file lock in the build directory and calls nothing in ``torch.distributed``, so a rank
that never reaches its first step holds up nobody. Before the op is used on a device (each ``torch.device``:
``cuda:0`` and ``cuda:1`` separately) it passes a self-check against the foreach backend (NOTE: [self-check]).
A rank that cannot load the op, or whose self-check fails, uses the foreach backend under the automatic choice
and warns once, naming the rank; the other ranks keep the fused op. Both backends implement the same rule
(NOTE: [the kernel seam]), so the ranks agree to rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import KernelBackend, SegmentTable
from . import eightbit as eb
from .foreach import ForeachBackend

logger = logging.getLogger("novograd_ds")

__all__ = ["NativeOpUnavailable", "FusedBackend", "load_backend", "load_backend_or_none", "describe"]

_SEE_ENV = "see `python -m novograd_ds.env`"
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DISABLE_ENV = "NOVOGRAD_DS_DISABLE_NATIVE"


class NativeOpUnavailable(RuntimeError):
    """The fused op cannot be used here; the message says what is missing and how to fix it."""


class FusedBackend(KernelBackend):
    """The fused op behind the :class:`KernelBackend` seam.

    ``strict`` (an explicit ``fused=True``) raises on dtypes the op does not support; otherwise such calls go
    to :class:`ForeachBackend`, as they would have without the op. The first call with tensors on a device runs
    the op's self-check there (NOTE: [self-check]); on a device where it fails, calls go to the foreach backend
    (one warning) or, when strict, raise :class:`NativeOpUnavailable` naming the failed check.
    """

    name = "fused"

    def __init__(self, module: Any, device_type: str, *, strict: bool):
        self.module = module
        self.device_type = device_type
        self.strict = strict
        self._fallback = ForeachBackend()
        self._device_ok: dict[torch.device, bool] = {}
        self._q8_device_ok: dict[torch.device, bool] = {}

    def _checked(self, device: torch.device) -> bool:
        """Whether the op passed its self-check on ``device`` (run on first use there); raises when strict."""
        ok = self._device_ok.get(device)
        if ok is None:
            why = check_device(self.module, device)
            if why is not None:
                if self.strict:
                    raise NativeOpUnavailable(_self_check_error(why))
                _warn_once(f"self-check:{device}", _fallback_message(device, why))
            ok = self._device_ok[device] = why is None
        return ok

    def _q8_checked(self, device: torch.device) -> bool:
        """Whether the op's 8-bit entry points passed their self-check on ``device`` (NOTE: [8-bit self-check])."""
        ok = self._q8_device_ok.get(device)
        if ok is None:
            why = check_device_q8(self.module, device)
            if why is not None:
                if self.strict:
                    raise NativeOpUnavailable(_self_check_error(why))
                _warn_once(f"q8-self-check:{device}", _fallback_message(device, why))
            ok = self._q8_device_ok[device] = why is None
        return ok

    def __repr__(self) -> str:
        return f"FusedBackend({self.device_type}, simd={getattr(self.module, 'simd', 'cuda')}, strict={self.strict})"

    # -- which calls the op takes ----------------------------------------------------------------------
    def _unsupported(self, grads: Sequence[Tensor], states: Sequence[Tensor] = ()) -> Optional[str]:
        """Why the op cannot take these tensors (None when it can); raises for dtypes when strict."""
        gd = grads[0].dtype
        bad = None
        if gd not in _GRAD_DTYPES:
            bad = f"{gd} gradients"
        elif any(g.dtype != gd for g in grads):
            bad = "gradients of mixed dtypes in one call"
        else:
            for t in states:
                if t.dtype != torch.float32:
                    bad = f"{t.dtype} parameters/state"
                    break
        if bad is not None:
            if self.strict:
                raise NativeOpUnavailable(
                    f"NovoGrad(fused=True): the fused op supports float32 parameters and state with float32, "
                    f"bfloat16 or float16 gradients; got {bad}. Keep fp32 master weights (DeepSpeed bf16/fp16 "
                    "and ZeRO do), or use fused=None (automatic: foreach for these tensors) or foreach=True"
                )
            return bad
        for t in (*grads, *states):
            if t.device.type != self.device_type or not t.is_contiguous():
                return "non-contiguous tensors or tensors on another device"
        if not self._checked(grads[0].device):
            return f"the op failed its self-check on {grads[0].device}"
        return None

    # -- list forms ------------------------------------------------------------------------------------
    def sq_norms(self, grads: Sequence[Tensor]) -> Tensor:
        if len(grads) == 0:
            return torch.zeros(0)
        grads = list(grads)
        if self._unsupported(grads) is not None:
            return self._fallback.sq_norms(grads)
        return self.module.sq_norms(grads)

    def update_(self, params, grads, exp_avgs, denoms, *, lr, beta1, grad_scale, weight_decay, decoupled):
        if len(params) == 0:
            return
        params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
        if self._unsupported(grads, params + exp_avgs) is not None:
            return self._fallback.update_(params, grads, exp_avgs, denoms, lr=lr, beta1=beta1, grad_scale=grad_scale,
                                          weight_decay=weight_decay, decoupled=decoupled)
        d = denoms.to(device=params[0].device, dtype=torch.float32).contiguous()
        self.module.update(params, grads, exp_avgs, d, float(lr), float(beta1), float(grad_scale),
                           float(weight_decay), bool(decoupled))

    # -- the whole plain-path step in one call (CPU op; NOTE: [layer at a time] in novograd_cpu.cpp) --------
    def layer_step_(self, params, grads, exp_avgs, vs, vmaxs, *, lr, a1, c1, a2, c2, eps, weight_decay,
                    decoupled) -> bool:
        """Norm, second moment and update of each tensor back to back; False when the op cannot take them.

        ``vs``/``vmaxs`` are the tensors' 0-dim fp32 ``exp_avg_sq``/``max_exp_avg_sq`` states, updated in place
        exactly as :func:`novograd_ds.optimizer.second_moment_` would.
        """
        layer_step = getattr(self.module, "layer_step", None)
        if layer_step is None or len(params) == 0:
            return False
        params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
        if self._unsupported(grads, params + exp_avgs + list(vs) + list(vmaxs or ())) is not None:
            return False
        layer_step(params, grads, exp_avgs, list(vs), list(vmaxs or ()), float(lr), float(a1), float(c1), float(a2),
                   float(c2), float(eps), float(weight_decay), bool(decoupled))
        return True

    # -- segment forms: one native call per flat tensor ------------------------------------------------
    @staticmethod
    def _table(segments: SegmentTable) -> Tensor:
        table = getattr(segments, "_novograd_native_table", None)
        if table is None:
            table = segments.as_tensor()
            segments._novograd_native_table = table  # cached on the (immutable) table
        return table

    def sq_norms_segments(self, flat_grad: Tensor, segments: SegmentTable, n_layers: int) -> Tensor:
        if self._unsupported([flat_grad]) is not None:
            return super().sq_norms_segments(flat_grad, segments, n_layers)
        out = self.module.sq_norms_segments(flat_grad, self._table(segments), int(n_layers))
        return out if out.device == flat_grad.device else out.to(flat_grad.device)

    def update_segments_(self, flat_param, flat_grad, flat_exp_avg, segments, layer_denoms, **scalars) -> None:
        if not len(segments):
            return
        if self._unsupported([flat_grad], [flat_param, flat_exp_avg]) is not None:
            return super().update_segments_(flat_param, flat_grad, flat_exp_avg, segments, layer_denoms, **scalars)
        d = layer_denoms.to(device=flat_param.device, dtype=torch.float32).contiguous()
        self.module.update_segments(
            flat_param, flat_grad, flat_exp_avg, self._table(segments), d, float(scalars["lr"]),
            float(scalars["beta1"]), float(scalars["grad_scale"]), float(scalars["weight_decay"]),
            bool(scalars["decoupled"]),
        )


    # -- 8-bit state (NOTE: [8-bit moment] in eightbit.py) ---------------------------------------------------
    def _q8_native(self, name: str, grads, states, codes) -> Optional[Any]:
        """The op's entry point ``name`` when it can take these tensors, else None (the foreach path)."""
        fn = getattr(self.module, name, None)
        if fn is None:
            if self.strict:
                raise NativeOpUnavailable(f"NovoGrad(fused=True): this build of the fused op has no {name}; rebuild it "
                                          f"({_SEE_ENV})")
            return None
        if self._unsupported(grads, states) is not None:
            return None
        if any(c.dtype != eb.CODE_DTYPE or not c.is_contiguous() or c.device.type != self.device_type for c in codes):
            return None
        if not self._q8_checked(grads[0].device):
            return None
        return fn

    @staticmethod
    def _q8_runs_tensor(runs: "eb.Q8Runs", numels) -> Tensor:
        key = tuple(numels)
        cached = getattr(runs, "_novograd_native_table", None)
        if cached is None or cached[0] != key:
            cached = (key, runs.as_tensor(numels))
            runs._novograd_native_table = cached
        return cached[1]

    @staticmethod
    def _q8_table(table: "eb.Q8SegmentTable") -> Tensor:
        t = getattr(table, "_novograd_native_table", None)
        if t is None:
            t = table._novograd_native_table = table.as_tensor()
        return t

    def q8_boundary_absmax(self, params, grads, codes, scales, denoms, runs, *, beta1, grad_scale, weight_decay,
                           decoupled, q8):
        params, grads, codes, scales = list(params), list(grads), list(codes), list(scales)
        fn = self._q8_native("q8_boundary_absmax", grads, params + scales, codes) if params else None
        if fn is None:
            return self._fallback.q8_boundary_absmax(params, grads, codes, scales, denoms, runs, beta1=beta1,
                                                     grad_scale=grad_scale, weight_decay=weight_decay,
                                                     decoupled=decoupled, q8=q8)
        d = denoms.to(device=params[0].device, dtype=torch.float32).contiguous()
        return fn(params, grads, codes, scales, d, self._q8_runs_tensor(runs, [g.numel() for g in grads]),
                  float(beta1), float(grad_scale), float(weight_decay), bool(decoupled), q8.map_id)

    def q8_update_(self, params, grads, codes, scales, denoms, runs, boundary=None, *, lr, beta1, grad_scale,
                   weight_decay, decoupled, q8, step):
        params, grads, codes, scales = list(params), list(grads), list(codes), list(scales)
        if not params:
            return
        fn = self._q8_native("q8_update", grads, params + scales, codes)
        if fn is None:
            return self._fallback.q8_update_(params, grads, codes, scales, denoms, runs, boundary, lr=lr, beta1=beta1,
                                             grad_scale=grad_scale, weight_decay=weight_decay, decoupled=decoupled,
                                             q8=q8, step=step)
        d = denoms.to(device=params[0].device, dtype=torch.float32).contiguous()
        fn(params, grads, codes, scales, d, self._q8_runs_tensor(runs, [g.numel() for g in grads]), boundary, float(lr),
           float(beta1), float(grad_scale), float(weight_decay), bool(decoupled), q8.map_id, q8.rounding_id,
           int(q8.seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF)

    def q8_layer_step_(self, params, grads, codes, scales, vs, vmaxs, runs, *, lr, a1, c1, a2, c2, eps, weight_decay,
                       decoupled, q8, step) -> bool:
        """The 8-bit plain-path step of whole tensors in one call (NOTE: [8-bit layer at a time]): per tensor its
        norm, its second moment (``vs``/``vmaxs``: 0-dim fp32 ``exp_avg_sq``/``max_exp_avg_sq``, updated in place
        as :func:`novograd_ds.optimizer.second_moment_` would) and its 8-bit update. False when the op cannot take
        these tensors (then use sq_norms, second_moment_ and q8_update_)."""
        params, grads, codes, scales = list(params), list(grads), list(codes), list(scales)
        if not params:
            return False
        fn = self._q8_native("q8_layer_step", grads, params + scales + list(vs) + list(vmaxs or ()), codes)
        if fn is None:
            return False
        fn(params, grads, codes, scales, list(vs), list(vmaxs or ()), self._q8_runs_tensor(runs, [g.numel() for g in grads]),
           float(lr), float(a1), float(c1), float(a2), float(c2), float(eps), float(weight_decay), bool(decoupled),
           q8.map_id, q8.rounding_id, int(q8.seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF)
        return True

    def q8_boundary_absmax_segments(self, flat_param, flat_grad, flat_codes, flat_scales, table, layer_denoms,
                                    **scalars):
        fn = self._q8_native("q8_boundary_absmax_segments", [flat_grad], [flat_param, flat_scales], [flat_codes])
        if fn is None:
            return super().q8_boundary_absmax_segments(flat_param, flat_grad, flat_codes, flat_scales, table,
                                                       layer_denoms, **scalars)
        d = layer_denoms.to(device=flat_param.device, dtype=torch.float32).contiguous()
        return fn(flat_param, flat_grad, flat_codes, flat_scales, self._q8_table(table), d, float(scalars["beta1"]),
                  float(scalars["grad_scale"]), float(scalars["weight_decay"]), bool(scalars["decoupled"]),
                  scalars["q8"].map_id)

    def q8_update_segments_(self, flat_param, flat_grad, flat_codes, flat_scales, table, layer_denoms, boundary=None,
                            **scalars) -> None:
        if not len(table):
            return
        fn = self._q8_native("q8_update_segments", [flat_grad], [flat_param, flat_scales], [flat_codes])
        if fn is None:
            return super().q8_update_segments_(flat_param, flat_grad, flat_codes, flat_scales, table, layer_denoms,
                                               boundary, **scalars)
        d = layer_denoms.to(device=flat_param.device, dtype=torch.float32).contiguous()
        q8 = scalars["q8"]
        fn(flat_param, flat_grad, flat_codes, flat_scales, self._q8_table(table), d, boundary, float(scalars["lr"]),
           float(scalars["beta1"]), float(scalars["grad_scale"]), float(scalars["weight_decay"]),
           bool(scalars["decoupled"]), q8.map_id, q8.rounding_id, int(q8.seed) & 0xFFFFFFFF,
           int(scalars["step"]) & 0xFFFFFFFF)


# -- loading, rank-local ------------------------------------------------------------------------------------
_modules: dict[str, tuple[Any, Optional[str]]] = {}  # device type -> (module or None, why not); per process
_checks: dict[tuple[int, str], tuple[Any, Optional[str]]] = {}  # (id(module), device) -> (module, None or what failed)
_warned: set[str] = set()


def _builder(device_type: str):
    from ..ops.builder import builder_for

    return builder_for(device_type)


def _try_load(device_type: str) -> tuple[Any, Optional[str]]:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None, f"{_DISABLE_ENV}={os.environ[_DISABLE_ENV]} is set; unset it to use the fused op"
    from ..ops.builder import OpBuildError

    try:
        return _builder(device_type).load(), None
    except OpBuildError as exc:
        return None, str(exc)


def _load_module(device_type: str) -> tuple[Any, Optional[str]]:
    """Build or load the op of ``device_type`` in this process (file-locked, no collective); cached."""
    if device_type not in _modules:
        _modules[device_type] = _try_load(device_type)
    return _modules[device_type]


def _resolve(device: Union[torch.device, str]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _rank_label() -> str:
    """`` (rank R)`` in a distributed job (from the process group or ``$RANK``), else empty. Not a collective."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return f" (rank {dist.get_rank()})"
    rank = os.environ.get("RANK")
    return f" (rank {rank})" if rank not in (None, "") else ""


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _fallback_message(device: torch.device, why: str) -> str:
    return f"NovoGrad{_rank_label()}: fused op unavailable on {device}, using the foreach backend: {why} ({_SEE_ENV})"


def _self_check_error(why: str) -> str:
    return (f"NovoGrad(fused=True){_rank_label()}: {why}. The op disagrees with the foreach backend "
            f"here: report it with the output of `python -m novograd_ds.env --check`; meanwhile use fused=None "
            f"(automatic: foreach here) or foreach=True")


def check_device(module: Any, device: torch.device) -> Optional[str]:
    """The self-check of ``module`` on ``device``, run once per module and device: None when it passed, else
    which check failed and by how much (NOTE: [self-check])."""
    key = (id(module), str(device))
    entry = _checks.get(key)
    if entry is None or entry[0] is not module:  # the module is kept in the entry, so its id is not reused
        failed = [r for r in self_check(module, device) if not r.passed]
        entry = _checks[key] = (module, failed[0].describe() if failed else None)
    return entry[1]


def load_backend(device: torch.device) -> KernelBackend:
    """The fused backend for ``device`` (explicit ``fused=True``); raises :class:`NativeOpUnavailable`.

    Rank-local: builds or loads the op in this process only and runs its self-check on ``device``.
    """
    device = _resolve(device)
    module, why = _load_module(device.type)
    if module is None:
        raise NativeOpUnavailable(f"NovoGrad(fused=True){_rank_label()} on {device.type}: {why}. "
                                  f"Or use fused=None (automatic) or foreach=True; {_SEE_ENV}")
    backend = FusedBackend(module, device.type, strict=True)
    backend._checked(device)  # raises, naming the failed check
    return backend


def load_backend_or_none(device: torch.device) -> Optional[KernelBackend]:
    """The fused backend for the automatic choice, or None (falls back to foreach), saying once why.

    Rank-local: when this process cannot load the op or its self-check fails on ``device``, this rank alone
    falls back; the warning names the rank.
    """
    device = _resolve(device)
    if device.type not in ("cpu", "cuda"):
        return None
    module, why = _load_module(device.type)
    if module is None:
        _warn_once(f"load:{device.type}", _fallback_message(torch.device(device.type), why))
        return None
    backend = FusedBackend(module, device.type, strict=False)
    if not backend._checked(device):
        return None
    return backend


# -- self-check -------------------------------------------------------------------------------------------------
# NOTE: [self-check] On first use on a device the op runs a small fixed problem next to the foreach backend on
# that device: tensors of 1, 7, 1003 and 4099 elements, and a flat tensor cut into segments (a layer split in two,
# an empty segment, a segment that is the flat's tail, a layer with no segment, gaps); fp32, bf16 and fp16
# gradients; a first step (m = gh) and a later one; L2 and decoupled weight decay; and, for the CPU op, the
# layer-at-a-time step. It costs milliseconds (about 25 ms on a 2-core VM, once per device and process) and one
# host synchronisation, issues no collective, and catches what a build cannot: a binary for the wrong GPU
# architecture, a broken toolchain, a kernel that misbehaves on hardware it was never run on. The differences
# are measured as below and must stay under:
#
# | check                       | measure                                | tol  | why                                  |
# |-----------------------------|----------------------------------------|------|--------------------------------------|
# | sq_norms, sq_norms_segments | max over layers of |a - b| / |b|        | 1e-5 | both sum in fp32 in different orders |
# |                             |                                        |      | (<= 128 terms per fp32 partial):     |
# |                             |                                        |      | ~1e-6 worst; an error is >= 1e-3     |
# | update, update_segments     | per tensor max|a-b| / max|b|, w and m  | 1e-5 | the same expressions, one FMA or the |
# |                             |                                        |      | decoupled factor (1 - lr*wd) apart:  |
# |                             |                                        |      | a few ulp (~1e-7)                    |
# | layer_step (CPU op)         | as update, w, m and v                  | 1e-5 | the norm differences above, carried  |
# |                             |                                        |      | into d and the update: ~1e-6         |
SELF_CHECK_TOLERANCE = {"sq_norms": 1e-5, "update": 1e-5, "layer_step": 1e-5}
_CHECK_SIZES = (1, 7, 1003, 4099)
# (offset, length, layer) over a flat of 5200: layer 0 in two segments, an empty one, a gap, the flat's tail
# (layer 2), layer 3 without a segment
_CHECK_SEGMENTS = ((3, 700, 0), (703, 0, 1), (703, 1500, 1), (2210, 1003, 0), (3213, 1987, 2))
_CHECK_FLAT, _CHECK_LAYERS = 5200, 4


class CheckResult:
    """One comparison of the self-check: its name, the measured difference and the tolerance."""

    def __init__(self, name: str, device: torch.device, diff: float, tol: float, error: Optional[str] = None):
        self.name, self.device, self.diff, self.tol, self.error = name, device, diff, tol, error

    @property
    def passed(self) -> bool:
        return self.error is None and self.diff <= self.tol  # NaN fails

    def describe(self) -> str:
        if self.error is not None:
            return f"self-check {self.name!r} on {self.device} raised: {self.error}"
        return (f"self-check {self.name!r} on {self.device}: worst relative difference {self.diff:.3g} "
                f"> tolerance {self.tol:g}")


def _rel_elementwise(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max() if b.numel() else torch.zeros((), dtype=torch.float64)


def _rel_normwise(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    worst = [((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
             for x, y in zip(xs, ys) if y.numel()]
    return torch.stack(worst).max()


def self_check(module: Any, device: Union[torch.device, str]) -> list[CheckResult]:
    """Every comparison of NOTE: [self-check] of ``module`` (a loaded op) against foreach on ``device``."""
    from ..optimizer import second_moment_

    device = _resolve(device)
    foreach = ForeachBackend()
    table = torch.tensor(_CHECK_SEGMENTS, dtype=torch.int64)
    segs = SegmentTable(*zip(*_CHECK_SEGMENTS))
    gen = torch.Generator().manual_seed(20240607)
    scales = (3.0, 0.01, 1.0, 50.0)
    base_g = [torch.randn(n, generator=gen) * s for n, s in zip(_CHECK_SIZES, scales)]
    base_w = [torch.randn(n, generator=gen) for n in _CHECK_SIZES]
    base_m = [torch.randn(n, generator=gen) * 0.1 for n in _CHECK_SIZES]
    flat_g0 = torch.randn(_CHECK_FLAT, generator=gen)
    flat_w0 = torch.randn(_CHECK_FLAT, generator=gen)
    flat_m0 = torch.randn(_CHECK_FLAT, generator=gen) * 0.1
    denoms = (torch.rand(len(_CHECK_SIZES), generator=gen) + 0.5).to(device)
    layer_denoms = (torch.rand(_CHECK_LAYERS, generator=gen) + 0.5).to(device)

    pending: list[tuple[str, Any]] = []  # (name, 0-dim tensor or error text)

    def run(name: str, fn) -> None:
        try:
            pending.append((name, fn()))
        except Exception as exc:  # a kernel that cannot run here (wrong architecture, ...) fails its check
            pending.append((name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"))

    for gd in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(gd).replace("torch.", "")
        grads = [g.to(device=device, dtype=gd) for g in base_g]
        flat_g = flat_g0.to(device=device, dtype=gd)
        run(f"sq_norms {tag}", lambda: _rel_elementwise(module.sq_norms(grads), foreach.sq_norms(grads)))
        run(f"sq_norms_segments {tag}", lambda: _rel_elementwise(
            module.sq_norms_segments(flat_g, table, _CHECK_LAYERS),
            foreach.sq_norms_segments(flat_g, segs, _CHECK_LAYERS)))
        for first in (True, False):
            a1, c1 = (0.0, 1.0) if first else (0.95, 0.05)
            for decoupled in (False, True):
                case = f"{tag} {'first' if first else 'later'}-step {'decoupled' if decoupled else 'L2'}"
                kw = dict(lr=0.01, beta1=a1, grad_scale=c1, weight_decay=0.01, decoupled=decoupled)

                def update_list():
                    w1 = [w.to(device) for w in base_w]
                    m1 = [torch.zeros_like(w) if first else m.to(device) for w, m in zip(w1, base_m)]
                    w2, m2 = [w.clone() for w in w1], [m.clone() for m in m1]
                    module.update(w1, grads, m1, denoms, kw["lr"], a1, c1, kw["weight_decay"], decoupled)
                    foreach.update_(w2, grads, m2, denoms, **kw)
                    return torch.maximum(_rel_normwise(w1, w2), _rel_normwise(m1, m2))

                def update_flat():
                    w1 = flat_w0.to(device)
                    m1 = torch.zeros_like(w1) if first else flat_m0.to(device)
                    w2, m2 = w1.clone(), m1.clone()
                    module.update_segments(w1, flat_g, m1, table, layer_denoms, kw["lr"], a1, c1, kw["weight_decay"],
                                           decoupled)
                    foreach.update_segments_(w2, flat_g, m2, segs, layer_denoms, **kw)
                    return torch.maximum(_rel_normwise([w1], [w2]), _rel_normwise([m1], [m2]))

                run(f"update {case}", update_list)
                run(f"update_segments {case}", update_flat)
                if device.type == "cpu" and hasattr(module, "layer_step"):
                    def layer_step():
                        w1 = [w.to(device) for w in base_w]
                        m1 = [torch.zeros_like(w) if first else m.to(device) for w, m in zip(w1, base_m)]
                        v1 = [torch.zeros(()) if first else torch.tensor(0.5 + i) for i in range(len(w1))]
                        w2, m2 = [w.clone() for w in w1], [m.clone() for m in m1]
                        v2 = torch.stack([v.clone() for v in v1])
                        a2, c2 = (0.0, 1.0) if first else (0.98, 0.02)
                        module.layer_step(w1, grads, m1, v1, [], 0.01, a1, c1, a2, c2, 1e-8, 0.01, decoupled)
                        d = second_moment_(v2, foreach.sq_norms(grads), None, a2=a2, c2=c2, eps=1e-8)
                        foreach.update_(w2, grads, m2, d, **kw)
                        return torch.stack([_rel_normwise(w1, w2), _rel_normwise(m1, m2),
                                            _rel_elementwise(torch.stack(v1), v2)]).max()

                    run(f"layer_step {case}", layer_step)

    names = [n for n, r in pending if isinstance(r, Tensor)]
    values = torch.stack([r.double().reshape(()) for _, r in pending if isinstance(r, Tensor)]).cpu().tolist() \
        if names else []
    diffs = dict(zip(names, values))
    results = []
    for name, r in pending:
        tol = SELF_CHECK_TOLERANCE[name.split()[0].replace("_segments", "")]
        if isinstance(r, Tensor):
            results.append(CheckResult(name, device, diffs[name], tol))
        else:
            results.append(CheckResult(name, device, float("nan"), tol, error=r))
    return results


# NOTE: [8-bit self-check] Before the op's 8-bit entry points are first used on a device they run a small fixed
# problem next to the foreach backend there: runs of 4096 and 5000 elements (whole tensors) and three pieces of one
# layer of 1300 elements cut inside blocks (the boundary pass, a MAX over the pieces, the update), both maps, both
# roundings, fp32 and bf16 gradients, two steps. The backends compute the same IEEE operations, so the results
# should agree bit for bit; the check allows a code one apart in 1e-3 of the codes (an ulp of difference in m at a
# code boundary) and 1e-6 normwise on w and the scales. A wrong kernel is off in most codes. About 20 ms on a CPU.
Q8_SELF_CHECK_TOLERANCE = {"codes": 1e-3, "w": 1e-6, "scales": 1e-6}
_Q8_CHECK_PIECES = ((0, 500), (500, 513), (513, 1300))
_q8_checks: dict[tuple[int, str], tuple[Any, Optional[str]]] = {}


def check_device_q8(module: Any, device: torch.device) -> Optional[str]:
    """The 8-bit self-check of ``module`` on ``device``, once per module and device: None when it passed."""
    key = (id(module), str(device))
    entry = _q8_checks.get(key)
    if entry is None or entry[0] is not module:
        failed = [r for r in self_check_q8(module, device) if not r.passed]
        entry = _q8_checks[key] = (module, failed[0].describe() if failed else None)
    return entry[1]


def self_check_q8(module: Any, device: Union[torch.device, str]) -> list[CheckResult]:
    """Every comparison of NOTE: [8-bit self-check]: the op's 8-bit entry points against foreach on ``device``."""
    device = _resolve(device)
    foreach = ForeachBackend()
    results = []
    gen = torch.Generator().manual_seed(20250101)
    sizes, L = (4096, 5000), 1300
    w0 = [torch.randn(n, generator=gen) for n in (*sizes, L)]
    g0 = [[torch.randn(n, generator=gen) * 0.1 for n in (*sizes, L)] for _ in range(2)]
    op = FusedBackend(module, device.type, strict=False)
    op._q8_device_ok[device] = True  # the op itself, unchecked, inside its own check
    for qmap in eb.MAPS:
        for rounding in eb.ROUNDINGS:
            for gd in (torch.float32, torch.bfloat16):
                name = f"q8 {qmap}/{rounding} {str(gd).replace('torch.', '')}"
                try:
                    a = _q8_check_run(op, device, qmap, rounding, gd, w0, g0, sizes, L)
                    b = _q8_check_run(foreach, device, qmap, rounding, gd, w0, g0, sizes, L)
                    codes = float(np.mean([float((x != y).double().mean()) for x, y in zip(a["codes"], b["codes"])]))
                    far = any(bool(((x.int() - y.int()).abs() > 1).any()) for x, y in zip(a["codes"], b["codes"]))
                    w = float(_rel_normwise(a["w"], b["w"]))
                    sc = float(_rel_normwise(a["scales"], b["scales"]))
                    worst = max(codes / Q8_SELF_CHECK_TOLERANCE["codes"], w / Q8_SELF_CHECK_TOLERANCE["w"],
                                sc / Q8_SELF_CHECK_TOLERANCE["scales"], 2.0 if far else 0.0)
                    results.append(CheckResult(name, device, worst, 1.0))
                except Exception as exc:  # a kernel that cannot run here fails its check
                    results.append(CheckResult(name, device, float("nan"), 1.0,
                                               error=f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
    return results


def _q8_check_run(backend, device, qmap, rounding, gd, w0, g0, sizes, L) -> dict:
    q8 = eb.Q8Config(qmap, rounding, seed=3)
    w = [x.clone().to(device) for x in w0[: len(sizes)]]
    codes = [torch.zeros(n, dtype=eb.CODE_DTYPE, device=device) for n in sizes]
    scales = [torch.zeros(eb.n_blocks(0, n), device=device) for n in sizes]
    pw = [w0[-1][a:b].clone().to(device) for a, b in _Q8_CHECK_PIECES]
    pq = [torch.zeros(b - a, dtype=eb.CODE_DTYPE, device=device) for a, b in _Q8_CHECK_PIECES]
    ps = [torch.zeros(eb.n_blocks(a, b - a), device=device) for a, b in _Q8_CHECK_PIECES]
    pruns = eb.Q8Runs([a for a, _ in _Q8_CHECK_PIECES], [L] * len(_Q8_CHECK_PIECES), [9] * len(_Q8_CHECK_PIECES))
    for k, gs in enumerate(g0, start=1):
        kw = dict(beta1=0.0 if k == 1 else 0.9, grad_scale=1.0, weight_decay=0.01, decoupled=k == 2, q8=q8)
        g = [x.to(device=device, dtype=gd) for x in gs]
        d = torch.tensor([0.9, 1.7], device=device)
        backend.q8_update_(w, g[: len(sizes)], codes, scales, d, eb.Q8Runs.plain(sizes), None, lr=0.01, step=k, **kw)
        pg = [g[-1][a:b] for a, b in _Q8_CHECK_PIECES]
        pd = torch.full((len(_Q8_CHECK_PIECES),), 1.3, device=device)
        loc = backend.q8_boundary_absmax(pw, pg, pq, ps, pd, pruns, **kw).cpu()
        # the all-reduce MAX over the pieces, by layer block
        best: dict[int, float] = {}
        for i, (a, b) in enumerate(_Q8_CHECK_PIECES):
            first, end = eb.block_range(a, b - a)
            for col, blk in ((0, first), (1, end - 1)):
                best[blk] = max(best.get(blk, 0.0), float(loc[i, col]))
        bnd = torch.tensor([[best[eb.block_range(a, b - a)[0]], best[eb.block_range(a, b - a)[1] - 1]]
                            for a, b in _Q8_CHECK_PIECES], device=device)
        backend.q8_update_(pw, pg, pq, ps, pd, pruns, bnd, lr=0.01, step=k, **kw)
    return dict(codes=[x.cpu() for x in codes + pq], w=[x.cpu() for x in w + pw], scales=[x.cpu() for x in scales + ps])


def describe(build: bool = False) -> list[dict[str, Any]]:
    """One entry per native op for the environment report: ``name, available, reason, build_dir``.

    Builds nothing unless ``build=True``: ``reason`` says "loaded" (in this process), "built" (a cached module
    exists), "buildable" (ninja and a compiler are present; built on first use) or what is missing.
    """
    from ..ops.builder import CPUOpBuilder, CUDAOpBuilder, OpBuildError, OpBuilder

    rows = []
    for label, make in (("fused-cpu", CPUOpBuilder), ("fused-cuda", CUDAOpBuilder)):
        try:
            b = make()
        except OpBuildError as exc:
            rows.append(dict(name=label, available=False, reason=str(exc), build_dir=""))
            continue
        d = str(b.build_dir())
        if build:
            try:
                b.load()
            except OpBuildError as exc:
                rows.append(dict(name=label, available=False, reason=str(exc), build_dir=d))
                continue
        problems = b.missing()
        if d in OpBuilder._loaded:
            mod = OpBuilder._loaded[d]
            rows.append(dict(name=label, available=True, reason=f"loaded ({b.name}, simd={getattr(mod, 'simd', 'cuda')})",
                             build_dir=d))
        elif problems:
            rows.append(dict(name=label, available=False, reason="; ".join(problems), build_dir=d))
        elif b.is_built():
            rows.append(dict(name=label, available=True, reason=f"built ({b.name}, cached)", build_dir=d))
        else:
            rows.append(dict(name=label, available=True,
                             reason=f"buildable ({b.name}: ninja and a compiler found; built on first use)", build_dir=d))
    return rows
