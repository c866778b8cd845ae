"""DeepSpeed's universal-checkpoint conversion for NovoGrad's compact checkpoints.

``python -m novograd_ds.universal --input_folder ckpt/<tag> --output_folder ckpt/<tag>_universal [options]`` takes
the options of ``python -m deepspeed.checkpoint.ds_to_universal`` and runs DeepSpeed's own conversion, with one
change: where DeepSpeed reads a flat partition's ``exp_avg_sq`` and cuts it into per-parameter fragments, a NovoGrad
checkpoint in the compact form (NOTE: [the compact checkpoint form] in ``novograd_ds/checkpoint.py``) has no
per-element tensor. This module hands DeepSpeed's extractor a :class:`LayerExpansion` in its place, and
DeepSpeed's ``dump_param_fragment`` gets from it exactly the fragment it asks for, expanded from the per-layer values
and the saved segment index on the CPU, one parameter fragment at a time. Nothing the size of a partition is built;
the universal checkpoint that comes out is the one DeepSpeed would write for Adam-shaped state (per-element
``exp_avg_sq.pt`` per parameter), which DeepSpeed's universal loaders read and NovoGrad folds back on its first step.

Checkpoints in the expanded form (novograd_ds up to 997ee90) and checkpoints of other optimizers pass through
unchanged. ZeRO-1/2, ZeRO-3 and BF16_Optimizer checkpoints are handled (DeepSpeed's extractors for all of them read
the shard files through ``torch.load``, which is wrapped while an extractor runs, in the worker that runs it).

The output is also made readable by both of DeepSpeed's universal loaders, so that a ZeRO-2 checkpoint continues
under ZeRO-3: ``zero/optimizer_state.pt`` gets the keys of both (ZeRO-1/2 reads ``param_groups`` and
``ds_version``, ZeRO-3 ``optimizer_state_dict.state[0].step`` and ``optimizer_state_dict.param_groups``), and the
model-state file gets the name the other stage looks for (a hard link).

``python -m deepspeed.checkpoint.ds_to_universal`` itself, run on a compact checkpoint, stops with
``KeyError: 'exp_avg_sq'`` in ``extract_zero_shards``: it runs in its own process, where nothing of ours is loaded.
Use this entry point instead (docs/zero.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..checkpoint import compact_entry, expand_fragment, load_mapped
from ..quantized import CODES, SCALES, SMALL, dequantize_flat_fragment

__all__ = ["LayerExpansion", "Dequantization", "main", "inspect_checkpoint", "convert"]

_EXP_AVG, _EXP_AVG_SQ, _MAX_LAYER, _Q8_INDEX = "exp_avg", "exp_avg_sq", "max_exp_avg_sq_layer", "q8"
# What each extractor of ds_to_universal reads (DeepSpeed 0.19.x); checked before anything is patched.
_SEAMS = ("main", "parse_arguments", "extract_zero_shards", "extract_zero_shards_stage3", "dump_param_fragment")


class LayerExpansion:
    """Stands in for a flat's per-element ``exp_avg_sq`` in DeepSpeed's extractor: :meth:`fragment` builds any range.

    Holds only the per-layer values and the ``[3, S]`` segment index of one flat partition.
    """

    def __init__(self, values: Tensor, segments: Tensor, numel: int):
        self.values, self.segments, self.numel_ = values.detach().to("cpu"), segments.to("cpu"), int(numel)

    def numel(self) -> int:
        return self.numel_

    def fragment(self, start: int, length: int) -> Tensor:
        if start < 0 or start + length > self.numel_:
            raise IndexError(f"LayerExpansion: fragment [{start}, {start + length}) outside a flat of {self.numel_}")
        return expand_fragment(self.values, self.segments, start, length)

    def __repr__(self) -> str:
        return f"LayerExpansion(numel={self.numel_}, layers={self.values.numel()}, segments={self.segments.shape[-1]})"


class Dequantization:
    """Stands in for the ``exp_avg`` of a flat saved with an 8-bit first moment (``state_bits=8``; NOTE: [8-bit
    flats] in ``novograd_ds/quantized.py``): :meth:`fragment` dequantises any range of it from the saved codes, block
    scales and small-layer moments. The universal checkpoint gets fp32 ``exp_avg`` fragments, as for a 32-bit run;
    an 8-bit optimizer loading it quantises them again (nearest rounding, the same layer-aligned blocks)."""

    def __init__(self, codes: Tensor, compact: dict, numel: int):
        self.codes = codes.reshape(-1)
        self.scales, self.small, self.index = compact[SCALES], compact[SMALL], compact[_Q8_INDEX]
        self.numel_ = int(numel)

    def numel(self) -> int:
        return self.numel_

    def fragment(self, start: int, length: int) -> Tensor:
        if start < 0 or start + length > self.numel_:
            raise IndexError(f"Dequantization: fragment [{start}, {start + length}) outside a flat of {self.numel_}")
        return dequantize_flat_fragment(self.codes, self.scales, self.small, self.index, start, length)

    def __repr__(self) -> str:
        return f"Dequantization(numel={self.numel_}, map={self.index['map']!r})"


def _flat_states(sd: Any) -> Optional[dict]:
    """The base optimizer's per-flat ``state`` dict inside one ZeRO shard file (stage 1/2, bf16 or 3), or None."""
    if not isinstance(sd, dict):
        return None
    osd = sd.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        return None
    base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    if isinstance(base, dict) and isinstance(base.get("state"), dict):
        return base["state"]
    return None


