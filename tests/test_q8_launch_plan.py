"""The 8-bit moment's CUDA launch logic, exercised on the CPU: cuda/q8_plan.h plus a warp-by-warp emulation.

tests/cuda_q8_emulation.cpp is compiled here with g++ against the real novograd_ds/ops/csrc/cuda/q8_plan.h and
q8_math.h (NOTE: [8-bit launches], NOTE: [8-bit moment]), with the op's launch limits and with others. Each build
replays the boundary kernel and the update kernel on many run configurations (whole tensors, empty runs, runs inside
one block, a layer cut into pieces at block-interior points, runs crossing chunk edges, more runs and more chunks
than a launch holds, random tables) for both maps, both roundings and both weight-decay forms, and checks coverage
(every element, scale and boundary row written once) and equality, bit for bit, with a plain evaluation of the
definition. Builds that differ only in launch limits (or the number of warps per CUDA block) must give the same
bits. The emulation also runs a problem written by Python and its results equal the foreach backend's bit for bit.

No GPU is needed; ``test_cuda_q8_op_equals_the_emulation`` (marked gpu) closes the loop on a real device.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from novograd_ds.kernels import eightbit as eb
from novograd_ds.kernels.foreach import ForeachBackend

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "novograd_ds" / "ops" / "csrc"
SOURCE = Path(__file__).resolve().parent / "cuda_q8_emulation.cpp"
CXX = os.environ.get("CXX", "c++")

REAL = dict()  # the op's limits: 24 runs and 320 chunks of 65536 elements per launch, 512 threads
SMALL = dict(NOVOGRAD_Q8_CHUNK=512, NOVOGRAD_Q8_THREADS=64)  # 2 blocks per chunk, 2 warps
BUILDS = {
    "op-limits": (REAL, ["--random", "6"]),
    "tight": ({"NOVOGRAD_Q8_MAX_SPANS": 3, "NOVOGRAD_Q8_MAX_BLOCKS": 7, "NOVOGRAD_Q8_THREADS": 128}, ["--random", "6"]),
    "small": (SMALL, ["--random", "80"]),
    "small-one": ({**SMALL, "NOVOGRAD_Q8_MAX_SPANS": 1, "NOVOGRAD_Q8_MAX_BLOCKS": 1}, ["--random", "80"]),
    "small-wide": ({**SMALL, "NOVOGRAD_Q8_MAX_SPANS": 40, "NOVOGRAD_Q8_MAX_BLOCKS": 48, "NOVOGRAD_Q8_THREADS": 32},
                   ["--random", "80"]),
}
CASE = re.compile(r"^case (\S+) runs=(\d+) chunks=(\d+) scales=(\d+) launches=(\d+) hash=([0-9a-f]{16})$")


def _compile(out: Path, defines: dict) -> Path:
    cmd = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
           *(f"-D{k}={v}" for k, v in defines.items()), str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def emulations(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}): the 8-bit launch emulation is compiled at test time")
    tmp = tmp_path_factory.mktemp("q8emulation")

    def build_and_run(name):
        defines, args = BUILDS[name]
        exe = _compile(tmp / name, defines)
        return name, (exe, subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build_and_run, BUILDS))


def _cases(proc) -> dict[str, dict]:
    rows = {}
    for line in proc.stdout.splitlines():
        m = CASE.match(line)
        if m:
            rows[m.group(1)] = dict(runs=int(m.group(2)), chunks=int(m.group(3)), scales=int(m.group(4)),
                                    launches=int(m.group(5)), hash=m.group(6))
    return rows


@pytest.mark.parametrize("name", list(BUILDS))
def test_every_build_covers_everything_once_and_equals_the_definition(emulations, name):
    proc = emulations[name][1]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout and re.search(r"^ok \d+ cases, 0 failures$", proc.stdout, re.M), proc.stdout
    assert len(_cases(proc)) >= 7 + 6


def test_the_op_limits_need_several_launches_for_the_large_cases(emulations):
    out = emulations["op-limits"][1].stdout
    rows = _cases(emulations["op-limits"][1])
    assert rows["many-runs"]["runs"] > 24 and rows["many-runs"]["launches"] > 1
    assert rows["many-chunks"]["chunks"] > 320 and rows["many-chunks"]["launches"] > 1
    assert int(re.search(r"table_bytes=(\d+)", out).group(1)) <= 4096


@pytest.mark.parametrize("group", [["op-limits", "tight"], ["small", "small-one", "small-wide"]],
                         ids=["op-chunk", "small-chunk"])
def test_results_are_bitwise_independent_of_launch_limits_and_warps(emulations, group):
    runs = {name: _cases(emulations[name][1]) for name in group}
    base = runs[group[0]]
    for name in group[1:]:
        assert set(runs[name]) == set(base)
        assert all(runs[name][c]["hash"] == base[c]["hash"] for c in base), f"{name} and {group[0]} differ"
        assert any(runs[name][c]["launches"] != base[c]["launches"] for c in base), f"{name} packs like {group[0]}"


# -- the emulation equals the Python backends ---------------------------------------------------------------------
def _problem(seed=0):
    """A flat of runs like a ZeRO partition's: a layer in three pieces (interior cuts), a run inside one block,
    a whole tensor, a tail; plus the boundary factors standing for the other ranks' larger maxima."""
    rows = [  # offset, length, layer, start, layer_numel, key
        (0, 1000, 0, 0, 70001, 11), (1003, 100, 0, 1000, 70001, 11), (1110, 68901, 0, 1100, 70001, 11),
        (70020, 7, 1, 300, 900, 12), (70030, 5000, 2, 0, 5000, 13), (75030, 0, 1, 5, 900, 12),
        (75030, 3 * 65536 + 9, 3, 70, 3 * 65536 + 200, 14),
    ]
    table = eb.Q8SegmentTable(*zip(*rows))
    numel = rows[-1][0] + rows[-1][1] + 4
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen) * 0.5
    w = torch.randn(numel, generator=gen)
    q = torch.randint(-127, 128, (numel,), generator=gen, dtype=torch.int8)
    scales = torch.rand(table.n_scales, generator=gen) * 0.3
    scales[::7] = 0.0
    denoms = torch.rand(4, generator=gen) + 0.5
    factor = 1.0 + torch.rand(len(rows), 2, generator=gen) * (torch.rand(len(rows), 2, generator=gen) < 0.6)
    return rows, table, g, w, q, scales, denoms, factor


