"""Make ``"optimizer": {"type": "NovoGrad"}`` work in DeepSpeed, ZeRO-aware.

``register()`` does four things (DEEPSPEED_NOTES §1.3, options A+B+C):

A. ``torch.optim.NovoGrad = NovoGrad``: DeepSpeed resolves unknown optimizer names through ``torch.optim``.
B. appends NovoGrad to ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` so ZeRO needs no
   ``zero_allow_untested_optimizer``.
C. wraps ``DeepSpeedEngine._configure_optimizer`` once: before it runs, configurations NovoGrad cannot run under
   are refused (:func:`check_engine_config`); after it runs, a NovoGrad basic optimizer is bound to the wrapper
   DeepSpeed put around it (``bind``), so it knows which slices of each flat fp32 partition belong to which layer.
D. wraps ``DeepSpeedConfig._initialize_params`` once so that ``"type": "novograd"`` in any letter case names
   NovoGrad, as DeepSpeed's own names ("adam", "Adam") do: DeepSpeed lower-cases only the names it knows, and
   checks the name against ``torch.optim`` while the engine is built, before ``_configure_optimizer`` runs.

Patching is version-gated to the DeepSpeed releases this integration is tested with (:data:`TESTED_DEEPSPEED`).
Outside that range ``register()`` warns and installs only a refusal: a DeepSpeed config or client optimizer that asks
for NovoGrad fails at ``deepspeed.initialize`` with :class:`UnsupportedDeepSpeedVersion`, which names the fix
(install a tested DeepSpeed, or ``NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED=1`` to register anyway).
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

__all__ = ["register", "unregister", "bind", "is_registered", "status", "check_engine_config", "TESTED_DEEPSPEED",
           "VERIFIED_DEEPSPEED", "UnsupportedDeepSpeedConfig", "UnsupportedDeepSpeedVersion"]

#: DeepSpeed minor versions this integration is tested with, ``[low, high)``: 0.16, 0.17, 0.18 and 0.19 (CI runs the
#: ZeRO equivalence suite under the latest patch of each; see docs/zero.md, "DeepSpeed versions").
TESTED_DEEPSPEED = ((0, 16), (0, 20))
VERIFIED_DEEPSPEED = TESTED_DEEPSPEED  # the earlier name
OVERRIDE_ENV = "NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED"
_WRAPPED_MARK = "_novograd_ds_wrapped"
_REFUSAL_MARK = "_novograd_ds_refusal"
_TORCH_OPTIM_NAMES = ("NovoGrad",)
_CONFIG_NAME = "novograd"  # "type" values naming NovoGrad, compared lower-cased


class UnsupportedDeepSpeedConfig(ValueError):
    """A DeepSpeed feature NovoGrad cannot run under; the message names the config key to change."""


class UnsupportedDeepSpeedVersion(RuntimeError):
    """NovoGrad was asked for under a DeepSpeed release outside :data:`TESTED_DEEPSPEED`; the message names the fix."""


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _version_ok(version: str) -> bool:
    low, high = TESTED_DEEPSPEED
    return low <= _version_tuple(version)[:2] < high


def _range_text() -> str:
    (l0, l1), (h0, h1) = TESTED_DEEPSPEED
    return f"deepspeed>={l0}.{l1},<{h0}.{h1}"


def _version_fix(version: str) -> str:
    return (f"DeepSpeed {version} is outside the range novograd_ds is tested with ({_range_text()}; ZeRO layouts "
            f"depend on DeepSpeed internals). Install a tested release (pip install \"{_range_text()}\"), or set "
            f"{OVERRIDE_ENV}=1 (or call novograd_ds.register(force=True)) to register anyway at your own risk")


def _names_novograd(name: Any) -> bool:
    return isinstance(name, str) and name.lower() == _CONFIG_NAME


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
    return {
        "deepspeed version": f"{version} ({'tested' if _version_ok(version) else 'NOT tested'}: {_range_text()})",
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
    DeepSpeed version outside the tested range. Without it, such a version gets a warning and only a refusal
    (NovoGrad asked for at ``deepspeed.initialize`` raises :class:`UnsupportedDeepSpeedVersion`); returns False.
    """
    try:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError as err:
        raise ImportError(f"novograd_ds.register(): DeepSpeed is not importable ({err}); pip install deepspeed") from err

    version = getattr(deepspeed, "__version__", "0")
    if not _version_ok(version) and not force and os.environ.get(OVERRIDE_ENV, "0") != "1":
        warnings.warn(f"novograd_ds: NovoGrad was NOT registered with DeepSpeed: {_version_fix(version)}.",
                      RuntimeWarning, stacklevel=2)
        _install_refusal(version)
        return False

    _remove_hooks()  # a refusal installed earlier
    for name in _TORCH_OPTIM_NAMES:
        setattr(torch.optim, name, NovoGrad)
    if NovoGrad not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(NovoGrad)

    original = DeepSpeedEngine._configure_optimizer

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

    _patch(DeepSpeedEngine, "_configure_optimizer", _configure_optimizer, _WRAPPED_MARK)
    _patch_config_names(_WRAPPED_MARK, refuse_version=None)
    return True