def _attach_expansions(sd: Any, source: str = "") -> Any:
    """Give every compact flat entry of a loaded shard a :class:`LayerExpansion` as its ``exp_avg_sq``."""
    states = _flat_states(sd)
    if states is None:
        return sd
    for key, entry in states.items():
        compact = compact_entry(entry) if isinstance(entry, dict) else None
        if compact is None or _EXP_AVG_SQ in entry:
            continue
        if _MAX_LAYER in compact:
            raise SystemExit(_amsgrad_message(source))
        entry[_EXP_AVG_SQ] = LayerExpansion(compact["exp_avg_sq_layer"], compact["segments"], compact["numel"])
        if CODES in entry and _EXP_AVG not in entry:
            entry[_EXP_AVG] = Dequantization(entry.pop(CODES), compact, compact["numel"])
    return sd


def _amsgrad_message(source: str) -> str:
    return (f"novograd_ds.universal: {source or 'this checkpoint'} was saved with amsgrad=True. DeepSpeed's universal "
            "format and loaders carry exp_avg and exp_avg_sq only, so the running maximum of v would be lost; "
            "resume amsgrad runs at the same world size (engine.load_checkpoint), or continue without amsgrad")


_originals: dict[str, Any] = {}


def _d2u():
    import deepspeed.checkpoint.ds_to_universal as d2u

    return d2u


def _original(name: str):
    return _originals.get(name) or getattr(_d2u(), name)


@contextlib.contextmanager
def _expanding_loads():
    """While an extractor runs (in this process): every ``torch.load`` of a shard attaches the expansions."""
    load = torch.load

    def expanding_load(f, *args, **kwargs):
        return _attach_expansions(load(f, *args, **kwargs), str(f))

    torch.load = expanding_load
    try:
        yield
    finally:
        torch.load = load


def _dump_param_fragment(dir, tp_index, dp_index, state_name, state_flat_tensor, param_name, offset, numel):
    if isinstance(state_flat_tensor, (LayerExpansion, Dequantization)):
        state_flat_tensor, offset = state_flat_tensor.fragment(offset, numel), 0
    return _original("dump_param_fragment")(dir, tp_index, dp_index, state_name, state_flat_tensor, param_name,
                                            offset, numel)


def _extract_zero_shards(*args, **kwargs):
    install()  # a worker started with spawn/forkserver imports this module afresh
    with _expanding_loads():
        return _original("extract_zero_shards")(*args, **kwargs)


def _extract_zero_shards_stage3(*args, **kwargs):
    install()
    with _expanding_loads():
        return _original("extract_zero_shards_stage3")(*args, **kwargs)


