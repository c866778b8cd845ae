"""Make ``"optimizer": {"type": "NovoGrad"}`` work in DeepSpeed, ZeRO-aware.

``register()`` does three things (DEEPSPEED_NOTES §1.3, options A+B+C):

A. ``torch.optim.NovoGrad = NovoGrad``: DeepSpeed resolves unknown optimizer names through ``torch.optim``.
B. appends NovoGrad to ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` so ZeRO needs no
   ``zero_allow_untested_optimizer``.
C. wraps ``DeepSpeedEngine._configure_optimizer`` once: before it runs, configurations that DeepSpeed hard-wires
   to its own CPU Adam are refused; after it runs, a NovoGrad basic optimizer is bound to the wrapper DeepSpeed
   put around it (``bind``), so it knows which slices of each flat fp32 partition belong to which layer.

Patching is version-gated: outside the verified DeepSpeed range it warns and does nothing, unless
``NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED=1``.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Optional

import torch

from ..optimizer import NovoGrad

logger = logging.getLogger("novograd_ds")

__all__ = ["register", "unregister", "bind", "is_registered", "status", "check_engine_config", "VERIFIED_DEEPSPEED"]

#: DeepSpeed versions whose internals this integration was verified against: [low, high).
VERIFIED_DEEPSPEED = ((0, 19), (0, 20))
OVERRIDE_ENV = "NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED"
_WRAPPED_MARK = "_novograd_ds_wrapped"
_TORCH_OPTIM_NAMES = ("NovoGrad",)


class UnsupportedDeepSpeedConfig(ValueError):
    """A DeepSpeed feature NovoGrad cannot run under; the message names the config key to change."""


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _version_ok(version: str) -> bool:
    low, high = VERIFIED_DEEPSPEED
    return low <= _version_tuple(version)[:2] < high


def is_registered() -> bool:
    """True if ``DeepSpeedEngine._configure_optimizer`` currently carries the NovoGrad hook."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return False
    return getattr(DeepSpeedEngine._configure_optimizer, _WRAPPED_MARK, False)