def _patch(owner: Any, attr: str, wrapper: Any, mark: str) -> None:
    """Replace ``owner.attr`` by ``wrapper`` (which must wrap the current one), marked so it is undone once."""
    setattr(wrapper, mark, True)
    wrapper.__wrapped_original__ = getattr(owner, attr)
    setattr(owner, attr, wrapper)


def _unpatch(owner: Any, attr: str) -> None:
    current = getattr(owner, attr, None)
    while current is not None and (getattr(current, _WRAPPED_MARK, False) or getattr(current, _REFUSAL_MARK, False)):
        current = current.__wrapped_original__
        setattr(owner, attr, current)


def _config_class() -> Any:
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:  # pragma: no cover - every DeepSpeed release has it
        return None
    return DeepSpeedConfig if hasattr(DeepSpeedConfig, "_initialize_params") else None


def _patch_config_names(mark: str, refuse_version: Optional[str]) -> None:
    """D: after DeepSpeed parses a config, a ``"type"`` naming NovoGrad in any letter case becomes "NovoGrad"
    (``refuse_version``: instead refuse it, naming the fix for that DeepSpeed version)."""
    cls = _config_class()
    if cls is None:
        return
    original = cls._initialize_params

    @functools.wraps(original)
    def _initialize_params(self, param_dict):
        original(self, param_dict)
        if _names_novograd(getattr(self, "optimizer_name", None)):
            if refuse_version is not None:
                raise UnsupportedDeepSpeedVersion(f"NovoGrad (\"optimizer\": {{\"type\": "
                                                  f"\"{self.optimizer_name}\"}}): {_version_fix(refuse_version)}")
            self.optimizer_name = _TORCH_OPTIM_NAMES[0]

    _patch(cls, "_initialize_params", _initialize_params, mark)


