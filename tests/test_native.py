"""The fused native ops (novograd_ds/ops) against the reference backend: kernels, segments and the optimizer.

The CPU op is built once per test session (about 30 s on 2 cores, cached in ``$TORCH_EXTENSIONS_DIR``). The
tests skip, with the reason, only when the toolchain is missing (no ninja, no compiler); a build that fails
with the toolchain present is a failure.

Tolerances, and why:

| what                                   | rtol  | atol  | why                                                               |
|----------------------------------------|-------|-------|-------------------------------------------------------------------|
| kernel update (params, exp_avg)         | 0     | 0     | same expressions in the same order, no FMA, IEEE division         |
| kernel sq_norms vs float64 truth        | 2e-6  | 0     | fp32 lanes per 64K chunk, chunks summed in double                 |
| optimizer, fused vs reference (3 steps) | 1e-5  | 1e-7  | sq_norms differ by ~1e-7 rel, so d and every update by about that |
| CUDA update (GPU tests)                | 0     | 0     | --fmad=false, IEEE division: same rounding as the reference        |
| CUDA sq_norms vs float64 truth          | 1e-5  | 0     | <= 128 fp32 terms per thread (bound 7.7e-6), then double sums     |
| CUDA sq_norms, run twice / two procs    | bits  | bits  | fixed-order two-stage reduction, no atomics (launch_plan.h)       |

Loading (rank-local, file-locked), the build cache key, the self-check and the CUDA tests against the float64
rule are further down; the CUDA launch logic itself is tested on the CPU by tests/test_launch_plan.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from novograd_ds import NovoGrad
from novograd_ds.kernels import SegmentTable, native
from novograd_ds.kernels.native import NativeOpUnavailable, describe, load_backend
from novograd_ds.kernels.reference import ReferenceBackend
from novograd_ds.ops.builder import CPUOpBuilder, CUDAOpBuilder, OpBuildError, cache_dir_name, source_digest

REPO = Path(__file__).resolve().parents[1]
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLAG_NAMES = ("grad_averaging", "amsgrad", "decoupled_weight_decay")
KERNEL_TOL = dict(rtol=0, atol=0)
NORM_RTOL = 2e-6
OPT_TOL = dict(rtol=1e-5, atol=1e-7)

# (rows, cols) of a small transformer block: embedding, layer norms, qkv, attention out, MLP, biases.
TRANSFORMER_SHAPES = [(512, 64), (64,), (64,), (192, 64), (192,), (64, 64), (64,), (64,), (64,), (256, 64), (256,),
                      (64, 256), (64,), (1,), (7,)]


@pytest.fixture(scope="module")
def fused():
    problems = CPUOpBuilder().missing()
    if problems:
        pytest.skip("cannot build the CPU op here: " + "; ".join(problems))
    return load_backend(torch.device("cpu"))


def _sizes(width: int) -> list[int]:
    # 1, 7, around the SIMD width and the 4-way unrolled norm loop, around a 64K chunk, and 2**20 + 3
    return sorted({1, 7, width - 1 or 1, width + 1, 4 * width - 1, 4 * width + 1, 65535, 65537, 2**20 + 3})


def _grads(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).mul_(3).to(dtype) for n in sizes]


def _truth_sq(g: torch.Tensor) -> torch.Tensor:
    return g.double().square().sum()


# -- kernels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
def test_sq_norms_match_float64(fused, gdtype):
    grads = _grads(_sizes(fused.module.simd_width), gdtype) + _grads([s[0] * (s[1] if len(s) > 1 else 1)
                                                                      for s in TRANSFORMER_SHAPES], gdtype, seed=1)
    got = fused.sq_norms(grads)
    assert got.dtype == torch.float32 and got.shape == (len(grads),)
    want = torch.stack([_truth_sq(g) for g in grads])
    torch.testing.assert_close(got.double(), want, rtol=NORM_RTOL, atol=0)


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
@pytest.mark.parametrize("first_step", [True, False], ids=["step1", "stepk"])
def test_update_matches_reference(fused, gdtype, decoupled, wd, first_step):
    sizes = _sizes(fused.module.simd_width)
    grads = _grads(sizes, gdtype)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(n, generator=gen) for n in sizes]
    avgs = [torch.zeros(n) if first_step else torch.randn(n, generator=gen) for n in sizes]
    denoms = torch.rand(len(sizes), generator=gen) + 0.25
    a1, c1 = (0.0, 1.0) if first_step else (0.95, 0.05)
    kw = dict(lr=0.01, beta1=a1, grad_scale=c1, weight_decay=wd, decoupled=decoupled)
    p_ref, m_ref = [p.clone() for p in params], [m.clone() for m in avgs]
    fused.update_(params, grads, avgs, denoms, **kw)
    ReferenceBackend().update_(p_ref, grads, m_ref, denoms, **kw)
    for got, want in zip(params + avgs, p_ref + m_ref):
        torch.testing.assert_close(got, want, **KERNEL_TOL)


def _segment_case(gdtype):
    # Segments start and end inside tensors, a layer owns several segments, gaps stay untouched,
    # one segment crosses several 64K chunks, and layer 3 has no segment at all.
    table = SegmentTable(offsets=[5, 105, 1200, 2800, 3000], lengths=[100, 900, 1500, 150, 2**17 + 5],
                         layers=[0, 1, 0, 2, 4])
    numel = 3000 + 2**17 + 5 + 11
    gen = torch.Generator().manual_seed(3)
    flat_g = torch.randn(numel, generator=gen).to(gdtype)
    flat_p = torch.randn(numel, generator=gen)
    flat_m = torch.randn(numel, generator=gen)
    return table, flat_g, flat_p, flat_m


@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
def test_segments_norms_and_update(fused, gdtype):
    table, flat_g, flat_p, flat_m = _segment_case(gdtype)
    n_layers = 5
    got = fused.sq_norms_segments(flat_g, table, n_layers)
    want = torch.zeros(n_layers, dtype=torch.float64)
    for o, n, k in zip(table.offsets, table.lengths, table.layers):
        want[k] += _truth_sq(flat_g[o:o + n])
    torch.testing.assert_close(got.double(), want, rtol=NORM_RTOL, atol=0)

    layer_denoms = torch.tensor([0.5, 1.5, 2.0, 9.0, 0.75])
    kw = dict(lr=0.02, beta1=0.9, grad_scale=0.1, weight_decay=0.01, decoupled=False)
    p_ref, m_ref = flat_p.clone(), flat_m.clone()
    fused.update_segments_(flat_p, flat_g, flat_m, table, layer_denoms, **kw)
    ReferenceBackend().update_segments_(p_ref, flat_g, m_ref, table, layer_denoms, **kw)
    torch.testing.assert_close(flat_p, p_ref, **KERNEL_TOL)
    torch.testing.assert_close(flat_m, m_ref, **KERNEL_TOL)
    untouched = torch.ones(flat_p.numel(), dtype=torch.bool)
    for o, n in zip(table.offsets, table.lengths):
        untouched[o:o + n] = False
    _, _, p0, m0 = _segment_case(gdtype)
    assert untouched.sum() > 0
    assert torch.equal(flat_p[untouched], p0[untouched]) and torch.equal(flat_m[untouched], m0[untouched])


def test_sq_norms_do_not_depend_on_thread_count(fused):
    grads = _grads([2**20 + 3, 65537, 9], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.sq_norms(grads)
        torch.set_num_threads(2)
        two = fused.sq_norms(grads)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# -- through the optimizer ---------------------------------------------------------------------------------
def _model_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in TRANSFORMER_SHAPES]


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "-".join(n for n, on in zip(FLAG_NAMES, f) if on) or "plain")
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_optimizer_fused_matches_reference(fused, flags, wd):
    kw = dict(zip(FLAG_NAMES, flags), lr=0.05, weight_decay=wd)
    runs = {}
    for name, extra in (("fused", dict(fused=True)), ("reference", dict(foreach=False))):
        params = _model_params(0)
        opt = NovoGrad(params, **kw, **extra)
        gen = torch.Generator().manual_seed(9)
        for step in range(3):
            for i, p in enumerate(params):
                # parameter 2 gets no gradient on step 1: it is skipped and its own step count lags
                p.grad = None if (i == 2 and step == 1) else torch.randn(p.shape, generator=gen)
            opt.step()
        assert opt.backend == name
        runs[name] = (params, opt)
    (pf, of), (pr, orf) = runs["fused"], runs["reference"]
    for a, b in zip(pf, pr):
        torch.testing.assert_close(a.detach(), b.detach(), **OPT_TOL)
        sa, sb = of.state[a], orf.state[b]
        assert sa["step"] == sb["step"]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in sa) == (key in sb)
            if key in sa:
                torch.testing.assert_close(sa[key], sb[key], **OPT_TOL)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "-".join(n for n, on in zip(FLAG_NAMES, f) if on) or "plain")
def test_layer_at_a_time_equals_two_passes(fused, flags, grad_dtype):
    """NOTE: [layer at a time]: one call doing norm, v and update per tensor is bit-identical to the two-pass path
    (sq_norms, second_moment_ in Python, update), over sizes that span many chunks and both threads."""
    from novograd_ds.optimizer import second_moment_, step_factors

    ga, ams, dec = flags
    shapes = [(2 ** 20 + 3,), (3 * 65536 + 5,), *TRANSFORMER_SHAPES]
    gen = torch.Generator().manual_seed(3)
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for how in ("two passes", "layer at a time"):
        w = [t.clone() for t in w0]
        m = [torch.zeros_like(t) for t in w0]
        v = [torch.zeros(()) for _ in w0]
        vmax = [torch.zeros(()) for _ in w0] if ams else None
        g_gen = torch.Generator().manual_seed(11)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for k in (1, 2, 3):
                g = [(torch.randn(t.shape, generator=g_gen) * 10.0 ** (i % 5 - 2)).to(grad_dtype)
                     for i, t in enumerate(w0)]
                a1, c1, a2, c2 = step_factors(k, 0.9, 0.98, ga)
                scal = dict(lr=0.05, weight_decay=0.01)
                if how == "two passes":
                    vv = torch.stack(v)
                    vm = torch.stack(vmax) if ams else None
                    d = second_moment_(vv, fused.sq_norms(g), vm, a2=a2, c2=c2, eps=1e-8)
                    torch._foreach_copy_(v, list(vv.unbind(0)))
                    if ams:
                        torch._foreach_copy_(vmax, list(vm.unbind(0)))
                    fused.update_(w, g, m, d, beta1=a1, grad_scale=c1, decoupled=dec, **scal)
                else:
                    assert fused.layer_step_(w, g, m, v, vmax, a1=a1, c1=c1, a2=a2, c2=c2, eps=1e-8,
                                             decoupled=dec, **scal)
        finally:
            torch.set_num_threads(before)
        runs.append((w, m, v, vmax))
    for a, b in zip(*runs):
        if a is None:
            continue
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **KERNEL_TOL)


def test_low_precision_params_explicit_raises_auto_uses_foreach(fused):
    p = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn(10, dtype=torch.bfloat16)
    with pytest.raises(NativeOpUnavailable, match=r"torch\.bfloat16 parameters.*fused=None"):
        NovoGrad([p], fused=True).step()
    q_auto, q_ref = p.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    q_auto.grad, q_ref.grad = p.grad.clone(), p.grad.clone()
    opt = NovoGrad([q_auto], lr=0.1)
    assert isinstance(opt._kernels(opt.param_groups[0], torch.device("cpu")), type(fused))
    opt.step()
    NovoGrad([q_ref], lr=0.1, foreach=True).step()
    assert torch.equal(q_auto, q_ref)  # went through the foreach backend, bit for bit


# -- building ----------------------------------------------------------------------------------------------
def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NOVOGRAD_DS_AUTOREGISTER": "0", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          cwd=str(REPO), timeout=600)


def test_second_load_does_not_rebuild(fused):
    builder = CPUOpBuilder()
    so = sorted(builder.build_dir().glob(f"{builder.name}*.so"))
    assert so, f"no compiled module in {builder.build_dir()}"
    before = {p: p.stat().st_mtime_ns for p in builder.build_dir().iterdir() if p.is_file()}
    out = _run_py("""
        from novograd_ds.ops.builder import CPUOpBuilder
        m = CPUOpBuilder().load()
        print("simd", m.simd)
        """, NOVOGRAD_DS_BUILD_VERBOSE="1")
    assert out.returncode == 0, out.stderr
    assert "no work to do" in out.stdout + out.stderr
    assert "-c " not in out.stdout  # no compiler command line was run
    after = {p: p.stat().st_mtime_ns for p in builder.build_dir().iterdir() if p.is_file() and p in before}
    assert {p: before[p] for p in so} == {p: after[p] for p in so}
    assert describe()[0]["available"] and describe()[0]["reason"].startswith(("loaded", "built"))


def test_missing_compiler_explicit_error_and_automatic_fallback(tmp_path):
    out = _run_py("""
        import warnings, torch
        from novograd_ds import NovoGrad
        from novograd_ds.kernels.native import NativeOpUnavailable, describe
        row = describe()[0]
        print("DESCRIBE", row["available"], row["reason"])
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        try:
            NovoGrad([p], fused=True).step()
            print("NO ERROR")
        except NativeOpUnavailable as exc:
            print("ERROR", exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = NovoGrad([p], lr=0.1)
            opt.step()
            first = float(p[0])
            opt.step()
            NovoGrad([p]).step()
        print("AUTO", opt.backend, first, len([w for w in caught if "fused op unavailable" in str(w.message)]))
        """, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["DESCRIBE"].startswith("False") and "CXX='/nonexistent/c++'" in lines["DESCRIBE"]
    msg = lines["ERROR"]
    assert "no C++ compiler" in msg and "CXX='/nonexistent/c++'" in msg and "python -m novograd_ds.env" in msg
    backend, value, n_warnings = lines["AUTO"].split()
    # step 1 with g = 1 in 3 elements: v = 3, m = 1/sqrt(3), w = 1 - 0.1/sqrt(3); one warning for three steps
    assert backend == "foreach" and abs(float(value) - (1 - 0.1 / 3 ** 0.5)) < 1e-6 and int(n_warnings) == 1
    assert not any(tmp_path.iterdir()) or not any(tmp_path.rglob("*.so"))


@pytest.mark.slow
def test_cuda_kernel_compiles_with_nvcc():
    import shutil

    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        pytest.skip("nvcc not found: the CUDA compile check needs the CUDA toolkit (set NVCC)")
    out = subprocess.run(["bash", str(REPO / "scripts" / "check_cuda_compile.sh")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sm_80 ok" in out.stdout and "sm_90 ok" in out.stdout


@pytest.mark.slow
def test_cuda_bindings_compile_against_torch_headers():
    """bindings.cpp (the torch side) passes the host compiler with torch's and the toolkit's headers (~30 s)."""
    import shutil

    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        pytest.skip("nvcc not found: the CUDA compile check needs the CUDA toolkit (set NVCC)")
    out = subprocess.run(["bash", str(REPO / "scripts" / "check_cuda_compile.sh"), "--with-bindings"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bindings.cpp ok" in out.stdout


@pytest.mark.slow
def test_scalar_isa_build_matches_reference(tmp_path):
    """The fallback for CPUs without AVX2: built with NOVOGRAD_DS_CPU_ISA=scalar, same results."""
    if CPUOpBuilder().missing():
        pytest.skip("cannot build the CPU op here: " + "; ".join(CPUOpBuilder().missing()))
    out = _run_py("""
        import torch
        from novograd_ds.kernels.native import load_backend
        from novograd_ds.kernels.reference import ReferenceBackend
        fb = load_backend("cpu")
        assert fb.module.simd == "scalar" and fb.module.simd_width == 1, fb.module.simd
        sizes = [1, 7, 9, 65537, 2**20 + 3]
        for gd in (torch.float32, torch.bfloat16, torch.float16):
            g = [torch.randn(n).to(gd) for n in sizes]
            n = fb.sq_norms(g).double(); t = torch.stack([x.double().square().sum() for x in g])
            assert torch.allclose(n, t, rtol=2e-6, atol=0), (n, t)
            for dec, wd in ((False, 0.0), (False, 0.1), (True, 0.1)):
                w = [torch.randn(k) for k in sizes]; m = [torch.randn(k) for k in sizes]
                w2 = [x.clone() for x in w]; m2 = [x.clone() for x in m]; d = torch.rand(len(sizes)) + 0.5
                kw = dict(lr=0.01, beta1=0.9, grad_scale=0.1, weight_decay=wd, decoupled=dec)
                fb.update_(w, g, m, d, **kw); ReferenceBackend().update_(w2, g, m2, d, **kw)
                assert all(torch.equal(a, b) for a, b in zip(w + m, w2 + m2))
        print("SCALAR OK")
        """, NOVOGRAD_DS_CPU_ISA="scalar", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0 and "SCALAR OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_avx512_variant_compiles(tmp_path):
    """This machine may lack AVX-512; at least the AVX-512 code path must compile (-fsyntax-only)."""
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    b = CPUOpBuilder(isa="avx512")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                   f"-I{REPO / 'novograd_ds' / 'ops' / 'csrc'}"]
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=x", *incs, *b.cxx_flags(), *b.sources()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


# -- the build cache key (NOTE: [build cache key]) ------------------------------------------------------------------
_KEY = dict(op="novograd_ds_cuda", python="3.11", torch_version="2.13.0+cu130", cuda="13.0", archs=["8.0"],
            source_hash="ab" * 32)


def test_cache_key_separates_everything_the_binary_depends_on():
    name = cache_dir_name(**_KEY)
    assert cache_dir_name(**dict(_KEY)) == name  # a pure function: same values, same directory
    assert cache_dir_name(**dict(_KEY, archs=["8.0", "8.0"])) == name
    assert cache_dir_name(**dict(_KEY, archs=["9.0", "8.0"])) == cache_dir_name(**dict(_KEY, archs=["8.0", "9.0"]))
    variants = [dict(archs=["9.0"]), dict(archs=["8.0", "9.0"]), dict(archs=["8.0+PTX"]), dict(archs=["9.0a"]),
                dict(cuda="12.8"), dict(torch_version="2.13.1+cu130"), dict(python="3.12"),
                dict(source_hash="cd" * 32)]
    names = [cache_dir_name(**dict(_KEY, **v)) for v in variants]
    assert len(set(names)) == len(variants) and name not in names
    assert all("/" not in n and " " not in n for n in names + [name])
    cpu = dict(python="3.11", torch_version="2.13.0", source_hash="ab" * 32)
    assert cache_dir_name("novograd_ds_cpu_avx2", **cpu) != cache_dir_name("novograd_ds_cpu_avx512", **cpu)
    assert cache_dir_name("novograd_ds_cpu_avx2", **cpu) != cache_dir_name("novograd_ds_cpu_avx2", **dict(cpu, python="3.12"))
    assert cache_dir_name("novograd_ds_cpu_avx2", **cpu) != cache_dir_name("novograd_ds_cpu_avx2",
                                                                             **dict(cpu, source_hash="cd" * 32))


def test_source_digest_follows_sources_headers_and_flags(tmp_path):
    src, hdr = tmp_path / "op.cpp", tmp_path / "op.h"
    src.write_text("int f();\n")
    hdr.write_text("#pragma once\n")
    d0 = source_digest([src, hdr], (["-O3"], []))
    assert source_digest([hdr, src], (["-O3"], [])) == d0
    assert source_digest([src, hdr], (["-O2"], [])) != d0
    hdr.write_text("#pragma once\n// changed\n")
    assert source_digest([src, hdr], (["-O3"], [])) != d0
    for builder in (CPUOpBuilder(), CUDAOpBuilder(archs=["9.0"])):  # every shared header is part of each op's key
        names = {p.name for p in builder.key_files()}
        assert {"novograd_math.h", "spans.h", "launch_plan.h"} <= names


def test_cuda_op_is_built_for_the_arch_list_only(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;8.0 8.0")
    b = CUDAOpBuilder()
    assert b.archs == ["8.0", "9.0"]
    gencodes = [f for f in b.nvcc_flags() if "gencode" in f]
    assert gencodes == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert _get_cuda_arch_flags(b.nvcc_flags()) == []  # torch adds no architectures of its own
    assert "_sm80-sm90_" in b.build_dir().name and "_cu" in b.build_dir().name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    ptx = CUDAOpBuilder()
    assert ptx.build_dir() != b.build_dir() and "-gencode=arch=compute_90,code=compute_90" in ptx.nvcc_flags()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(OpBuildError, match=r"TORCH_CUDA_ARCH_LIST='Hopper'.*'8\.0;9\.0'"):
        CUDAOpBuilder()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert CUDAOpBuilder().archs == [] and "noarch" in CUDAOpBuilder().build_dir().name


# -- rank-local loading (NOTE: [rank-local loading]) ------------------------------------------------------------
# A real op, tiny (no torch header: compiles in about a second), built through the same OpBuilder.load.
_TINY_OP = r"""
#include <Python.h>
#define NG_CAT2(a, b) a##b
#define NG_CAT(a, b) NG_CAT2(a, b)
#define NG_STR2(a) #a
#define NG_STR(a) NG_STR2(a)
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, NG_STR(TORCH_EXTENSION_NAME), "lock test", -1, nullptr,
                                 nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC NG_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""
_TINY_LOADER = r"""
import json, os, sys, time
from pathlib import Path
from novograd_ds.ops.builder import OpBuilder

class Tiny(OpBuilder):
    name = "novograd_ds_locktest"
    def sources(self): return [sys.argv[1]]
    def cxx_flags(self): return ["-O0"]
    def ld_flags(self): return []

b = Tiny()
if sys.argv[2] == "--print-dir":
    print(b.build_dir()); sys.exit(0)
Path(sys.argv[3]).touch()                     # ready
while not Path(sys.argv[2]).exists():         # go
    time.sleep(0.005)
mod = b.load()
info = OpBuilder.last_load[str(b.build_dir())]
print("RESULT " + json.dumps(dict(built=info["built"], waited=info["waited_s"], file=mod.__file__, pid=os.getpid())))
"""


@pytest.mark.slow
def test_concurrent_cold_loads_build_once(tmp_path):
    """Two processes load one op with a cold cache at the same moment: one builds while the other waits on the
    build directory's lock, then both import the same module; ninja compiled once. A stale torch baton (``lock``,
    left by a builder that died) does not hang them."""
    if CPUOpBuilder().missing():
        pytest.skip("cannot build ops here: " + "; ".join(CPUOpBuilder().missing()))
    src, loader = tmp_path / "tiny.cpp", tmp_path / "loader.py"
    src.write_text(_TINY_OP)
    loader.write_text(_TINY_LOADER)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "NOVOGRAD_DS_AUTOREGISTER": "0",
           "PYTHONPATH": str(REPO)}
    build_dir = Path(subprocess.run([sys.executable, str(loader), str(src), "--print-dir"], capture_output=True,
                                    text=True, env=env, check=True, timeout=300).stdout.strip().splitlines()[-1])
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # a dead builder's baton
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(loader), str(src), str(go), str(tmp_path / f"ready{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(line[len("RESULT "):]) for o, _ in outs for line in o.splitlines() if line.startswith("RESULT")]
    assert sorted(r["built"] for r in results) == [False, True]
    waiter = next(r for r in results if not r["built"])
    assert waiter["waited"] > 0  # it found the lock held while the other built
    assert results[0]["file"] == results[1]["file"] and Path(results[0]["file"]).parent == build_dir
    compiled = [ln.split("\t")[3] for ln in (build_dir / ".ninja_log").read_text().splitlines()
                if not ln.startswith("#")]
    assert sorted(compiled) == sorted({"tiny.o", "novograd_ds_locktest.so"}), compiled  # one compile, one link
    assert not (build_dir / "lock").exists()


def test_build_lock_times_out_naming_the_lock(tmp_path):
    """A lock held by another live process: the wait ends after the timeout with an error naming the file."""
    from novograd_ds.ops.builder import LOCK_NAME, build_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OpBuildError, match=rf"waited \d+ s for the lock on {re.escape(str(tmp_path / LOCK_NAME))}.*"
                                               r"NOVOGRAD_DS_BUILD_LOCK_TIMEOUT"):
            with build_lock(tmp_path, "test op", timeout=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with build_lock(tmp_path, "test op", timeout=5) as waited:  # released when its holder died
        assert waited is not None and waited < 5


def _only_rank0_steps(rank, world_size):
    """Phase 1: only rank 0 steps (rank 1 is elsewhere, here in the harness's barrier); any collective in the
    load raises at once instead of hanging. Phase 2: rank 1 cannot load the op and falls back alone."""
    import torch.distributed as dist

    from novograd_ds import NovoGrad

    out = {}
    if rank == 0:
        names = ("barrier", "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "reduce", "gather", "scatter", "all_to_all_single", "all_gather_object", "broadcast_object_list",
                 "monitored_barrier")
        saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
        called = []

        def trap(n):
            def collective(*args, **kwargs):
                called.append(n)
                raise RuntimeError(f"torch.distributed.{n} called while loading the fused op")
            return collective

        for n in saved:
            setattr(dist, n, trap(n))
        try:
            p = torch.nn.Parameter(torch.ones(5))
            p.grad = torch.full((5,), 2.0)
            opt = NovoGrad([p], lr=0.1, fused=True)
            opt.step()
            out["alone"] = (opt.backend, float(p[0]), called)
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)
    dist.barrier()  # the test's own phase boundary
    if rank == 1:
        os.environ["NOVOGRAD_DS_DISABLE_NATIVE"] = "1"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.full((5,), 2.0)
        opt = NovoGrad([p], lr=0.1)
        opt.step()
    out["auto"] = (opt.backend, float(p[0]), [str(w.message) for w in caught if "fused op unavailable" in str(w.message)])
    return out


