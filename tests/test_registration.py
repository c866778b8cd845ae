"""Registration with DeepSpeed: idempotent, reversible, and off with NOVOGRAD_DS_AUTOREGISTER=0 (fresh interpreters,
since registration happens at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

CHECK = (
    "import torch, novograd_ds\n"
    "from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS as Z\n"
    "from deepspeed.runtime.engine import DeepSpeedEngine as E\n"
    "from novograd_ds.integrations.deepspeed import is_registered\n"
    "def s(): return (getattr(torch.optim, 'NovoGrad', None) is novograd_ds.NovoGrad, Z.count(novograd_ds.NovoGrad), is_registered())\n"
    "print(s())\n"
)


def run(code, **env):
    full = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.startswith("(")]


def test_autoregister_idempotent_and_unregister():
    lines = run(CHECK + "novograd_ds.register(); novograd_ds.register(); print(s())\n"
                "novograd_ds.unregister(); print(s())\nnovograd_ds.register(); print(s())\n")
    assert lines == ["(True, 1, True)", "(True, 1, True)", "(False, 0, False)", "(True, 1, True)"]


def test_autoregister_off():
    lines = run(CHECK + "novograd_ds.register(); print(s())\n", NOVOGRAD_DS_AUTOREGISTER="0")
    assert lines == ["(False, 0, False)", "(True, 1, True)"]


def test_version_gate():
    code = ("import warnings, deepspeed\ndeepspeed.__version__ = '0.99.0'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import novograd_ds\n"
            "    print((novograd_ds.register(), any('outside the verified range' in str(x.message) for x in w)))\n"
            "print((novograd_ds.register(force=True),))\n")
    assert run(code, NOVOGRAD_DS_AUTOREGISTER="0") == ["(False, True)", "(True,)"]
