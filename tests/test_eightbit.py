"""The 8-bit moment's kernels (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py) on every CPU backend.

| what                                             | how compared                          | why                             |
|--------------------------------------------------|---------------------------------------|---------------------------------|
| reference, foreach, fused CPU: w, codes, scales  | bit for bit                           | the same IEEE fp32 operations   |
| a layer cut into pieces (boundary pass + MAX)    | bit for bit against the whole layer   | blocks aligned to the layer     |
| fused CPU, 1 and 2 threads                       | bit for bit                           | each block written by one thread|
| against the float64 rule, one step, same inputs  | w within 1e-6 normwise; codes equal   | fp32 rounding of m near a code  |
|                                                  | except at most 1e-4 of them, each one | boundary; measured 0-5 of 1.05M |
|                                                  | code apart and within 1e-4 code steps | (<= 4.8e-6), all within 8.2e-6  |
|                                                  | of a boundary                         | code steps of the boundary      |
| against the float64 rule, 6 free steps           | w within 1e-5 normwise                | ~1e-7; a code one apart (above) |
|                                                  |                                       | moves w by lr x one code step   |
|                                                  |                                       | in later steps: 2.1e-6 measured |
| state bytes of a Transformer-shaped list         | <= 0.14 x AdamW's 8 bytes per param   | issue 14                        |

The CUDA op is compared with the emulation (tests/test_q8_launch_plan.py) and, on a GPU, with these backends below.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from novograd_ds.kernels import eightbit as eb
from novograd_ds.kernels.foreach import ForeachBackend
from novograd_ds.kernels.reference import ReferenceBackend
from novograd_ds.ops.builder import CPUOpBuilder, CUDAOpBuilder
from novograd_ds.testing.rule import RuleOptimizer, rule_uniform

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# run geometry: (numel, start in the layer, layer numel): whole tensors, pieces with partial ends, a piece inside
# one block, a piece across a 64K chunk edge
RUNS = [(4096, 0, 4096), (5000, 300, 5313), (70001, 0, 70001), (775, 17, 800), (7, 260, 400),
        (2 * 65536 + 300, 65536 - 100, 4 * 65536)]


@pytest.fixture(scope="module")
def fused():
    problems = CPUOpBuilder().missing()
    if problems:
        pytest.skip("cannot build the CPU op here: " + "; ".join(problems))
    from novograd_ds.kernels.native import load_backend

    return load_backend(torch.device("cpu"))


def _state(runs, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = [torch.randn(n, generator=gen).to(device) for n, _, _ in runs]
    q = [torch.zeros(n, dtype=torch.int8, device=device) for n, _, _ in runs]
    s = [torch.zeros(eb.n_blocks(st, n), device=device) for n, st, _ in runs]
    return w, q, s


def _steps(backend, runs, gdtype, q8, decoupled, steps=3, device="cpu", threads=None):
    """Steps of every run with boundary values standing for other ranks (the local max x 1 or 1.25)."""
    w, q, s = _state(runs, device=device)
    geo = eb.Q8Runs([st for _, st, _ in runs], [L for _, _, L in runs], [7 * i + 3 for i in range(len(runs))])
    gen = torch.Generator().manual_seed(2)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for k in range(1, steps + 1):
            g = [(torch.randn(n, generator=gen) * 10.0 ** (i % 3 - 1)).to(device=device, dtype=gdtype)
                 for i, (n, _, _) in enumerate(runs)]
            d = (torch.rand(len(runs), generator=gen) + 0.5).to(device)
            a1, c1 = (0.0, 1.0) if k == 1 else (0.95, 1.0)
            kw = dict(beta1=a1, grad_scale=c1, weight_decay=0.01, decoupled=decoupled, q8=q8)
            bnd = backend.q8_boundary_absmax(w, g, q, s, d, geo, **kw)
            factor = torch.tensor([[1.0, 1.25]] * len(runs), device=device)
            backend.q8_update_(w, g, q, s, d, geo, bnd * factor, lr=0.01, step=k, **kw)
    finally:
        torch.set_num_threads(before)
    return [t.cpu() for t in (*w, *q, *s, bnd)]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_cpu_backends_agree_bit_for_bit(fused, qmap, rounding, gdtype, decoupled):
    q8 = eb.Q8Config(qmap, rounding, seed=7)
    ref = _steps(ReferenceBackend(), RUNS, gdtype, q8, decoupled)
    assert _equal(_steps(ForeachBackend(), RUNS, gdtype, q8, decoupled), ref)
    assert _equal(_steps(fused, RUNS, gdtype, q8, decoupled, threads=2), ref)


def test_fused_does_not_depend_on_the_thread_count(fused):
    q8 = eb.Q8Config("sqrt", "stochastic", seed=3)
    assert _equal(_steps(fused, RUNS, torch.float32, q8, False, threads=1),
                  _steps(fused, RUNS, torch.float32, q8, False, threads=2))


def _layer_in_pieces(backend, q8, cuts, L, steps=3, gdtype=torch.float32):
    """One layer stepped whole, and as pieces (one per 'rank') with the boundary pass and an all-reduce MAX."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(L, generator=gen)
    whole = [w0.clone(), torch.zeros(L, dtype=torch.int8), torch.zeros(eb.n_blocks(0, L))]
    pieces = list(zip(cuts[:-1], cuts[1:]))
    ws = [w0[a:b].clone() for a, b in pieces]
    qs = [torch.zeros(b - a, dtype=torch.int8) for a, b in pieces]
    ss = [torch.zeros(eb.n_blocks(a, b - a)) for a, b in pieces]
    key = 77
    for k in range(1, steps + 1):
        g = (torch.randn(L, generator=gen) * 0.1).to(gdtype)
        d = torch.tensor([0.7])
        kw = dict(beta1=0.0 if k == 1 else 0.9, grad_scale=1.0, weight_decay=0.01, decoupled=False, q8=q8)
        backend.q8_update_([whole[0]], [g], [whole[1]], [whole[2]], d, eb.Q8Runs.plain([L], [key]), None, lr=0.01,
                           step=k, **kw)
        # each rank: its own piece, its own call (as ranks would), then MAX per shared block
        local, glob = [], {}
        for (a, b), w, q, s in zip(pieces, ws, qs, ss):
            runs = eb.Q8Runs([a], [L], [key])
            out = backend.q8_boundary_absmax([w], [g[a:b]], [q], [s], d, runs, **kw)[0]
            first, end = eb.block_range(a, b - a)
            fp, lp = eb.partial_ends(a, b - a, L)
            for partial, blk, v in ((fp, first, out[0]), (lp, end - 1, out[1])):
                if partial:
                    glob[blk] = max(glob.get(blk, 0.0), float(v))
            local.append((runs, first, end))
        for (a, b), w, q, s, (runs, first, end) in zip(pieces, ws, qs, ss, local):
            bnd = torch.tensor([[glob.get(first, 0.0), glob.get(end - 1, 0.0)]])
            backend.q8_update_([w], [g[a:b]], [q], [s], d, runs, bnd, lr=0.01, step=k, **kw)
    return whole, pieces, ws, qs, ss