def _install_refusal(version: str) -> None:
    """Outside the tested range: NovoGrad asked for at ``deepspeed.initialize`` raises, naming the fix."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    _remove_hooks()
    original = getattr(DeepSpeedEngine, "_configure_optimizer", None)
    if original is not None:

        @functools.wraps(original)
        def _configure_optimizer(self, client_optimizer, model_parameters):
            if isinstance(client_optimizer, NovoGrad):
                raise UnsupportedDeepSpeedVersion(f"NovoGrad (a client optimizer): {_version_fix(version)}")
            return original(self, client_optimizer, model_parameters)

        _patch(DeepSpeedEngine, "_configure_optimizer", _configure_optimizer, _REFUSAL_MARK)
    _patch_config_names(_REFUSAL_MARK, refuse_version=version)


def _remove_hooks() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    _unpatch(DeepSpeedEngine, "_configure_optimizer")
    cls = _config_class()
    if cls is not None:
        _unpatch(cls, "_initialize_params")


def unregister() -> None:
    """Undo :func:`register`: remove the torch.optim name, the ZeRO support entry and the hooks."""
    try:
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError:
        return
    for name in _TORCH_OPTIM_NAMES:
        if getattr(torch.optim, name, None) is NovoGrad:
            delattr(torch.optim, name)
    while NovoGrad in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.remove(NovoGrad)
    _remove_hooks()


def _is_novograd_request(engine: Any, client_optimizer: Any) -> bool:
    if client_optimizer is None:
        try:
            return _names_novograd(engine.optimizer_name())
        except Exception:  # pragma: no cover - defensive: an engine without a config section
            return False
    return isinstance(client_optimizer, NovoGrad) and not getattr(client_optimizer, "_naive_per_tensor", False)


def _setting(engine: Any, accessor: str, default: Any = None) -> Any:
    """``engine.<accessor>()``, or ``default`` where this DeepSpeed release has no such setting (and so no such
    feature): ``bf16_master_weights_and_gradients``/``bf16_optimizer_states`` appear in 0.18, ``torch_autocast`` in
    0.17."""
    fn = getattr(engine, accessor, None)
    return default if fn is None else fn()


def check_engine_config(engine: Any) -> None:
    """Refuse, with one clear message naming the config key, DeepSpeed features NovoGrad cannot run under: those
    DeepSpeed hard-wires to its own CPU Adam, and those that would make NovoGrad silently wrong or hang."""
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
    if _setting(engine, "fp16_master_weights_and_gradients", False):
        problems.append("fp16 master weights (fp16.fp16_master_weights_and_grads=true): NovoGrad keeps fp32 master "
                        "weights; set it to false")
    if _setting(engine, "bf16_master_weights_and_gradients", False):
        problems.append("bf16 master weights (bf16.bf16_master_weights_and_grads=true): NovoGrad keeps fp32 master "
                        "weights; set it to false")
    if _setting(engine, "bf16_optimizer_states", False):
        problems.append("bf16 optimizer states (bf16.bf16_optimizer_states=true) are a DeepSpeedCPUAdam feature; "
                        "set it to false")
    if engine.zero_optimization() and getattr(engine._config.zero_config, "elastic_checkpoint", False):
        problems.append(
            "elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint=true): DeepSpeed slices every optimizer "
            "state tensor per element to re-partition it, which corrupts NovoGrad's per-layer second moment; set it "
            "to false (to change the world size, use universal checkpoints: python -m "
            "deepspeed.checkpoint.ds_to_universal, then \"checkpoint\": {\"load_universal\": true})"
        )
    if _setting(engine, "torch_autocast_enabled", False) and _setting(engine, "torch_autocast_dtype") == torch.float16:
        problems.append(
            "torch_autocast with fp16 (torch_autocast.enabled=true, torch_autocast.dtype=fp16): DeepSpeed's "
            "GradScaler decides overflow on each rank from its own gradient shard, so one rank skips the step while "
            "another enters NovoGrad's all-reduce and waits forever; use \"torch_autocast\": {\"dtype\": "
            "\"bfloat16\"}, or the \"fp16\" section (its overflow check is agreed across ranks)"
        )
    if problems:
        raise UnsupportedDeepSpeedConfig(
            "NovoGrad cannot run under this DeepSpeed configuration:\n  - " + "\n  - ".join(problems)
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
    # DeepSpeed hands zeros for a parameter without a gradient, also to the plain path (stage 0 fp32, no wrapper)
    basic.skip_zero_gradients(True)
    basic.bind_layouts(layouts_for_engine(engine, basic))
    configure_from_engine(basic, engine)  # the TP group from engine.mpu (or an explicit one), see megatron.py
    attach_checkpoint_hooks(engine, basic)  # load errors name the file; universal loads (zero_checkpoint.py)
    return basic
