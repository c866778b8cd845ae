"""Native ops of novograd_ds, JIT-built with ninja on first use (see :mod:`novograd_ds.ops.builder`)."""

from .builder import CPUOpBuilder, CUDAOpBuilder, OpBuildError, builder_for

__all__ = ["CPUOpBuilder", "CUDAOpBuilder", "OpBuildError", "builder_for"]