@pytest.mark.parametrize("backend_name", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
def test_a_layer_in_pieces_equals_the_whole_layer(request, backend_name, qmap, rounding):
    """ZeRO / FSDP2 at the kernel level: ranks that hold pieces of a layer (cut inside blocks, a piece inside one
    block, pieces of one element) produce the codes, scales and weights of the whole layer, bit for bit."""
    backend = dict(reference=ReferenceBackend, foreach=ForeachBackend)[backend_name]() \
        if backend_name != "fused" else request.getfixturevalue("fused")
    L = 70001
    cuts = [0, 1000, 1001, 1100, 1200, 40000, 65536 + 5, L]
    whole, pieces, ws, qs, ss = _layer_in_pieces(backend, eb.Q8Config(qmap, rounding, seed=11), cuts, L)
    assert torch.equal(torch.cat(ws), whole[0]) and torch.equal(torch.cat(qs), whole[1])
    for (a, b), s in zip(pieces, ss):
        first, end = eb.block_range(a, b - a)
        assert torch.equal(s, whole[2][first:end])


@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_layer_at_a_time_equals_two_passes(fused, qmap, rounding, gdtype, amsgrad):
    """NOTE: [8-bit layer at a time]: q8_layer_step_ is bit for bit sq_norms + second_moment_ + q8_update_."""
    from novograd_ds.optimizer import second_moment_, step_factors

    sizes = [2 ** 20 + 3, 3 * 65536 + 5, 5000, 4096]
    q8 = eb.Q8Config(qmap, rounding, seed=2)
    runs_ = eb.Q8Runs.plain(sizes, [5, 6, 7, 8])
    out = []
    for how in ("two passes", "layer at a time"):
        w, q, s = _state([(n, 0, n) for n in sizes])
        v = [torch.zeros(()) for _ in sizes]
        vmax = [torch.zeros(()) for _ in sizes] if amsgrad else None
        gen = torch.Generator().manual_seed(4)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for k in (1, 2, 3):
                g = [(torch.randn(n, generator=gen) * 10.0 ** (i % 3 - 1)).to(gdtype) for i, n in enumerate(sizes)]
                a1, c1, a2, c2 = step_factors(k, 0.9, 0.98, False)
                kw = dict(lr=0.05, weight_decay=0.01, decoupled=k == 3, q8=q8, step=k)
                if how == "two passes":
                    vv, vm = torch.stack(v), (torch.stack(vmax) if amsgrad else None)
                    d = second_moment_(vv, fused.sq_norms(g), vm, a2=a2, c2=c2, eps=1e-8)
                    torch._foreach_copy_(v, list(vv.unbind(0)))
                    if amsgrad:
                        torch._foreach_copy_(vmax, list(vm.unbind(0)))
                    fused.q8_update_(w, g, q, s, d, runs_, None, beta1=a1, grad_scale=c1, **kw)
                else:
                    assert fused.q8_layer_step_(w, g, q, s, v, vmax, runs_, a1=a1, c1=c1, a2=a2, c2=c2, eps=1e-8, **kw)
        finally:
            torch.set_num_threads(before)
        out.append([*w, *q, *s, *v, *(vmax or [])])
    assert _equal(out[0], out[1])


# -- against the float64 rule -----------------------------------------------------------------------------------
def test_the_hash_is_the_rules():
    idx = torch.arange(0, 200_000, dtype=torch.long) * 7919 + (5 << 32)
    u = eb.uniform(11, 123456789, 42, idx)
    assert np.array_equal(u.double().numpy(), rule_uniform(11, 123456789, 42, idx.numpy()))
    assert abs(float(u.double().mean()) - 0.5) < 3e-3 and abs(float(u.double().std()) - 12 ** -0.5) < 3e-3


def _near_boundary(m, scale, qmap, rounding, u, tol):
    """Whether float64 m lies within ``tol`` (in the code domain) of the point where its code changes."""
    if scale == 0:
        return False
    if qmap == "linear":
        t = m / scale * 127
        edge = np.floor(t) + 0.5 if rounding == "nearest" else np.floor(t) + 1 - u  # floor(t + u) steps there
        return min(abs(t - edge), abs(t - edge + 1), abs(t - edge - 1)) < tol
    t = abs(m) / scale * 16129
    k = math.floor(math.sqrt(t))
    k = k - 1 if k * k > t else (k + 1 if (k + 1) ** 2 <= t else k)
    r = t - k * k
    edge = k + 0.5 if rounding == "nearest" else u * (2 * k + 1)
    return abs(r - edge) < tol * (2 * k + 1) or r < tol or (2 * k + 1) - r < tol


@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
@pytest.mark.parametrize("decoupled", [False, True])
def test_one_step_from_the_same_inputs_matches_the_float64_rule(qmap, rounding, decoupled):
    """Each step starts the rule from the backend's own state (w, v, codes, scales): codes equal except where the
    fp32 m_new lies within rounding of a code boundary, scales and weights within fp32 rounding."""
    sizes = [5000, 70001, 4096, 2 * 65536 + 17]
    q8 = eb.Q8Config(qmap, rounding, seed=9)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(n, generator=gen) for n in sizes]
    q = [torch.zeros(n, dtype=torch.int8) for n in sizes]
    s = [torch.zeros(eb.n_blocks(0, n)) for n in sizes]
    hp = dict(lr=0.01, b1=0.95, b2=0.98, eps=1e-8, wd=0.01, grad_averaging=False, amsgrad=False, decoupled=decoupled)
    rule = RuleOptimizer(w, state_bits=8, q8=dict(qmap=qmap, rounding=rounding, seed=9), **hp)
    fe = ForeachBackend()
    v = None
    mismatches = total = 0
    for k in range(1, 6):
        g = [torch.randn(n, generator=gen) * 10.0 ** (i % 3 - 1) for i, n in enumerate(sizes)]
        for i in range(len(sizes)):
            rule.w[i] = w[i].double().clone()
            if k > 1:
                rule.state[i].update(codes=q[i].numpy().astype(np.int64), scales=s[i].double().numpy(), v=float(v[i]))
        n2 = torch.stack([x.double().square().sum() for x in g])
        v = n2 if k == 1 else 0.98 * v + 0.02 * n2
        d = (v.sqrt() + 1e-8).float()
        rule.step(g)
        a1, c1 = (0.0, 1.0) if k == 1 else (0.95, 1.0)
        fe.q8_update_(w, g, q, s, d, eb.Q8Runs.plain(sizes), None, lr=0.01, beta1=a1, grad_scale=c1, weight_decay=0.01,
                      decoupled=decoupled, q8=q8, step=k)
        for i, n in enumerate(sizes):
            st = rule.state[i]
            assert float((w[i].double() - rule.w[i]).abs().max() / rule.w[i].abs().max()) < 1e-6
            assert float(np.abs(s[i].double().numpy() - st["scales"]).max() / st["scales"].max()) < 1e-6
            diff = np.nonzero(q[i].numpy().astype(np.int64) != st["codes"])[0]
            total += n
            mismatches += len(diff)
            u = rule_uniform(9, i, k, diff.astype(np.int64)) if rounding == "stochastic" else np.zeros(len(diff))
            for j, uj in zip(diff, u):
                assert abs(int(q[i][j]) - int(st["codes"][j])) == 1
                assert _near_boundary(st["m"][j], st["scales"][j // 256], qmap, rounding, uj, 1e-4), (i, j)
    assert mismatches <= 1e-4 * total, (mismatches, total)


@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
def test_free_running_steps_stay_with_the_float64_rule(fused, qmap, rounding):
    """Six steps of the fused op with its own state against the rule with its own (layers under 4096 elements are
    not quantised: the rule keeps them full precision, the test steps them with the fp32 update). Mostly ~1e-7; where
    a code came out one apart (a value at a code boundary) that element's m differs by one code step, A/127 (linear)
    or up to A/64 (sqrt), and its w by lr times that in every later step: up to 2.1e-6 measured."""
    sizes = [5000, 70001, 4096, 100]
    q8 = eb.Q8Config(qmap, rounding, seed=4)
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(n, generator=gen) for n in sizes]
    hp = dict(lr=0.05, b1=0.9, b2=0.98, eps=1e-8, wd=0.01, grad_averaging=True, amsgrad=False, decoupled=True)
    rule = RuleOptimizer(w, state_bits=8, q8=dict(qmap=qmap, rounding=rounding, seed=4), **hp)
    quant = [i for i, n in enumerate(sizes) if n >= eb.MIN_QUANTIZED_NUMEL]
    assert quant == [0, 1, 2] and not rule.quantized(3)
    q = [torch.zeros(sizes[i], dtype=torch.int8) for i in quant]
    s = [torch.zeros(eb.n_blocks(0, sizes[i])) for i in quant]
    m_small = torch.zeros(100)
    v = torch.zeros(len(sizes), dtype=torch.float64)
    from novograd_ds.optimizer import step_factors

    for k in range(1, 7):
        g = [torch.randn(n, generator=gen) for n in sizes]
        rule.step(g)
        a1, c1, a2, c2 = step_factors(k, 0.9, 0.98, True)
        v = a2 * v + c2 * torch.stack([x.double().square().sum() for x in g])
        d = (v.sqrt() + 1e-8).float()
        kw = dict(lr=0.05, beta1=a1, grad_scale=c1, weight_decay=0.01, decoupled=True)
        fused.q8_update_([w[i] for i in quant], [g[i] for i in quant], q, s, d[quant],
                         eb.Q8Runs.plain([sizes[i] for i in quant], quant), None, q8=q8, step=k, **kw)
        fused.update_([w[3]], [g[3]], [m_small], d[3:], **kw)
    for i in range(len(sizes)):
        err = float((w[i].double() - rule.w[i]).abs().max() / rule.w[i].abs().max())
        assert err < 1e-5, (i, err)


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["foreach", "fused"])
def test_errors_name_the_fix(request, backend_name):
    backend = ForeachBackend() if backend_name == "foreach" else request.getfixturevalue("fused")
    w, q, s = _state([(1000, 10, 2000)])
    g = [torch.randn(1000)]
    runs = eb.Q8Runs([10], [2000], [0])
    kw = dict(lr=0.01, beta1=0.0, grad_scale=1.0, weight_decay=0.0, decoupled=False, q8=eb.Q8Config(), step=1)
    with pytest.raises((ValueError, RuntimeError), match="partial.*boundary="):
        backend.q8_update_(w, g, q, s, torch.ones(1), runs, None, **kw)
    with pytest.raises((ValueError, RuntimeError), match="outside its layer"):
        backend.q8_update_(w, g, q, s, torch.ones(1), eb.Q8Runs([1500], [2000], [0]), torch.zeros(1, 2), **kw)
    with pytest.raises((ValueError, RuntimeError), match="int8"):
        backend.q8_update_(w, g, [q[0].to(torch.uint8)], s, torch.ones(1), runs, torch.zeros(1, 2), **kw)
    with pytest.raises(ValueError, match="qmap"):
        eb.Q8Config(qmap="dynamic")