@pytest.mark.slow
def test_loading_is_rank_local():
    """2 gloo ranks: rank 0 steps with the fused op while rank 1 never steps (no hang, no collective); then rank 1
    cannot load the op: it alone falls back to foreach, with a warning naming it, and the ranks agree to rounding."""
    if CPUOpBuilder().missing():
        pytest.skip("cannot build the CPU op here")
    from dist_harness import run_ranks

    r0, r1 = run_ranks(_only_rank0_steps, 2)
    expected = 1.0 - 0.1 * 2.0 / (20.0 ** 0.5 + 1e-8)  # step 1: m = g/|g|, w = 1 - lr*m
    backend, value, called = r0["alone"]
    assert backend == "fused" and called == [] and abs(value - expected) < 1e-6
    assert r0["auto"][0] == "fused" and r0["auto"][2] == []
    backend, value, warned = r1["auto"]
    assert backend == "foreach" and abs(value - expected) < 1e-6 and abs(value - r0["auto"][1]) < 1e-6
    assert len(warned) == 1 and "(rank 1)" in warned[0] and "NOVOGRAD_DS_DISABLE_NATIVE=1" in warned[0]


# -- the self-check (NOTE: [self-check]) -------------------------------------------------------------------------
def test_self_check_passes_and_covers_every_case(fused):
    results = native.self_check(fused.module, "cpu")
    assert all(r.passed for r in results), [r.describe() for r in results if not r.passed]
    names = {r.name for r in results}
    for dt in ("float32", "bfloat16", "float16"):
        assert {f"sq_norms {dt}", f"sq_norms_segments {dt}"} <= names
        for step, wd in itertools.product(("first-step", "later-step"), ("L2", "decoupled")):
            assert {f"update {dt} {step} {wd}", f"update_segments {dt} {step} {wd}", f"layer_step {dt} {step} {wd}"} <= names
    assert all(r.diff < r.tol / 5 for r in results)  # margin: the tolerance is not tuned to this machine
    assert native.check_device(fused.module, torch.device("cpu")) is None