def _write(path, rows, table, g, w, q, scales, denoms, factor, *, q8, step, lr, a1, c1, wd, decoupled):
    head = np.array([g.numel(), denoms.numel(), len(rows), table.n_scales, q8.map_id, q8.rounding_id, q8.seed, step,
                     int(decoupled)], dtype=np.int64)
    with open(path, "wb") as f:
        f.write(head.tobytes())
        f.write(np.array([lr, a1, c1, wd], dtype=np.float64).tobytes())
        f.write(np.array(rows, dtype=np.int64).tobytes())
        for t in (denoms, factor, g, w):
            f.write(t.numpy().astype(np.float32).tobytes())
        f.write(q.numpy().tobytes())
        f.write(scales.numpy().astype(np.float32).tobytes())


def _read(path, n_runs, numel, n_scales):
    raw = Path(path).read_bytes()
    o = 0
    bnd = np.frombuffer(raw, np.float32, 2 * n_runs, o); o += 8 * n_runs
    w = np.frombuffer(raw, np.float32, numel, o); o += 4 * numel
    q = np.frombuffer(raw, np.int8, numel, o); o += numel
    s = np.frombuffer(raw, np.float32, n_scales, o)
    return [torch.from_numpy(x.copy()) for x in (bnd.reshape(n_runs, 2), w, q, s)]


@pytest.mark.parametrize("qmap", eb.MAPS)
@pytest.mark.parametrize("rounding", eb.ROUNDINGS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_emulation_equals_the_foreach_backend(emulations, tmp_path, qmap, rounding, decoupled):
    exe = emulations["op-limits"][0]
    rows, table, g, w, q, scales, denoms, factor = _problem()
    q8 = eb.Q8Config(qmap, rounding, seed=99)
    kw = dict(lr=0.02, a1=0.9, c1=1.0, wd=0.01, decoupled=decoupled)
    _write(tmp_path / "in.bin", rows, table, g, w, q, scales, denoms, factor, q8=q8, step=5, **kw)
    proc = subprocess.run([str(exe), "--q8-from", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    e_bnd, e_w, e_q, e_s = _read(tmp_path / "out.bin", len(rows), g.numel(), table.n_scales)

    fe = ForeachBackend()
    scal = dict(beta1=kw["a1"], grad_scale=kw["c1"], weight_decay=kw["wd"], decoupled=decoupled, q8=q8)
    bnd = fe.q8_boundary_absmax_segments(w, g, q, scales, table, denoms, **scal)
    assert torch.equal(bnd, e_bnd)
    assert (bnd > 0).sum() >= 6  # the pieces' partial ends
    fe.q8_update_segments_(w, g, q, scales, table, denoms, bnd * factor, lr=kw["lr"], step=5, **scal)
    assert torch.equal(w, e_w) and torch.equal(q, e_q) and torch.equal(scales, e_s)


# -- on a GPU: the emulation is the op -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("qmap", eb.MAPS)
@pytest.mark.parametrize("rounding", eb.ROUNDINGS)
def test_cuda_q8_op_equals_the_emulation(tmp_path, qmap, rounding):
    """The CUDA op's boundary values, weights, codes and scales equal the emulation's (and foreach's) bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX})")
    from novograd_ds.kernels.native import load_backend

    exe = _compile(tmp_path / "emulation", REAL)
    backend = load_backend(torch.device("cuda"))
    rows, table, g, w, q, scales, denoms, factor = _problem(seed=1)
    q8 = eb.Q8Config(qmap, rounding, seed=5)
    kw = dict(lr=0.02, a1=0.9, c1=1.0, wd=0.01, decoupled=False)
    _write(tmp_path / "in.bin", rows, table, g, w, q, scales, denoms, factor, q8=q8, step=3, **kw)
    proc = subprocess.run([str(exe), "--q8-from", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    e_bnd, e_w, e_q, e_s = _read(tmp_path / "out.bin", len(rows), g.numel(), table.n_scales)
    gc, wc, qc, sc, dc = (t.cuda() for t in (g, w, q, scales, denoms))
    scal = dict(beta1=kw["a1"], grad_scale=kw["c1"], weight_decay=kw["wd"], decoupled=False, q8=q8)
    bnd = backend.q8_boundary_absmax_segments(wc, gc, qc, sc, table, dc, **scal)
    backend.q8_update_segments_(wc, gc, qc, sc, table, dc, (bnd.cpu() * factor).cuda(), lr=kw["lr"], step=3, **scal)
    assert torch.equal(bnd.cpu(), e_bnd)
    assert torch.equal(wc.cpu(), e_w) and torch.equal(qc.cpu(), e_q) and torch.equal(sc.cpu(), e_s)
