"""Run a function on N CPU ranks (gloo) inside one pytest test; reusable by every multi-process test.
``run_cuda_ranks`` does the same on N GPUs with NCCL (GPU tests).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, sets the torch.distributed environment,
initialises DeepSpeed's communication on gloo (``DS_ACCELERATOR=cpu``), calls ``fn(rank, world_size, *args)`` and
returns the list of per-rank return values (anything picklable). An exception on any rank fails the call with that
rank's traceback. Keep one launch per world size and loop over configurations inside ``fn``: a launch costs
seconds (imports), DeepSpeed's first run JIT-builds a comm op (1-2 min, then cached).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, outdir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size-1, ...)]``, each on its own process."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), outdir, args), nprocs=world_size, join=True)
        results = []
        for r in range(world_size):
            with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _cuda_entry(rank: int, fn: Callable, world_size: int, port: int, outdir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.cuda.set_device(rank)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cuda", (
        f"DeepSpeed chose its {get_accelerator().device_name()!r} accelerator in a GPU test; unset DS_ACCELERATOR")
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_cuda_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``run_ranks`` on GPUs: rank r on ``cuda:r``, DeepSpeed's CUDA accelerator, NCCL. ``fn`` must return CPU
    objects (pickled back to the test). The children inherit ``DS_ACCELERATOR=cuda`` (DeepSpeed picks its
    accelerator when the test module is imported, before ``fn`` runs)."""
    if torch.cuda.device_count() < world_size:
        raise RuntimeError(f"run_cuda_ranks({world_size}) needs {world_size} GPUs; {torch.cuda.device_count()} visible")
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cuda"
    try:
        with tempfile.TemporaryDirectory() as outdir:
            mp.spawn(_cuda_entry, args=(fn, world_size, free_port(), outdir, args), nprocs=world_size, join=True)
            results = []
            for r in range(world_size):
                with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                    results.append(pickle.load(f))
            return results
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = saved
