"""The environment report runs, lists every backend and the versions users ask about first."""

import subprocess
import sys


def test_env_report_lists_backends_and_versions():
    out = subprocess.run([sys.executable, "-m", "novograd_ds.env"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    for needle in ("torch", "deepspeed", "transformers", "accelerate", "ninja", "nvcc",
                   "reference      yes", "foreach        yes", "fused", "DeepSpeed integration",
                   '"type": "NovoGrad"     resolves', "bind hook              installed"):
        assert needle in out, f"{needle!r} missing from the report:\n{out}"
