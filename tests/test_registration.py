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
            "    print((novograd_ds.register(), any('outside the range novograd_ds is tested with' in str(x.message) "
            "and 'pip install \"deepspeed>=0.16,<0.20\"' in str(x.message) for x in w)))\n"
            "print((novograd_ds.register(force=True),))\n")
    assert run(code, NOVOGRAD_DS_AUTOREGISTER="0") == ["(False, True)", "(True,)"]


def test_tested_range_is_016_to_019():
    from novograd_ds.integrations.deepspeed import TESTED_DEEPSPEED, _version_ok

    assert TESTED_DEEPSPEED == ((0, 16), (0, 20))
    assert [_version_ok(v) for v in ("0.15.4", "0.16.0", "0.16.9", "0.17.6", "0.18.9", "0.19.0", "0.19.8",
                                     "0.19.8+abc", "0.20.0", "1.0.0")] == [False] + [True] * 7 + [False, False]


# "type": "novograd" in any letter case names NovoGrad, as DeepSpeed's own "adam"/"Adam" do. DeepSpeed checks the name
# against torch.optim while building the engine, before _configure_optimizer, so it is normalised when the config is
# parsed. (tests/test_zero_traps.py trains through deepspeed.initialize with each spelling.)
NAMES = ("novograd", "NOVOGRAD", "NovoGrad", "noVoGrAd")
PARSE = ("import novograd_ds\nfrom deepspeed.runtime.config import DeepSpeedConfig\n"
         "for n in %r:\n"
         "    try:\n"
         "        print((n, DeepSpeedConfig({'train_batch_size': 1, 'optimizer': {'type': n}}).optimizer_name))\n"
         "    except Exception as e:\n"
         "        print((n, type(e).__name__, str(e)))\n") % (NAMES + ("Adam",),)


@pytest.mark.slow
def test_type_name_any_letter_case():
    lines = run(PARSE)
    assert lines == [str((n, "NovoGrad")) for n in NAMES] + [str(("Adam", "adam"))]
    off = run(PARSE + "novograd_ds.unregister()\nprint((DeepSpeedConfig({'train_batch_size': 1, 'optimizer': "
                      "{'type': 'novograd'}}).optimizer_name,))\n")
    assert off[-1] == "('novograd',)"  # unregister() undoes the normalisation too


@pytest.mark.slow
def test_outside_the_tested_range_initialize_refuses_naming_the_fix():
    code = "import deepspeed\ndeepspeed.__version__ = '0.99.0'\nimport warnings\nwarnings.simplefilter('ignore')\n" + PARSE
    lines = run(code)
    assert len(lines) == len(NAMES) + 1
    for line in lines[:-1]:
        assert "UnsupportedDeepSpeedVersion" in line and "DeepSpeed 0.99.0 is outside the range" in line, line
        assert 'pip install \\"deepspeed>=0.16,<0.20\\"' in line or 'pip install "deepspeed>=0.16,<0.20"' in line, line
        assert "NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED=1" in line, line
    assert lines[-1] == str(("Adam", "adam"))  # other optimizers are left alone
    # the override registers anyway
    forced = run(code, NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED="1")
    assert forced == [str((n, "NovoGrad")) for n in NAMES] + [str(("Adam", "adam"))]