def install() -> None:
    """Route ds_to_universal's extractors and fragment writer through this module (idempotent)."""
    d2u = _d2u()
    missing = [name for name in _SEAMS if not hasattr(d2u, name)]
    if missing:
        import deepspeed

        raise RuntimeError(f"novograd_ds.universal: deepspeed {deepspeed.__version__}'s ds_to_universal has no "
                           f"{', '.join(missing)}; this converter was written against DeepSpeed 0.19.x")
    for name, ours in (("extract_zero_shards", _extract_zero_shards),
                       ("extract_zero_shards_stage3", _extract_zero_shards_stage3),
                       ("dump_param_fragment", _dump_param_fragment)):
        current = getattr(d2u, name)
        if current is not ours:
            _originals.setdefault(name, current)
            setattr(d2u, name, ours)


def uninstall() -> None:
    d2u = _d2u()
    for name, original in list(_originals.items()):
        setattr(d2u, name, original)
        del _originals[name]


def _optim_files(folder: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")))


def inspect_checkpoint(folder: str) -> str:
    """``"compact"``, ``"expanded"`` (NovoGrad's earlier form or Adam-shaped state) or ``"none"`` (no shards)."""
    files = _optim_files(folder)
    if not files:
        return "none"
    states = _flat_states(load_mapped(files[0])) or {}
    for entry in states.values():
        compact = compact_entry(entry) if isinstance(entry, dict) else None
        if compact is not None:
            if _MAX_LAYER in compact:
                raise SystemExit(_amsgrad_message(files[0]))
            return "compact"
    return "expanded"


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        return
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def _fix_for_both_loaders(input_folder: str, output_folder: str) -> None:
    """Make the universal checkpoint loadable by a ZeRO-1/2 engine and by a ZeRO-3 engine, whatever wrote it.

    The engines look for differently named model-state files (``mp_rank_XX_model_states.pt``, ZeRO-3
    ``zero_pp_rank_0_mp_rank_XX_model_states.pt``; a universal load reads only their metadata, the weights come from
    ``zero/``): the missing name is added as a hard link. ``zero/optimizer_state.pt`` gets the keys of both loaders.
    """
    import glob
    import re

    for f in glob.glob(os.path.join(output_folder, "*model_states.pt")):
        base = os.path.basename(f)
        plain = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", base)
        zero3 = re.fullmatch(r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt", base)
        if plain:
            _link_or_copy(f, os.path.join(output_folder, f"zero_pp_rank_0_mp_rank_{plain.group(1)}_model_states.pt"))
        elif zero3:
            _link_or_copy(f, os.path.join(output_folder, f"mp_rank_{zero3.group(1)}_model_states.pt"))
    path = os.path.join(output_folder, "zero", "optimizer_state.pt")
    if not os.path.isfile(path):
        return
    out = torch.load(path, map_location="cpu", weights_only=False)
    shard = load_mapped(_optim_files(input_folder)[0])
    osd = shard["optimizer_state_dict"]
    base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    groups = out.get("param_groups") or base["param_groups"]
    changed = False
    if "param_groups" not in out:
        out["param_groups"] = groups
        changed = True
    if "ds_version" not in out:
        import deepspeed

        out["ds_version"] = osd.get("ds_version", deepspeed.__version__)
        changed = True
    if "optimizer_state_dict" not in out:
        steps = [st["step"] for st in base["state"].values() if isinstance(st, dict) and "step" in st]
        out["optimizer_state_dict"] = {"state": {0: {"step": steps[0]}} if steps else {}, "param_groups": groups}
        changed = True
    if changed:
        torch.save(out, path)


def convert(argv: Sequence[str]) -> None:
    """Run DeepSpeed's ds_to_universal with ``argv`` (its own options), expanding compact NovoGrad state."""
    d2u = _d2u()
    install()
    saved_argv = sys.argv
    try:
        sys.argv = ["novograd_ds.universal", *argv]
        args = d2u.parse_arguments()
    finally:
        sys.argv = saved_argv
    kind = inspect_checkpoint(args.input_folder)
    print(f"novograd_ds.universal: {args.input_folder}: "
          + {"compact": "NovoGrad compact state; exp_avg_sq is expanded per parameter fragment, on the CPU",
             "expanded": "per-element state; converted as DeepSpeed does",
             "none": "no *_optim_states.pt files"}[kind])
    try:
        d2u.main(args)
    finally:
        uninstall()
    _fix_for_both_loaders(args.input_folder, args.output_folder)


def main(argv: Optional[Sequence[str]] = None) -> int:
    convert(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
