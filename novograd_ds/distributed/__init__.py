"""NovoGrad under data parallelism: which slice of a flat partition is which layer (``layout``), how the
per-layer partial squared norms are combined across ranks (``reduce``), and the DeepSpeed adapters (``zero``)."""

from .layout import FlatLayout, contiguous_segments, zero12_segments, zero3_segments

__all__ = ["FlatLayout", "zero12_segments", "zero3_segments", "contiguous_segments"]
