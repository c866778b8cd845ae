"""NovoGrad's checkpoint form for flat tensors: compact on disk, expanded only where a tool needs per-element values.

NOTE: [the compact checkpoint form] A bound flat tensor (a DeepSpeed ZeRO partition, NOTE: [the sharding contract])
keeps one second moment per *layer*. Its entry in ``NovoGrad.state_dict()["state"]`` is::

    {"step": int,                                      # steps taken by this flat
     "exp_avg": Tensor,                                # per element, the flat's shape (the live state tensor)
     "novograd": {                                     # COMPACT: everything that is not per element
         "format": 1,                                  # COMPACT_FORMAT; a reader refuses a newer one
         "numel": int,                                 # the flat's element count when it was saved
         "segments": int64 Tensor [3, S],              # rows: offsets, lengths, layers of the flat's S segments
         "exp_avg_sq_layer": fp32 Tensor [n_layers],   # v of every layer of the flat's group (same on all ranks)
         "max_exp_avg_sq_layer": fp32 Tensor [n_layers],   # amsgrad only
     }}

so a save allocates nothing the size of the flat (only the ``[3, S]`` index) and writes 4 bytes per element for
``exp_avg`` plus ``24 * S + 4 * n_layers`` bytes per flat. The compact values sit one level down, in a dict, because
DeepSpeed's tools narrow every *tensor* of a flat's state to the flat's unpadded length (``zero_checkpoint.py``
``_strip_tensor_paddings``, ZeRO-1/2's elastic save) and would cut a per-layer vector short; a dict passes untouched.

Where a tool needs Adam's per-element ``exp_avg_sq`` (DeepSpeed's universal checkpoint), :func:`expand_fragment`
produces exactly the elements ``[start, start + length)`` of the expanded tensor (each element of a segment holds
its layer's v, elements in no segment 0) from the compact values and the index, one fragment at a time;
``novograd_ds.integrations.universal`` does that inside the conversion, on the CPU.

An 8-bit first moment (``state_bits=8``, NOTE: [8-bit flats] in ``quantized.py``) extends the form: the entry's
top level holds ``exp_avg_codes`` (int8, per element, like ``exp_avg``, which it replaces) and the ``COMPACT`` dict
``exp_avg_scales`` (fp32 block scales), ``exp_avg_small`` (fp32 moments of small layers' segments) and ``q8`` (the map
and the index that places them); the universal converter dequantises ``exp_avg`` fragments from them. Readers ignore
keys they do not know, and refuse a format newer than theirs; bump ``COMPACT_FORMAT`` only for a change an older
reader would misread.

Checkpoints written before this form (up to commit 997ee90) carry a per-element ``exp_avg_sq`` instead of the
``COMPACT`` dict; they still load (the first step folds them back, exactly), see NovoGrad._init_flat_state.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .kernels import SegmentTable

__all__ = ["COMPACT", "COMPACT_FORMAT", "CheckpointError", "segment_index", "segments_from_index",
           "expand_fragment", "compact_entry", "load_mapped"]

#: Key of the dict that holds a flat's non-per-element state in its saved entry.
COMPACT = "novograd"
#: Version of that dict's layout; readers refuse a newer one.
COMPACT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint lacks state NovoGrad needs (a moment, ``step``) or has a form it cannot read.

    The message names what is missing and where; loaders that know the file (the DeepSpeed adapter) add its path.
    """


def segment_index(segments: SegmentTable) -> Tensor:
    """The ``[3, S]`` int64 CPU tensor of a segment table: rows offsets, lengths, layers."""
    return torch.tensor([segments.offsets, segments.lengths, segments.layers], dtype=torch.int64).reshape(3, -1)


def segments_from_index(index: Tensor) -> SegmentTable:
    """Inverse of :func:`segment_index`."""
    offsets, lengths, layers = index.reshape(3, -1).tolist()
    return SegmentTable(offsets, lengths, layers)


def compact_entry(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``COMPACT`` dict of a saved state entry, checked; ``None`` for an entry without one."""
    compact = entry.get(COMPACT) if isinstance(entry, Mapping) else None
    if compact is None:
        return None
    fmt = compact.get("format") if isinstance(compact, Mapping) else None
    if not isinstance(fmt, int) or fmt > COMPACT_FORMAT or fmt < 1:
        raise CheckpointError(
            f"NovoGrad checkpoint entry has compact state of format {fmt!r}; this novograd_ds reads format "
            f"{COMPACT_FORMAT} and older. Upgrade novograd_ds to the version that wrote the checkpoint")
    for key in ("numel", "segments", "exp_avg_sq_layer"):
        if key not in compact:
            raise CheckpointError(f"NovoGrad checkpoint entry: its compact state has no {key!r} (has "
                                  f"{sorted(compact)}); the checkpoint is damaged")
    return compact


def expand_fragment(values: Tensor, index: Tensor, start: int, length: int) -> Tensor:
    """Elements ``[start, start + length)`` of the per-element form of per-layer ``values`` (CPU, ``values.dtype``).

    ``index`` is a flat's ``[3, S]`` segment index; an element in segment ``(o, n, k)`` holds ``values[k]``, an
    element in no segment 0. Equal to ``expand_layer_values(values, segments, numel).narrow(0, start, length)``
    without building the whole flat.
    """
    values = values.detach().to("cpu")
    out = torch.zeros(int(length), dtype=values.dtype)
    if length <= 0 or index.numel() == 0:
        return out
    offsets, lengths, layers = index.reshape(3, -1).to("cpu", torch.int64)
    lo = offsets.clamp(min=start)
    hi = (offsets + lengths).clamp(max=start + length)
    for j in torch.nonzero(hi > lo).flatten().tolist():
        out[int(lo[j]) - start:int(hi[j]) - start] = values[int(layers[j])]
    return out


def load_mapped(path: str) -> Any:
    """``torch.load`` of a checkpoint file on the CPU, memory-mapped where the file allows it (zip format): reading a
    few small entries of a large shard then touches only those."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, ValueError):  # a file torch cannot map (legacy format): read it
        return torch.load(path, map_location="cpu", weights_only=False)
