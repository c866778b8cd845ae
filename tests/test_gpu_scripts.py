"""The device check's scripts, run on the CPU: benchmarks/bench_cuda_step.py --tiny and scripts/gpu_check.sh --dry-run.

They exist for a GPU machine (docs/gpu.md); here they run with tiny sizes so that a broken flag, import or stage
shows up before a lease is spent on it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from subproc import ROOT, child_env

SCRIPTS = ["scripts/gpu_check.sh", "scripts/gpu_wheels.sh"]


def _env(tmp_path, **extra):
    env = child_env(native=True, **extra)
    # the scripts call python, python3 and the deepspeed launcher by name: this interpreter's
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    return env


def test_bench_cuda_step_tiny_on_cpu(tmp_path):
    from novograd_ds.ops.builder import CPUOpBuilder

    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_cuda_step.py", "--device", "cpu", "--tiny", "--json",
                        str(out)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {row["optimizer"]: row for row in res["rows"]}
    want = {"novograd_ds foreach", "torch AdamW fused"}
    if not CPUOpBuilder().missing():
        want.add("novograd_ds fused")
    try:
        import torch_optimizer  # noqa: F401

        want.add("torch-optimizer NovoGrad")
    except ImportError:
        pass
    assert want <= set(rows), (sorted(rows), res["notes"])
    for row in rows.values():
        assert row["step_ms"] > 0 and math.isfinite(row["gb_per_s"]) and row["of_copy"] > 0
        assert row["bytes_per_param"] == (28 if "AdamW" in row["optimizer"] else 24)
    assert rows["torch AdamW fused"]["vs_adamw"] == 1.0
    assert res["copy_gb_per_s"] > 0 and res["n_params"] == 141056
    if "novograd_ds fused" in rows:  # same gradients, same steps: the two backends of ours agree
        assert res["fused_vs_foreach_max_rel_diff"] < 1e-5
    assert r.stdout.splitlines()[-1].startswith("device-to-device copy")  # the table is printed last


def test_bench_cuda_step_without_a_gpu_is_one_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "benchmarks/bench_cuda_step.py"], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--device cpu --tiny" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_shellcheck_clean(script):
    r = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """Every stage of the device check runs on the CPU with tiny sizes; the results folder holds what the device
    tool can bring back (8 files at most, no folders)."""
    results = tmp_path / "out"
    env = _env(tmp_path, OUT=str(results), GPU_CHECK_WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    summary = (results / "summary.txt").read_text()
    assert r.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1]), r.stdout[-2000:]  # the table comes last
    status = {}
    for line in summary.splitlines():
        parts = line.split()
        if parts and parts[0] in ("setup", "build", "env", "pytest", "main_job", "bench"):
            status.setdefault(parts[0], parts[1])
    assert set(status) == {"setup", "build", "env", "pytest", "main_job", "bench"}, summary
    # env: --check comes with the CUDA-op work; until then the stage says MISSING and the run goes on
    assert status.pop("env") in ("ok", "MISSING"), summary
    assert all(s == "ok" for s in status.values()), summary + r.stdout[-3000:]
    files = sorted(p.name for p in results.iterdir())
    assert files == ["1_setup.log", "2_build.log", "3_env_check.log", "4_pytest.log", "5_main_job.log",
                     "5_metrics.json", "6_bench.log", "summary.txt"], files
    m = json.loads((results / "5_metrics.json").read_text())
    assert m["steps"] == 3 and m["basic_optimizer_is_novograd"] and m["param_dtype"] == "bfloat16"
    assert r.returncode == (0 if "MISSING" not in summary else 1)
