"""The environment report runs, lists every backend and the versions users ask about first; ``--check`` runs every
backend against the float64 rule and fails when one is wrong."""

import re
import subprocess
import sys

import pytest

from novograd_ds.ops.builder import CPUOpBuilder
from novograd_ds.testing.check import flag_cases


def test_env_report_lists_backends_and_versions():
    out = subprocess.run([sys.executable, "-m", "novograd_ds.env"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    for needle in ("torch", "deepspeed", "transformers", "accelerate", "ninja", "nvcc",
                   "reference      yes", "foreach        yes", "fused", "DeepSpeed integration",
                   '"type": "NovoGrad"     resolves', "bind hook              installed"):
        assert needle in out, f"{needle!r} missing from the report:\n{out}"


# -- python -m novograd_ds.env --check -------------------------------------------------------------------------------
LINE = re.compile(r"^(PASS|FAIL|SKIP) +(\S+) +(\S+) +(.+?) +(\S+) (<=|>) (\S+)$")


def _check(*args):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")  # small ops: a second thread only waits for a busy core here
    return subprocess.run([sys.executable, "-m", "novograd_ds.env", "--check", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_check_runs_every_backend_case_against_the_rule():
    """On this CPU: reference and foreach (fp32/bf16/fp16/fp64 gradients), fused-cpu (fp32/bf16/fp16, list, one-call
    list and segment forms) and its self-check; 32 flag combinations each; 8 cases of the 8-bit moment each; exit 0."""
    out = _check()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [LINE.match(ln) for ln in out.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert all(rows) and all(r.group(1) == "PASS" for r in rows)
    assert len(flag_cases()) == 32
    by_backend = {}
    for r in rows:
        by_backend.setdefault(r.group(2), []).append(r.group(4))
    q8 = 2 * 2 * 2  # maps x roundings x fp32/bf16 gradients
    assert len(by_backend["reference"]) == len(by_backend["foreach"]) == 4 * 2 * 32 + q8
    assert "8-bit sqrt stochastic grad=bfloat16" in by_backend["foreach"]
    for case in ("list float64 wd=0.01 decoupled grad_averaging amsgrad b2=0", "segments float16 wd=0 b2=0.98",
                 "segments bfloat16 wd=0.01 amsgrad b2=0"):
        assert case in by_backend["reference"] and case in by_backend["foreach"]
    if not CPUOpBuilder().missing():
        fused = by_backend["fused-cpu"]
        assert len(fused) == 1 + 3 * 3 * 32 + q8 and fused[0].startswith("self-check (42 comparisons")
        assert "8-bit linear nearest grad=float32" in fused
        assert "list-one-call bfloat16 wd=0.01 decoupled amsgrad b2=0" in fused
        assert "segments float16 wd=0.01 grad_averaging b2=0.98" in fused
        assert not any("float64" in c for c in fused)
    assert re.search(rf"^env --check: {len(rows)} passed, 0 failed$", out.stdout, re.M)


@pytest.mark.slow
def test_check_fails_on_an_injected_fault():
    if CPUOpBuilder().missing():
        pytest.skip("cannot build the CPU op here: " + "; ".join(CPUOpBuilder().missing()))
    out = _check("--backend", "fused-cpu", "--inject-fault", "fused-cpu")
    assert out.returncode == 1, out.stdout[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("PASS fused-cpu") and "self-check" in lines[0]  # the op itself is fine
    fails = [ln for ln in lines if ln.startswith("FAIL fused-cpu")]
    assert len(fails) == 3 * 3 * 32 + 8
    m = LINE.match(fails[0])
    assert m and float(m.group(5)) > 1e-4 and m.group(6) == ">" and float(m.group(7)) == 2e-5
    assert re.search(r"^env --check: 1 passed, 296 failed$", out.stdout, re.M)
