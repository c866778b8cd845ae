"""Checkpoint loading of a DeepSpeed engine whose optimizer is NovoGrad (verified on DeepSpeed 0.19.x).

:func:`attach` (called by ``bind``) wraps a few methods *of that engine instance* (nothing class-wide):

* ``engine._load_zero_checkpoint`` / ``engine._load_checkpoint``: a :class:`~novograd_ds.checkpoint.CheckpointError`
  from NovoGrad (a moment or ``step`` missing, a partitioning that changed) is re-raised with the path of the file
  it came from. After a load, a per-element ``exp_avg_sq`` (an expanded or a universal checkpoint) is folded to
  per-layer values at once (``NovoGrad.fold_expanded_state``, collective like the load) and DeepSpeed's
  ``_hp_mapping`` views of it are dropped, so its 4 bytes per element are freed before training resumes.
* the wrapper's universal loaders (``load_hp_checkpoint_state_from_checkpoint_dir[_stage3]``): before DeepSpeed
  reads ``<tag>/zero/<param>/``, every file NovoGrad needs is checked and a missing one is named (DeepSpeed's
  ZeRO-1/2 loader reads whatever files are there and would leave the rest at zero). After DeepSpeed's ZeRO-3
  loader, which copies ``param_groups[0]``'s hyperparameters into every group (DeepSpeed 0.19.8), each group gets
  its own back from ``zero/optimizer_state.pt``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ..checkpoint import CheckpointError, load_mapped
from ..optimizer import STORAGE_KEYS

__all__ = ["attach"]

_MARK = "_novograd_ds_checkpoint_hooks"
_UNIVERSAL_FILES_Z12 = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt")
_UNIVERSAL_FILES_Z3 = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")
_EXPANDED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


def _keep_storage(wrapper: Any):
    """How this run stores its first moment (``STORAGE_KEYS``) is its own choice, not a hyperparameter of the saved
    run: DeepSpeed's universal loaders copy every saved param-group key into the live groups, so these are put back
    (a 32-bit checkpoint resumes an 8-bit run, which quantises the loaded exp_avg, and the other way round)."""
    groups = wrapper.optimizer.param_groups
    saved = [{k: g[k] for k in STORAGE_KEYS if k in g} for g in groups]

    def restore() -> None:
        for g, keep in zip(groups, saved):
            g.update(keep)

    return restore


def attach(engine: Any, basic: Any) -> None:
    """Install the wrappers on ``engine`` and its ZeRO/bf16 wrapper (idempotent)."""
    if getattr(engine, _MARK, None) is basic:
        return
    object.__setattr__(engine, _MARK, basic)
    for name in ("_load_zero_checkpoint", "_load_checkpoint"):
        original = getattr(type(engine), name, None)
        if original is not None:
            object.__setattr__(engine, name, _named_errors(engine, original, name))
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is None or wrapper is basic:
        return
    cls = type(wrapper)
    if hasattr(cls, "load_hp_checkpoint_state_from_checkpoint_dir_stage3"):
        wrapper.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = _zero3_universal(
            wrapper, cls.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    if hasattr(cls, "load_hp_checkpoint_state_from_checkpoint_dir"):
        wrapper.load_hp_checkpoint_state_from_checkpoint_dir = _zero12_universal(
            wrapper, cls.load_hp_checkpoint_state_from_checkpoint_dir)


def _where(engine: Any, name: str, load_dir: str, tag: Any) -> str:
    if engine.load_universal_checkpoint():
        return os.path.join(str(load_dir), str(tag), "zero")
    try:
        if name == "_load_zero_checkpoint":
            return engine._get_zero_ckpt_name(load_dir, tag)
        return engine._get_ckpt_name(load_dir, tag)
    except Exception:  # pragma: no cover - a path is a courtesy; the message stands without it
        return os.path.join(str(load_dir), str(tag))


def _named_errors(engine: Any, original: Any, name: str):
    @functools.wraps(original)
    def load(load_dir, tag, *args, **kwargs):
        try:
            result = original(engine, load_dir, tag, *args, **kwargs)
        except CheckpointError as err:
            where = _where(engine, name, load_dir, tag)
            if where in str(err):
                raise
            raise CheckpointError(f"{where}: {err}") from err
        if name == "_load_zero_checkpoint":
            _drop_expanded_views(engine.optimizer)
            try:
                engine.basic_optimizer.fold_expanded_state()  # frees a loaded per-element exp_avg_sq now
            except CheckpointError as err:
                raise CheckpointError(f"{_where(engine, name, load_dir, tag)}: {err}") from err
        return result

    return load


def _drop_expanded_views(wrapper: Any) -> None:
    """Forget DeepSpeed's per-parameter views of a per-element second moment (ZeRO-1/2, bf16 ``_hp_mapping``)."""
    for groups_name in ("bit16_groups", "bf16_groups"):
        for group in getattr(wrapper, groups_name, None) or ():
            for lp in group:
                mapping = getattr(lp, "_hp_mapping", None)
                fragments = getattr(mapping, "optim_fragment", None)
                if isinstance(fragments, dict):
                    for key in _EXPANDED_KEYS:
                        fragments.pop(key, None)


def _check_universal_files(wrapper: Any, params: Any, checkpoint_dir: str, required: tuple[str, ...]) -> None:
    folder = os.path.join(checkpoint_dir, "zero")
    missing = []
    for lp in params:
        name = wrapper.param_names.get(lp) if hasattr(wrapper.param_names, "get") else wrapper.param_names[lp]
        if name is None:
            continue
        for f in required:
            path = os.path.join(folder, name, f)
            if not os.path.isfile(path):
                missing.append(path)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"universal checkpoint {checkpoint_dir} lacks {shown}: NovoGrad needs fp32, exp_avg, exp_avg_sq and the "
            "step of every parameter it optimises (a NovoGrad checkpoint is converted with python -m "
            "novograd_ds.universal). Refusing to start the missing state afresh")


def _zero12_universal(wrapper: Any, original: Any):
    @functools.wraps(original)
    def load(lp_groups_name: str, checkpoint_dir: str) -> None:
        params = [lp for group in getattr(wrapper, lp_groups_name) for lp in group
                  if getattr(lp, "_hp_mapping", None) is not None]
        _check_universal_files(wrapper, params, checkpoint_dir, _UNIVERSAL_FILES_Z12)
        restore = _keep_storage(wrapper)
        result = original(wrapper, lp_groups_name, checkpoint_dir)
        restore()
        return result

    return load


def _zero3_universal(wrapper: Any, original: Any):
    @functools.wraps(original)
    def load(checkpoint_dir: str) -> None:
        _check_universal_files(wrapper, [p for group in wrapper.fp16_groups for p in group], checkpoint_dir,
                               _UNIVERSAL_FILES_Z3)
        restore = _keep_storage(wrapper)
        result = original(wrapper, checkpoint_dir)
        restore()
        path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
        saved = load_mapped(path)
        groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
        current = wrapper.optimizer.param_groups
        if groups is None or len(groups) != len(current):
            raise CheckpointError(
                f"{path}: has {None if groups is None else len(groups)} param groups, the optimizer "
                f"{len(current)}; DeepSpeed's ZeRO-3 loader copied group 0's hyperparameters into every group and "
                "they cannot be restored per group. Build the optimizer with the param groups of the saved run")
        for group, saved_group in zip(current, groups):
            for key, value in saved_group.items():
                if key != "params" and key not in STORAGE_KEYS:
                    group[key] = value
        return result

    return load
