"""The native fused backend (``fused=True``). Placeholder until the fused ops land (issue: fused ops)."""

from __future__ import annotations

from typing import Optional

import torch

from . import KernelBackend


class NativeOpUnavailable(RuntimeError):
    """The fused op cannot be used here; the message says what is missing and how to fix it."""


def load_backend(device: torch.device) -> KernelBackend:
    raise NativeOpUnavailable(
        "NovoGrad(fused=True): the fused native op is not part of this build yet. "
        "Use fused=None (automatic) or foreach=True."
    )


def load_backend_or_none(device: torch.device) -> Optional[KernelBackend]:
    return None
