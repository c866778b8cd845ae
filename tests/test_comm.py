"""The communication-device helper (NOTE: [the communication device] in novograd_ds/comm.py)."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from novograd_ds.comm import backend_device_types


@pytest.mark.parametrize("backend, types", [
    ("nccl", ("cuda",)),
    ("gloo", ("cpu",)),
    ("NCCL", ("cuda",)),
    ("cpu:gloo,cuda:nccl", ("cpu", "cuda")),
    ("cuda:nccl,cpu:gloo", ("cuda", "cpu")),
    ("mpi", ("cpu",)),
    ("xccl", ("xpu",)),
    ("my_custom_backend", ()),
])
def test_backend_device_types(backend, types):
    assert backend_device_types(backend) == types


def _gloo_worker(rank, world_size):
    import torch.distributed as dist

    from novograd_ds.comm import all_reduce_, comm_device, group_backend

    out = {"backend": group_backend(None), "device": str(comm_device(None)),
           "prefer_cpu": str(comm_device(None, prefer=torch.device("cpu")))}
    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    all_reduce_(t)
    out["sum"] = float(t)
    m = torch.tensor([float(rank)])
    all_reduce_(m, op=dist.ReduceOp.MAX)
    out["max"] = float(m)
    sub = dist.new_group([0, 1])
    out["sub_device"] = str(comm_device(sub))
    return out


@pytest.mark.slow
def test_comm_device_on_a_gloo_group():
    results = run_ranks(_gloo_worker, 2)
    for r in results:
        assert "gloo" in r["backend"] and "nccl" not in r["backend"]
        assert r["device"] == "cpu" and r["prefer_cpu"] == "cpu" and r["sub_device"] == "cpu"
        assert r["sum"] == 3.0 and r["max"] == 1.0
