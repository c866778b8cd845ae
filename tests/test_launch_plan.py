"""The CUDA op's launch logic, exercised on the CPU: launch_plan.h plus a block-by-block emulation of the kernels.

tests/cuda_launch_emulation.cpp is compiled here with g++ (into a temporary directory) against the real
novograd_ds/ops/csrc/cuda/launch_plan.h, once with the op's own limits and again with other launch limits
(-DNOVOGRAD_CUDA_MAX_SPANS=..., ...). Each build replays the norm kernels (per-chunk partials, then the per-layer
fixed-order sum) and the update kernel on many span configurations (more spans and chunks than one launch holds,
empty spans, tails, a layer split into several segments, layers without spans, more layers than a finalize
launch covers, random tables) and checks coverage (every element once, every slot once, every layer once), the
norms against float64 sums within the rounding bound, and the update bit for bit. This test then checks that the
results are bitwise identical across builds that differ only in the launch limits: the determinism NOTE:
[deterministic norms] promises.

No GPU is needed; ``test_emulation_matches_the_gpu`` (marked gpu) closes the loop on a real device by comparing
the op's norms with the emulation's, bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "novograd_ds" / "ops" / "csrc"
SOURCE = Path(__file__).resolve().parent / "cuda_launch_emulation.cpp"
CXX = os.environ.get("CXX", "c++")

# name -> (-D overrides, program arguments). Builds with the same chunk and thread count must agree bit for bit.
REAL = dict()  # the op's constants: 65536-element chunks, 512 threads
SMALL = dict(NOVOGRAD_CUDA_CHUNK=256, NOVOGRAD_CUDA_THREADS=64)  # same logic, many more chunks per element
BUILDS = {
    "op-limits": (REAL, ["--random", "8", "--budget", "300000"]),
    "tight": ({**REAL, "NOVOGRAD_CUDA_MAX_SPANS": 5, "NOVOGRAD_CUDA_MAX_BLOCKS": 17,
               "NOVOGRAD_CUDA_FINALIZE_LAYERS": 3}, ["--random", "8", "--budget", "300000"]),
    "one-per-launch": ({**REAL, "NOVOGRAD_CUDA_MAX_SPANS": 1, "NOVOGRAD_CUDA_MAX_BLOCKS": 1,
                        "NOVOGRAD_CUDA_FINALIZE_LAYERS": 1}, ["--random", "8", "--budget", "300000"]),
    "small": (SMALL, ["--random", "300"]),
    "small-tight": ({**SMALL, "NOVOGRAD_CUDA_MAX_SPANS": 3, "NOVOGRAD_CUDA_MAX_BLOCKS": 7,
                     "NOVOGRAD_CUDA_FINALIZE_LAYERS": 2}, ["--random", "300"]),
    "small-one": ({**SMALL, "NOVOGRAD_CUDA_MAX_SPANS": 1, "NOVOGRAD_CUDA_MAX_BLOCKS": 1,
                   "NOVOGRAD_CUDA_FINALIZE_LAYERS": 1}, ["--random", "300"]),
    "small-wide": ({**SMALL, "NOVOGRAD_CUDA_MAX_SPANS": 64, "NOVOGRAD_CUDA_MAX_BLOCKS": 48,
                    "NOVOGRAD_CUDA_FINALIZE_LAYERS": 100}, ["--random", "300"]),
}
CASE = re.compile(r"^case (\S+) spans=(\d+) chunks=(\d+) layers=(\d+) launches=(\d+) finalize=(\d+) "
                  r"worst=(\S+) bound=(\S+) hash=([0-9a-f]{16})$")


def _compile(out: Path, defines: dict) -> Path:
    # -ffp-contract=off: no fused multiply-add, as nvcc --fmad=false; every operation rounds as on the GPU
    cmd = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
           *(f"-D{k}={v}" for k, v in defines.items()), str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def emulations(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}): the launch-plan emulation is compiled at test time")
    tmp = tmp_path_factory.mktemp("emulation")

    def build_and_run(name):
        defines, args = BUILDS[name]
        exe = _compile(tmp / name, defines)
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
        return name, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build_and_run, BUILDS))


def _cases(proc) -> dict[str, dict]:
    rows = {}
    for line in proc.stdout.splitlines():
        m = CASE.match(line)
        if m:
            rows[m.group(1)] = dict(spans=int(m.group(2)), chunks=int(m.group(3)), layers=int(m.group(4)),
                                    launches=int(m.group(5)), finalize=int(m.group(6)), worst=float(m.group(7)),
                                    bound=float(m.group(8)), hash=m.group(9))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDS))
def test_every_build_covers_every_element_once_and_meets_float64(emulations, name):
    proc = emulations[name]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout and re.search(r"^ok \d+ cases, 0 failures$", proc.stdout, re.M), proc.stdout
    rows = _cases(proc)
    assert len(rows) >= 9 + 8 and all(r["worst"] <= r["bound"] for r in rows.values())


def test_the_op_limits_need_several_launches_for_the_large_cases(emulations):
    """With the op's own limits (36 spans, 320 blocks, 480 layers per finalize launch) the large cases really
    span several launches, so the bitwise comparison below covers launch splitting."""
    rows = _cases(emulations["op-limits"])
    assert rows["many-spans"]["spans"] > 36 and rows["many-spans"]["launches"] > 1
    assert rows["many-chunks"]["chunks"] > 320 and rows["many-chunks"]["launches"] > 1
    assert rows["many-layers"]["layers"] > 480 and rows["many-layers"]["finalize"] > 1
    assert rows["no-spans"]["launches"] == 0 and rows["empty-spans"]["launches"] == 0
    assert "table_bytes=" in emulations["op-limits"].stdout
    table_bytes = int(re.search(r"table_bytes=(\d+)", emulations["op-limits"].stdout).group(1))
    assert table_bytes <= 4096


@pytest.mark.slow
@pytest.mark.parametrize("group", [["op-limits", "tight", "one-per-launch"],
                                   ["small", "small-tight", "small-one", "small-wide"]], ids=["op-chunk", "small-chunk"])
def test_results_are_bitwise_independent_of_launch_limits(emulations, group):
    runs = {name: _cases(emulations[name]) for name in group}
    base_name, base = group[0], runs[group[0]]
    for name in group[1:]:
        assert set(runs[name]) == set(base)
        launches_differ = False
        for case, row in base.items():
            other = runs[name][case]
            assert other["hash"] == row["hash"], f"case {case}: {name} and {base_name} differ in their bits"
            launches_differ |= other["launches"] != row["launches"]
        assert launches_differ, f"{name} packs every case like {base_name}: the comparison tests nothing"


# -- on a GPU: the emulation is the op ----------------------------------------------------------------------------
@pytest.mark.gpu
def test_emulation_matches_the_gpu(tmp_path):
    """The op's per-layer norms equal the emulation's bit for bit (fp32 gradients, several launches)."""
    from novograd_ds.kernels import SegmentTable
    from novograd_ds.kernels.native import load_backend

    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX})")
    exe = _compile(tmp_path / "emulation", REAL)
    backend = load_backend(torch.device("cuda"))
    chunk = 65536
    offsets, lengths, layers, o = [], [], [], 0
    for i in range(50):  # 50 segments (> 36 per launch), 7 layers, one of 330 chunks (> 320 per launch)
        n = 330 * chunk + 3 if i == 17 else (i * 7919) % (3 * chunk) + (i % 2)
        offsets.append(o), lengths.append(n), layers.append(i % 7)
        o += n + i % 3
    table = SegmentTable(offsets, lengths, layers)
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(o + 5, generator=gen) * 3
    problem = tmp_path / "problem.bin"
    with open(problem, "wb") as f:
        f.write(torch.tensor([flat.numel(), 7, len(offsets)], dtype=torch.int64).numpy().tobytes())
        f.write(table.as_tensor().numpy().tobytes())
        f.write(flat.numpy().tobytes())
    proc = subprocess.run([str(exe), "--norms-from", str(problem)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    emulated = [int(x, 16) for x in proc.stdout.split()]
    got = backend.sq_norms_segments(flat.cuda(), table, 7).cpu()
    assert got.view(torch.int32).tolist() == [x - (1 << 32) if x >= 1 << 31 else x for x in emulated]