def status() -> dict[str, str]:
    """What ``python -m novograd_ds.env`` reports about the integration."""
    import deepspeed
    from deepspeed.runtime.zero import utils as zero_utils

    version = getattr(deepspeed, "__version__", "0")
    low, high = VERIFIED_DEEPSPEED
    verified = f"{low[0]}.{low[1]} <= version < {high[0]}.{high[1]}"
    return {
        "deepspeed version": f"{version} ({'verified' if _version_ok(version) else 'NOT verified'}: {verified})",
        '"type": "NovoGrad"': "resolves" if getattr(torch.optim, "NovoGrad", None) is NovoGrad else
        "not registered (import novograd_ds, or novograd_ds.register())",
        "ZeRO-supported": str(NovoGrad in getattr(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", [])),
        "bind hook": "installed" if is_registered() else "not installed",
        "autoregister": "off (NOVOGRAD_DS_AUTOREGISTER=0)" if os.environ.get("NOVOGRAD_DS_AUTOREGISTER") == "0"
        else "on import",
    }


def register(*, force: bool = False) -> bool:
    """Register NovoGrad with DeepSpeed (idempotent). Returns True when the hooks are in place.

    Call it before ``deepspeed.initialize``; ``import novograd_ds`` already does, unless
    ``NOVOGRAD_DS_AUTOREGISTER=0``. ``force=True`` (or ``NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED=1``) patches a
    DeepSpeed version outside the verified range.
    """
    try:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError as err:
        raise ImportError(f"novograd_ds.register(): DeepSpeed is not importable ({err}); pip install deepspeed") from err

    version = getattr(deepspeed, "__version__", "0")
    if not _version_ok(version) and not force and os.environ.get(OVERRIDE_ENV, "0") != "1":
        low, high = VERIFIED_DEEPSPEED
        warnings.warn(
            f"novograd_ds: DeepSpeed {version} is outside the verified range "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}; NovoGrad was NOT registered with DeepSpeed (ZeRO layouts "
            f"depend on DeepSpeed internals). Install deepspeed>={low[0]}.{low[1]},<{high[0]}.{high[1]}, or set "
            f"{OVERRIDE_ENV}=1 to register anyway at your own risk.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    for name in _TORCH_OPTIM_NAMES:
        setattr(torch.optim, name, NovoGrad)
    if NovoGrad not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(NovoGrad)

    original = DeepSpeedEngine._configure_optimizer
    if not getattr(original, _WRAPPED_MARK, False):

        @functools.wraps(original)
        def _configure_optimizer(self, client_optimizer, model_parameters):
            if _is_novograd_request(self, client_optimizer):
                check_engine_config(self)
            original(self, client_optimizer, model_parameters)
            basic = getattr(self, "basic_optimizer", None)
            if isinstance(basic, NovoGrad) and not getattr(basic, "_naive_per_tensor", False):
                if client_optimizer is not None and not isinstance(client_optimizer, NovoGrad):
                    check_engine_config(self)  # a callable that built a NovoGrad
                bind(self)

        setattr(_configure_optimizer, _WRAPPED_MARK, True)
        _configure_optimizer.__wrapped_original__ = original
        DeepSpeedEngine._configure_optimizer = _configure_optimizer
    return True


def unregister() -> None:
    """Undo :func:`register`: remove the torch.optim name, the ZeRO support entry and the engine hook."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError:
        return
    for name in _TORCH_OPTIM_NAMES:
        if getattr(torch.optim, name, None) is NovoGrad:
            delattr(torch.optim, name)
    while NovoGrad in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.remove(NovoGrad)
    current = DeepSpeedEngine._configure_optimizer
    if getattr(current, _WRAPPED_MARK, False):
        DeepSpeedEngine._configure_optimizer = current.__wrapped_original__


def _is_novograd_request(engine: Any, client_optimizer: Any) -> bool:
    if client_optimizer is None:
        try:
            return engine.optimizer_name() in _TORCH_OPTIM_NAMES
        except Exception:  # pragma: no cover - defensive: an engine without a config section
            return False
    return isinstance(client_optimizer, NovoGrad) and not getattr(client_optimizer, "_naive_per_tensor", False)


def check_engine_config(engine: Any) -> None:
    """Refuse, with one clear message, DeepSpeed features that are hard-wired to DeepSpeed's own CPU Adam."""
    problems = []
    offload = engine.zero_offload_optimizer()
    ratio = getattr(offload, "ratio", 1.0) if offload is not None else 1.0
    if offload is not None and ratio is not None and ratio < 1.0:
        problems.append(
            f"partial optimizer offload (zero_optimization.offload_optimizer.ratio={ratio}): DeepSpeed steps the "
            "GPU-resident part with a torch AdamW and asserts DeepSpeedCPUAdam for the rest; set the ratio to 1.0"
        )
    if offload is not None and getattr(offload, "super_offload", False):
        problems.append(
            "SuperOffload (zero_optimization.offload_optimizer.super_offload=true) drives DeepSpeedCPUAdam's "
            "step_subgroup/rollback_subgroup directly; set super_offload to false"
        )
    if getattr(engine._config.zero_config, "zenflow", None) is not None:
        problems.append("ZenFlow (zero_optimization.zenflow) replaces the optimizer with ZenFlowCPUAdam; remove "
                        "the zenflow section")
    if engine.fp16_master_weights_and_gradients():
        problems.append("fp16 master weights (fp16.fp16_master_weights_and_grads=true): NovoGrad keeps fp32 master "
                        "weights; set it to false")
    if engine.bf16_master_weights_and_gradients():
        problems.append("bf16 master weights (bf16.bf16_master_weights_and_grads=true): NovoGrad keeps fp32 master "
                        "weights; set it to false")
    if engine.bf16_optimizer_states():
        problems.append("bf16 optimizer states (bf16.bf16_optimizer_states=true) are a DeepSpeedCPUAdam feature; "
                        "set it to false")
    if problems:
        raise UnsupportedDeepSpeedConfig(
            "NovoGrad cannot run under this DeepSpeed configuration:\n  - " + "\n  - ".join(problems)
            + "\n(these features are hard-wired to DeepSpeed's own CPU Adam)"
        )


def bind(engine: Any) -> Optional[NovoGrad]:
    """Tell the engine's NovoGrad which layer each slice of its flat partitions belongs to.

    Called automatically after ``deepspeed.initialize`` once :func:`register` ran. Call it yourself right after
    ``deepspeed.initialize`` if registration was off (``NOVOGRAD_DS_AUTOREGISTER=0``) or skipped. Idempotent.
    Returns the bound NovoGrad, or None if the engine's optimizer is not a NovoGrad.
    """
    from .megatron import configure_from_engine
    from .zero import layouts_for_engine
    from .zero_checkpoint import attach as attach_checkpoint_hooks

    basic = getattr(engine, "basic_optimizer", None)
    if not isinstance(basic, NovoGrad):
        return None
    basic.bind_layouts(layouts_for_engine(engine, basic))
    configure_from_engine(basic, engine)  # the TP group from engine.mpu (or an explicit one), see megatron.py
    attach_checkpoint_hooks(engine, basic)  # load errors name the file; universal loads (zero_checkpoint.py)
    return basic
