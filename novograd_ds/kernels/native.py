"""The native fused backend (``fused=True``): one C++ (CPU) or CUDA call per pass for a whole list of tensors.

The ops are JIT-built with ninja on first use (:mod:`novograd_ds.ops.builder`) and cached on disk, so
constructing :class:`~novograd_ds.NovoGrad` stays cheap; the first ``step()`` builds or loads them.

What the ops support: fp32 parameters and ``exp_avg`` with fp32, bf16 or fp16 gradients, contiguous tensors on
one device. Anything else (bf16/fp16/fp64 parameters, fp64 gradients, non-contiguous tensors) goes to the
foreach backend when the backend was chosen automatically; with an explicit ``fused=True`` an unsupported dtype
raises :class:`NativeOpUnavailable` naming it (non-contiguous tensors still take the foreach path: that is
a layout matter, not a choice the user made).

Distributed jobs: :func:`load_backend_or_none` and :func:`load_backend` are collective when
``torch.distributed`` is initialised. Local rank 0 builds first while the others wait at a barrier (so ranks do
not race on the build directory), then every rank reports whether it has the op and all agree (MIN all-reduce):
either every rank uses the fused op or none does. Every rank must therefore reach its first step, as a
DeepSpeed/DDP job does.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import KernelBackend, SegmentTable
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
    to :class:`ForeachBackend`, as they would have without the op.
    """

    name = "fused"

    def __init__(self, module: Any, device_type: str, *, strict: bool):
        self.module = module
        self.device_type = device_type
        self.strict = strict
        self._fallback = ForeachBackend()

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


# -- loading, collectively ----------------------------------------------------------------------------------
_results: dict[str, tuple[Any, Optional[str]]] = {}  # device type -> (module or None, why not)
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


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _load_everywhere(device_type: str) -> tuple[Any, Optional[str]]:
    """Load the op on this process and agree with every rank; cached per device type and process."""
    if device_type in _results:
        return _results[device_type]
    if not _dist_active():
        result = _try_load(device_type)
    else:
        dist = torch.distributed
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        if local_rank == 0:  # builds (or finds the cache) before anyone else touches the build dir
            result = _try_load(device_type)
        dist.barrier()
        if local_rank != 0:
            result = _try_load(device_type)
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if result[0] is not None else 0], dtype=torch.int32, device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0 and result[0] is not None:
            result = (None, "another rank of this job could not load the fused op (its log says why); all ranks "
                            "must use the same backend")
    _results[device_type] = result
    return result


def load_backend(device: torch.device) -> KernelBackend:
    """The fused backend for ``device`` (explicit ``fused=True``); raises :class:`NativeOpUnavailable`."""
    device_type = torch.device(device).type
    module, why = _load_everywhere(device_type)
    if module is None:
        raise NativeOpUnavailable(f"NovoGrad(fused=True) on {device_type}: {why}. "
                                  f"Or use fused=None (automatic) or foreach=True; {_SEE_ENV}")
    return FusedBackend(module, device_type, strict=True)


def load_backend_or_none(device: torch.device) -> Optional[KernelBackend]:
    """The fused backend for the automatic choice, or None (falls back to foreach), saying once why."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return None
    module, why = _load_everywhere(device_type)
    if module is None:
        if device_type not in _warned:
            _warned.add(device_type)
            msg = f"NovoGrad: fused op unavailable on {device_type}, using the foreach backend: {why} ({_SEE_ENV})"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None
    return FusedBackend(module, device_type, strict=False)


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