class PerturbedOp:
    """Fault injection: the real loaded op, except that ``update`` moves every parameter by 1e-3 relative."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def update(self, params, *args):
        self._real.update(params, *args)
        for p in params:
            p.mul_(1.001)


@pytest.fixture
def perturbed_cpu_op(fused, monkeypatch):
    """The loaded CPU op replaced, for this test only, by :class:`PerturbedOp` around it."""
    op = PerturbedOp(fused.module)
    monkeypatch.setitem(native._modules, "cpu", (op, None))
    monkeypatch.setattr(native, "_warned", set())
    return op


_FAILED_CHECK = r"self-check 'update float32 first-step L2' on cpu: worst relative difference 0\.001\d* > tolerance 1e-05"


def test_self_check_mismatch_explicit_raises(perturbed_cpu_op):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(NativeOpUnavailable, match=_FAILED_CHECK + r".*fused=None"):
        NovoGrad([p], fused=True).step()
    assert torch.equal(p.detach(), torch.ones(3))  # nothing was updated


def test_self_check_mismatch_automatic_uses_foreach_and_warns_once(perturbed_cpu_op):
    params = _model_params(0)
    ref = [p.detach().clone().requires_grad_() for p in params]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = NovoGrad(params, lr=0.05, weight_decay=0.01)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()
        NovoGrad(params).step()
    msgs = [str(w.message) for w in caught if "fused op unavailable" in str(w.message)]
    assert opt.backend == "foreach" and len(msgs) == 1, msgs
    assert re.search(_FAILED_CHECK, msgs[0]) and "using the foreach backend" in msgs[0]
    ref_opt = NovoGrad(ref, lr=0.05, weight_decay=0.01, foreach=True)
    for p in ref:
        p.grad = torch.ones_like(p)
    ref_opt.step()
    ref_opt.step()
    NovoGrad(ref, foreach=True).step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


# -- CUDA (needs a GPU) ------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def fused_cuda():
    problems = CUDAOpBuilder().missing()
    if problems:
        pytest.skip("cannot build the CUDA op here: " + "; ".join(problems))
    return load_backend(torch.device("cuda"))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
def test_cuda_kernels_match_reference(fused_cuda, gdtype, decoupled, wd):
    sizes = _sizes(8) + [3 * 65536 * 320 + 5]  # the last one spans several launches
    grads = [g.cuda() for g in _grads(sizes, gdtype)]
    want = torch.stack([_truth_sq(g.cpu()) for g in grads])
    torch.testing.assert_close(fused_cuda.sq_norms(grads).double().cpu(), want, rtol=1e-5, atol=0)
    params = [torch.randn(n, device="cuda") for n in sizes]
    avgs = [torch.randn(n, device="cuda") for n in sizes]
    denoms = torch.rand(len(sizes), device="cuda") + 0.25
    kw = dict(lr=0.01, beta1=0.95, grad_scale=0.05, weight_decay=wd, decoupled=decoupled)
    p_ref, m_ref = [p.clone() for p in params], [m.clone() for m in avgs]
    fused_cuda.update_(params, grads, avgs, denoms, **kw)
    ReferenceBackend().update_(p_ref, grads, m_ref, denoms, **kw)
    for got, exp in zip(params + avgs, p_ref + m_ref):
        torch.testing.assert_close(got, exp, **KERNEL_TOL)
    table, flat_g, flat_p, flat_m = _segment_case(gdtype)
    flat_g, flat_p, flat_m = flat_g.cuda(), flat_p.cuda(), flat_m.cuda()
    p_ref, m_ref = flat_p.clone(), flat_m.clone()
    layer_denoms = torch.tensor([0.5, 1.5, 2.0, 9.0, 0.75], device="cuda")
    fused_cuda.update_segments_(flat_p, flat_g, flat_m, table, layer_denoms, **kw)
    ReferenceBackend().update_segments_(p_ref, flat_g, m_ref, table, layer_denoms, **kw)
    torch.testing.assert_close(flat_p, p_ref, **KERNEL_TOL)
    torch.testing.assert_close(flat_m, m_ref, **KERNEL_TOL)
    seg_want = torch.zeros(5, dtype=torch.float64)
    for o, n, k in zip(table.offsets, table.lengths, table.layers):
        seg_want[k] += _truth_sq(flat_g[o:o + n].cpu())
    torch.testing.assert_close(fused_cuda.sq_norms_segments(flat_g, table, 5).double().cpu(), seg_want, rtol=1e-5, atol=0)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_cuda_optimizer_matches_reference(fused_cuda, flags):
    kw = dict(zip(FLAG_NAMES, flags), lr=0.05, weight_decay=0.01)
    runs = []
    for extra in (dict(fused=True), dict(foreach=False)):
        params = [p.detach().cuda().requires_grad_() for p in _model_params(0)]
        opt = NovoGrad(params, **kw, **extra)
        gen = torch.Generator().manual_seed(9)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def _cuda_problem(gdtype, device):
    """50 segments over 7 layers (one of 330 chunks of 64K): several launches of both kernels, every form."""
    from novograd_ds.testing.check import multi_launch_segments

    rows, numel, n_layers = multi_launch_segments()
    gen = torch.Generator().manual_seed(3)
    flat_g = (torch.randn(numel, generator=gen) * 3).to(device=device, dtype=gdtype)
    flat_w = torch.randn(numel, generator=gen).to(device)
    flat_m = (torch.randn(numel, generator=gen) * 0.1).to(device)
    return SegmentTable(*zip(*rows)), flat_g, flat_w, flat_m, n_layers


def _deterministic_outputs(backend, gdtype, device="cuda"):
    """Norms (list and segment forms) and one update of the multi-launch problem, as CPU tensors."""
    table, flat_g, flat_w, flat_m, n_layers = _cuda_problem(gdtype, device)
    out = dict(norms_list=backend.sq_norms(table.views(flat_g)),
               norms_segments=backend.sq_norms_segments(flat_g, table, n_layers))
    d = out["norms_segments"].sqrt() + 1e-8
    backend.update_segments_(flat_w, flat_g, flat_m, table, d, lr=0.01, beta1=0.9, grad_scale=0.1,
                             weight_decay=0.01, decoupled=False)
    out.update(w=flat_w, m=flat_m)
    return {k: v.detach().cpu() for k, v in out.items()}


def _same_bits(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))]


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
def test_cuda_op_matches_float64_rule_every_flag(fused_cuda, gdtype):
    """Every flag combination of the rule, list and segment forms, and the multi-launch sizes, 3 steps each."""
    from novograd_ds.testing.check import (MULTI_LAUNCH_FLAGS, TOLERANCE, check_list, check_segments, flag_cases,
                                           multi_launch_segments)

    dev = torch.device("cuda", torch.cuda.current_device())
    worst = {}
    for f in flag_cases():
        worst[f"list {f}"] = check_list(fused_cuda, dev, torch.float32, gdtype, f)
        worst[f"segments {f}"] = check_segments(fused_cuda, dev, torch.float32, gdtype, f)
    rows, numel, n_layers = multi_launch_segments()
    for f in MULTI_LAUNCH_FLAGS:
        worst[f"list-multilaunch {f}"] = check_list(fused_cuda, dev, torch.float32, gdtype, f,
                                                    sizes=[n for _, n, _ in rows])
        worst[f"segments-multilaunch {f}"] = check_segments(fused_cuda, dev, torch.float32, gdtype, f, rows, numel,
                                                            n_layers)
    bad = {k: v for k, v in worst.items() if not v <= TOLERANCE[torch.float32]}
    assert not bad, bad


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_results_are_bitwise_deterministic_in_a_process(fused_cuda, gdtype):
    first = _deterministic_outputs(fused_cuda, gdtype)
    again = _deterministic_outputs(fused_cuda, gdtype)
    assert _same_bits(first, again) == []
    # and the list and segment forms of the norms agree with each other layer by layer, to rounding
    seg = torch.zeros(7, dtype=torch.float64).index_add_(0, torch.tensor([i % 7 for i in range(50)]),
                                                          first["norms_list"].double())
    torch.testing.assert_close(first["norms_segments"].double(), seg, rtol=1e-5, atol=0)


@pytest.mark.gpu
@cuda_only
def test_cuda_results_are_bitwise_deterministic_across_processes(fused_cuda, tmp_path):
    """Two separate processes (as two ranks would) compute the same bits as each other and as this one."""
    code = """
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_native import _deterministic_outputs
        from novograd_ds.kernels.native import load_backend
        torch.save(_deterministic_outputs(load_backend(torch.device("cuda")), torch.float32), sys.argv[1])
        """.format(tests=str(REPO / "tests"))
    files = []
    for i in range(2):
        files.append(tmp_path / f"run{i}.pt")
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(files[-1])], capture_output=True,
                             text=True, env={**os.environ, "NOVOGRAD_DS_AUTOREGISTER": "0"}, cwd=str(REPO), timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    runs = [torch.load(f) for f in files]
    here = _deterministic_outputs(fused_cuda, torch.float32)
    assert _same_bits(runs[0], runs[1]) == [] and _same_bits(runs[0], here) == []


@pytest.mark.gpu
@cuda_only
def test_cuda_self_check_passes_on_every_device(fused_cuda):
    for i in range(torch.cuda.device_count()):
        dev = torch.device("cuda", i)
        results = native.self_check(fused_cuda.module, dev)
        assert len(results) == 3 * (2 + 2 * 4) and not hasattr(fused_cuda.module, "layer_step")
        assert all(r.passed for r in results), [r.describe() for r in results if not r.passed]
        # first use on a device runs that device's own check
        fused_cuda.sq_norms([torch.ones(3, device=dev)])
        assert native._checks[(id(fused_cuda.module), str(dev))][1] is None


@pytest.mark.gpu
@pytest.mark.slow
@cuda_only
def test_env_check_passes_on_the_gpu(fused_cuda):
    out = subprocess.run([sys.executable, "-m", "novograd_ds.env", "--check", "--device", "cuda"], capture_output=True,
                         text=True, timeout=1800, env={**os.environ, "NOVOGRAD_DS_AUTOREGISTER": "0"})
    assert out.returncode == 0, "\n".join(ln for ln in out.stdout.splitlines() if not ln.startswith("PASS"))[-4000:]
    assert "PASS fused-cuda" in out.stdout and "multilaunch" in out.stdout
