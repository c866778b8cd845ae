"""Shared pytest setup. Tiers: `pytest -m "not slow"` is the fast tier; plain `pytest` is the full tier (CI)."""

import os

import pytest
import torch

# DeepSpeed picks its accelerator at import; on these machines there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