# -- memory ---------------------------------------------------------------------------------------------------------
def transformer_shapes(d=768, vocab=50257, n_layer=12, seq=1024):
    """GPT-2 small's parameter list (124M): embeddings, per block 2 LayerNorms, qkv, projections, MLP, biases."""
    shapes = [(vocab, d), (seq, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _allocated_state_bytes(shapes) -> int:
    """Bytes of the tensors the 8-bit layout allocates per parameter tensor: exp_avg_sq (fp32 scalar), and codes
    (int8 [numel]) + scales (fp32 [n_blocks]) at >= MIN_QUANTIZED_NUMEL elements, else exp_avg (fp32 [numel])."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        state = [torch.zeros((), dtype=torch.float32)]
        if n >= eb.MIN_QUANTIZED_NUMEL:
            state += [torch.zeros(n, dtype=eb.CODE_DTYPE), torch.zeros(eb.n_blocks(0, n), dtype=torch.float32)]
        else:
            state += [torch.zeros(n, dtype=torch.float32)]
        total += sum(t.numel() * t.element_size() for t in state)
    return total


@pytest.mark.parametrize("shapes", [transformer_shapes(), transformer_shapes(d=256, vocab=4096, n_layer=4, seq=128)],
                         ids=["gpt2-124M", "main-job-4x256"])
def test_state_bytes_per_parameter(shapes):
    n_params = sum(math.prod(s) for s in shapes)
    got = _allocated_state_bytes(shapes)
    assert got == eb.state_bytes([math.prod(s) for s in shapes])
    adamw = sum(8 * math.prod(s) + 4 for s in shapes)  # exp_avg + exp_avg_sq (fp32) and a 0-dim fp32 step
    per_param = got / n_params
    assert 1.015 < per_param <= 1.05, per_param  # 1 + 4/256 = 1.0156 plus the small fp32 tensors
    assert got / adamw <= 0.14, got / adamw


# -- on a GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("qmap,rounding", list(itertools.product(eb.MAPS, eb.ROUNDINGS)))
@pytest.mark.parametrize("gdtype", GRAD_DTYPES, ids=str)
def test_cuda_op_agrees_with_the_cpu_backends_bit_for_bit(qmap, rounding, gdtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    problems = CUDAOpBuilder().missing()
    if problems:
        pytest.skip("cannot build the CUDA op here: " + "; ".join(problems))
    from novograd_ds.kernels.native import load_backend

    q8 = eb.Q8Config(qmap, rounding, seed=7)
    cuda = _steps(load_backend(torch.device("cuda")), RUNS, gdtype, q8, False, device="cuda")
    assert _equal(cuda, _steps(ForeachBackend(), RUNS, gdtype, q8, False))


@pytest.mark.gpu
def test_cuda_q8_many_launches_and_determinism():
    """More runs (30 > 24) and chunks (330 > 320) than one launch holds; twice the same bits; equal to foreach."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    from novograd_ds.kernels.native import load_backend

    backend = load_backend(torch.device("cuda"))
    runs = [(330 * 65536 + 77, 123, 330 * 65536 + 300)] + [(1000 + 37 * i, 13 * i, 1000 + 50 * i) for i in range(29)]
    q8 = eb.Q8Config("linear", "stochastic", seed=1)
    a = _steps(backend, runs, torch.bfloat16, q8, True, steps=2, device="cuda")
    b = _steps(backend, runs, torch.bfloat16, q8, True, steps=2, device="cuda")
    assert _equal(a, b)
    assert _equal(a, _steps(ForeachBackend(), runs, torch.bfloat16, q8, True, steps=2))


# -- the other SIMD builds ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_isa_builds_agree_bit_for_bit(tmp_path, isa):
    """The AVX2 and scalar builds of the CPU op (this machine's own build is covered above) give the foreach
    backend's codes, scales and weights, bit for bit (one build each, about a minute)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    if CPUOpBuilder().missing():
        pytest.skip("cannot build the CPU op here: " + "; ".join(CPUOpBuilder().missing()))
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    tests = Path(__file__).resolve().parent
    code = f"""
        import itertools, sys, torch
        sys.path.insert(0, {str(tests)!r})
        from test_eightbit import GRAD_DTYPES, RUNS, _equal, _steps
        from novograd_ds.kernels import eightbit as eb
        from novograd_ds.kernels.foreach import ForeachBackend
        from novograd_ds.kernels.native import load_backend
        fb = load_backend("cpu")
        assert fb.module.simd == {isa!r}, fb.module.simd
        for (qmap, rnd), gd, dec in itertools.product(itertools.product(eb.MAPS, eb.ROUNDINGS), GRAD_DTYPES,
                                                     (False, True)):
            q8 = eb.Q8Config(qmap, rnd, seed=7)
            assert _equal(_steps(fb, RUNS, gd, q8, dec, threads=2), _steps(ForeachBackend(), RUNS, gd, q8, dec)), \\
                (qmap, rnd, gd, dec)
        print("Q8 ISA OK")
        """
    env = {**os.environ, "NOVOGRAD_DS_AUTOREGISTER": "0", "NOVOGRAD_DS_CPU_ISA": isa,
           "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         cwd=str(tests.parent), timeout=1200)
    assert out.returncode == 0 and "Q8 ISA OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


# -- the 8-bit self-check (NOTE: [8-bit self-check] in kernels/native.py) ---------------------------------------------
def test_q8_self_check_passes_and_catches_a_wrong_kernel(fused):
    from novograd_ds.kernels import native

    results = native.self_check_q8(fused.module, torch.device("cpu"))
    assert len(results) == 8 and all(r.passed for r in results), [r.describe() for r in results if not r.passed]
    assert max(r.diff for r in results) == 0.0  # bit for bit on the CPU

    class Perturbed:  # the op with its 8-bit update off by one code step in every other block
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def q8_update(self, params, grads, codes, scales, *args):
            self.module.q8_update(params, grads, codes, scales, *args)
            for c in codes:
                c.view(-1, 1)[::512].add_(1).clamp_(-127, 127)

    bad = native.self_check_q8(Perturbed(fused.module), torch.device("cpu"))
    assert not any(r.passed for r in bad)
    strict = native.FusedBackend(Perturbed(fused.module), "cpu", strict=True)
    w, q, s = _state([(4096, 0, 4096)])
    with pytest.raises(native.NativeOpUnavailable, match="self-check 'q8 linear/nearest float32'"):
        strict.q8_update_(w, [torch.randn(4096)], q, s, torch.ones(1), eb.Q8Runs.plain([4096]), None, lr=0.01,
                          beta1=0.0, grad_scale=1.0, weight_decay=0.0, decoupled=False, q8=eb.Q8Config(), step=1)
    auto = native.FusedBackend(Perturbed(fused.module), "cpu", strict=False)
    with pytest.warns(RuntimeWarning, match="using the foreach backend"):
        auto.q8_update_(w, [torch.randn(4096)], q, s, torch.ones(1), eb.Q8Runs.plain([4096]), None, lr=0.01,
                        beta1=0.0, grad_scale=1.0, weight_decay=0.0, decoupled=False, q8=eb.Q8Config(), step=1)
