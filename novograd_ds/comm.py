"""Where a collective's tensors must live: decided from the process group's backend, never from the data.

NOTE: [the communication device] NCCL only takes CUDA tensors, gloo and MPI only CPU tensors (gloo's CUDA support is
partial and slow), and a group created with ``backend="cpu:gloo,cuda:nccl"`` takes either. Code that all-reduces a
CPU scalar works under gloo on a laptop and dies under NCCL on the first GPU node, so every collective in this package
(the optimizer's per-layer norm sums, the training job's metrics) goes through :func:`comm_device` /
:func:`all_reduce_`: the tensor is moved to the device the group's backend takes, reduced there, and the result is
written back where it came from.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["backend_device_types", "comm_device", "all_reduce_", "group_backend"]

# Backend name -> device types it takes, in order of preference.
_BACKEND_DEVICES = {
    "nccl": ("cuda",),
    "gloo": ("cpu",),
    "mpi": ("cpu",),
    "ucc": ("cuda", "cpu"),
    "xccl": ("xpu",),
    "hccl": ("npu",),
    "ccl": ("cpu", "xpu"),
    "fake": ("cpu", "cuda"),
}


def group_backend(group: Any = None) -> str:
    """The backend configuration of ``group`` (``None``: the default group), e.g. ``"nccl"`` or
    ``"cpu:gloo,cuda:nccl"``."""
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is not None:
        try:
            return str(get_config(group))
        except (RuntimeError, ValueError, AttributeError):
            pass
    return str(dist.get_backend(group))


def backend_device_types(backend: str) -> tuple[str, ...]:
    """Device types a backend configuration takes, in order of preference; empty when unknown.

    ``"nccl"`` -> ``("cuda",)``; ``"gloo"`` -> ``("cpu",)``; ``"cpu:gloo,cuda:nccl"`` -> ``("cpu", "cuda")``.
    """
    types: list[str] = []
    for part in str(backend).lower().replace(" ", "").split(","):
        if not part:
            continue
        if ":" in part:
            device_type = part.split(":", 1)[0]
            found = (device_type,)
        else:
            found = _BACKEND_DEVICES.get(part, ())
        for t in found:
            if t not in types:
                types.append(t)
    return tuple(types)


def _indexed(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    module = getattr(torch, device_type, None)
    current = getattr(module, "current_device", None) if module is not None else None
    if device_type != "cpu" and callable(current):
        return torch.device(device_type, current())
    return torch.device(device_type)


def comm_device(group: Any = None, *, prefer: Optional[torch.device] = None) -> torch.device:
    """The device a collective on ``group`` must use.

    ``prefer`` (typically the data's device) wins when the backend takes its type, so a CUDA tensor on a
    ``cpu:gloo,cuda:nccl`` group is not copied to the host. Otherwise the backend's first device type: the current
    CUDA device for NCCL, the CPU for gloo. An unknown backend keeps ``prefer`` (or the CPU).
    """
    types = backend_device_types(group_backend(group))
    if prefer is not None:
        prefer = torch.device(prefer)
        if prefer.type in types or not types:
            return prefer
    if not types:
        return torch.device("cpu")
    return _indexed(types[0])


def all_reduce_(tensor: Tensor, op: Any = None, group: Any = None) -> Tensor:
    """All-reduce ``tensor`` in place over ``group`` on the device the backend takes; returns ``tensor``.

    A tensor on another device is copied there, reduced, and copied back, so callers keep CPU metrics on the CPU
    under NCCL and CUDA data on the GPU under gloo.
    """
    op = dist.ReduceOp.SUM if op is None else op
    device = comm_device(group, prefer=tensor.device)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    buf = tensor.to(device)
    dist.all_reduce(buf, op=op, group=group)
    tensor.copy_(buf)
    return tensor
