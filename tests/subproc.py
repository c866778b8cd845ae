"""The environment for tests that start the package in child processes (launchers, training runs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Variables a launcher sets for its children; a test's own launch must not inherit them from the test process.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_PROCID",
                 "SLURM_NTASKS")


def child_env(*, native: bool = False, **extra) -> dict[str, str]:
    """os.environ for a child: shared tokenizer cache, one thread per rank, CPU accelerator without a GPU.

    ``native=False`` skips the fused op's JIT build: tests about launchers and checkpoints are not about kernels
    (a cold build costs ~75 s, or a wait on its lock while another process builds it).
    """
    env = dict(os.environ)
    env.setdefault("NOVOGRAD_DS_CACHE", str(Path(tempfile.gettempdir()) / "novograd_ds-test-cache"))
    env.setdefault("OMP_NUM_THREADS", "1")
    if not native:
        env.setdefault("NOVOGRAD_DS_DISABLE_NATIVE", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env
