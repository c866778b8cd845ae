"""NovoGrad against the float64 rule (tests/rule.py), torch-optimizer, and its own identities.

Every backend x every flag combination x dtypes, over many steps, with layers whose gradient scales differ by
six orders of magnitude, a layer that skips steps and a layer that starts late.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from novograd_ds import NovoGrad
from novograd_ds.kernels.native import NativeOpUnavailable

from rule import RuleOptimizer

SHAPES = [(16, 8), (8,), (33,), (4, 4, 3), (1,)]
SCALES = [1e-3, 1.0, 1e3, 10.0, 0.1]  # 1e3 on 33 fp16 elements: sum(g*g) ~ 3e7, far past fp16's 65504
SKIPS = {3: {2, 5}}                    # layer 3 gets no gradient on steps 2 and 5
LATE = {4: 4}                          # layer 4 gets its first gradient on step 4
STEPS = 12

# (param dtype) -> (rtol, atol, why)
TOLERANCES = {
    torch.float64: (1e-10, 1e-12, "fp64 on both sides; only the order of operations differs"),
    torch.float32: (2e-5, 2e-6, "fp32 math vs fp64 over 12 steps: ~1e-7 per op, compounded"),
    torch.bfloat16: (2 ** -6, 1e-3, "w and m stored in bf16 (8-bit mantissa): fp32-vs-fp64 math may flip a "
                                   "rounding, which later steps carry; 2 ulps"),
    torch.float16: (2 ** -8, 1e-4, "w and m stored in fp16 (11-bit mantissa): 2 ulps, as for bf16"),
}

FLAGS = [dict(grad_averaging=ga, amsgrad=ams, decoupled_weight_decay=dec)
         for ga, ams, dec in itertools.product([False, True], repeat=3)]
BETAS = [(0.95, 0.98), (0.9, 0.0), (0.0, 0.5)]
BACKENDS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def make_grads(step: int, dtype: torch.dtype):
    """The gradients of one step, already rounded to `dtype`; None where a layer has none this step."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, (shape, scale) in enumerate(zip(SHAPES, SCALES)):
        g = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        if step in SKIPS.get(i, ()) or step < LATE.get(i, 0):
            g = None
        out.append(g)
    return out


def make_params(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def run_ours(params, opt, dtype, steps=STEPS):
    for step in range(1, steps + 1):
        set_grads(params, make_grads(step, dtype))
        opt.step()


def set_grads(params, grads) -> None:
    """Give each parameter its own copy of this step's gradient (None: no gradient this step)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def run_beside_rule(opt, params, dtype, betas, flags) -> RuleOptimizer:
    """STEPS steps of `opt` and of the float64 rule (lr 0.01, eps 1e-8, wd 0.01) on the same gradients."""
    round_to = dtype if dtype in (torch.bfloat16, torch.float16) else None
    ref = RuleOptimizer(params, round_to=round_to, lr=0.01, b1=betas[0], b2=betas[1], eps=1e-8, wd=0.01,
                        grad_averaging=flags["grad_averaging"], amsgrad=flags["amsgrad"],
                        decoupled=flags["decoupled_weight_decay"])
    for step in range(1, STEPS + 1):
        grads = make_grads(step, dtype)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    return ref


def new_opt(params, backend, **kw):
    try:
        opt = NovoGrad(params, **BACKENDS[backend], **kw)
        if backend == "fused":
            opt._kernels(opt.param_groups[0], opt.param_groups[0]["params"][0].device)  # builds (or refuses) now
        return opt
    except NativeOpUnavailable as e:
        pytest.skip(f"fused backend unavailable here: {e}")


def assert_state_matches_rule(opt, params, ref, dtype, amsgrad):
    rtol, atol, why = TOLERANCES[dtype]
    vtol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=rtol, atol=atol,
                                   msg=lambda m: f"layer {i} weights ({why}): {m}")
        st, rst = opt.state[p], ref.state[i]
        assert st["step"] == rst["k"]
        assert st["exp_avg"].dtype == p.dtype
        assert st["exp_avg_sq"].dim() == 0
        assert st["exp_avg_sq"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(st["exp_avg"].double(), rst["m"], rtol=rtol, atol=atol * 10,
                                   msg=lambda m: f"layer {i} exp_avg ({why}): {m}")
        # v is a sum of squares of the (rounded) gradients, in fp32 or wider: no dtype-storage error.
        torch.testing.assert_close(st["exp_avg_sq"].double(), torch.tensor(rst["v"], dtype=torch.float64), **vtol)
        if amsgrad:
            torch.testing.assert_close(st["max_exp_avg_sq"].double(),
                                       torch.tensor(rst["vmax"], dtype=torch.float64), **vtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("betas", BETAS, ids=lambda b: f"b{b[0]}-{b[1]}")
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k[:3] for k, v in f.items() if v) or "plain")
def test_matches_float64_rule(dtype, backend, betas, flags):
    hp = dict(lr=0.01, betas=betas, eps=1e-8, weight_decay=0.01, **flags)
    params = make_params(dtype)
    opt = new_opt(params, backend, **hp)
    if backend == "fused" and dtype != torch.float32:
        # The fused op takes fp32 parameters (master weights); an explicit request for others says so.
        p0 = params[0]
        p0.grad = torch.ones_like(p0)
        with pytest.raises(NativeOpUnavailable, match=r"float32 parameters.*foreach=True"):
            opt.step()
        return
    ref = run_beside_rule(opt, params, dtype, betas, flags)
    assert opt.backend == backend
    assert_state_matches_rule(opt, params, ref, dtype, flags["amsgrad"])
    # The layer that started late counted its own steps from 1; the skipping one did not count skips.
    assert opt.state[params[4]]["step"] == STEPS - LATE[4] + 1
    assert opt.state[params[3]]["step"] == STEPS - len(SKIPS[3])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_torch_optimizer(backend, weight_decay, amsgrad):
    """torch-optimizer's NovoGrad (written by others) follows the same rule when grad_averaging is off."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    ours_p, theirs_p = make_params(torch.float32), make_params(torch.float32)
    hp = dict(lr=0.01, betas=(0.95, 0.98), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad)
    ours = new_opt(ours_p, backend, **hp)
    theirs = torch_optimizer.NovoGrad(theirs_p, grad_averaging=False, **hp)
    for step in range(1, STEPS + 1):
        grads = make_grads(step, torch.float32)
        for a, b, g in zip(ours_p, theirs_p, grads):
            a.grad = None if g is None else g.clone()
            b.grad = None if g is None else g.clone()  # torch-optimizer divides p.grad in place
        ours.step()
        theirs.step()
    for i, (a, b) in enumerate(zip(ours_p, theirs_p)):
        # Both fp32; they differ only in the order of a few fp32 operations per step.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"layer {i}: {m}")
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_beta2_zero_v_is_current_squared_norm(backend):
    params = make_params(torch.float32)
    opt = new_opt(params, backend, lr=0.01, betas=(0.9, 0.0))
    for step in range(1, 6):
        grads = make_grads(step, torch.float32)
        set_grads(params, grads)
        opt.step()
        for p, g in zip(params, grads):
            if g is not None:
                expected = (g.double() ** 2).sum()
                torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("c", [1e-4, 3.0, 1e5])
def test_layer_gradient_scale_invariance(backend, c):
    """eps=0, wd=0: scaling one layer's gradient by c > 0 leaves that layer's update unchanged."""
    # fp64 where the backend takes it (exact up to rounding); the fused op is fp32-only.
    dtype = torch.float32 if backend == "fused" else torch.float64
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    a, b = make_params(dtype), make_params(dtype)
    hp = dict(lr=0.01, betas=(0.95, 0.98), eps=0.0, weight_decay=0.0)
    oa, ob = new_opt(a, backend, **hp), new_opt(b, backend, **hp)
    for step in range(1, 9):
        grads = make_grads(step, dtype)
        for i, (pa, pb, g) in enumerate(zip(a, b, grads)):
            pa.grad = None if g is None else g.clone()
            pb.grad = None if g is None else g.clone() * (c if i == 2 else 1.0)
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **tol)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_param_groups_equal_separate_optimizers(backend):
    a, b = make_params(torch.float32), make_params(torch.float32)
    g1 = dict(lr=0.02, weight_decay=0.1, betas=(0.9, 0.99))
    g2 = dict(lr=0.005, weight_decay=0.0, amsgrad=True, decoupled_weight_decay=True)
    grouped = new_opt([{"params": a[:2], **g1}, {"params": a[2:], **g2}], backend, lr=1.0)
    sep1 = new_opt(b[:2], backend, **g1)
    sep2 = new_opt(b[2:], backend, **g2)
    for step in range(1, 7):
        for pa, pb, g in zip(a, b, make_grads(step, torch.float32)):
            pa.grad = None if g is None else g.clone()
            pb.grad = None if g is None else g.clone()
        grouped.step()
        sep1.step()
        sep2.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_step_does_not_write_grads(backend):
    params = make_params(torch.float32)
    opt = new_opt(params, backend, lr=0.1, weight_decay=0.1, grad_averaging=True)
    for step in range(1, 4):
        grads = make_grads(step, torch.float32)
        set_grads(params, grads)
        opt.step()
        for p, g in zip(params, grads):
            if g is not None:
                assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("k", [0, 1, 5])
def test_resume_after_k_steps_is_exact(backend, k):
    """Save after k steps, load into a fresh optimizer, continue: identical to an uninterrupted run."""
    hp = dict(lr=0.01, weight_decay=0.01, amsgrad=True, grad_averaging=True)
    full = make_params(torch.float32)
    opt_full = new_opt(full, backend, **hp)
    run_ours(full, opt_full, torch.float32, steps=STEPS)

    first = make_params(torch.float32)
    opt1 = new_opt(first, backend, **hp)
    run_ours(first, opt1, torch.float32, steps=k)
    saved = copy.deepcopy(opt1.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = new_opt(resumed, backend, lr=123.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    for step in range(k + 1, STEPS + 1):
        set_grads(resumed, make_grads(step, torch.float32))
        opt2.step()
    for pa, pb in zip(full, resumed):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        assert opt2.state[pb]["step"] == opt_full.state[pa]["step"]


def test_load_keeps_layer_moments_in_fp32_for_bf16_params():
    """torch's load_state_dict would cast v to the param dtype; ours keeps it fp32 (no bf16 rounding of v)."""
    params = make_params(torch.bfloat16)
    opt = NovoGrad(params, lr=0.01, amsgrad=True)
    run_ours(params, opt, torch.bfloat16, steps=3)
    opt2 = NovoGrad(params, lr=0.01, amsgrad=True)
    opt2.load_state_dict(opt.state_dict())
    late = [p for i, p in enumerate(params) if LATE.get(i, 0) > 3]
    assert late and all(opt2.state[p]["step"] == 0 for p in late)  # allocated, never stepped: its next step is k=1
    for p in opt.state:
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            assert opt2.state[p][key].dtype == torch.float32
            assert torch.equal(opt2.state[p][key], opt.state[p][key])
        assert opt2.state[p]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["foreach", "fused"])
def test_load_onto_cuda_and_no_host_sync(backend):
    params = make_params(torch.float32)
    opt = NovoGrad(params, lr=0.01, amsgrad=True)
    run_ours(params, opt, torch.float32, steps=3)
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    opt2 = new_opt(cuda_params, backend, lr=0.01, amsgrad=True)
    opt2.load_state_dict(opt.state_dict())
    assert all(opt2.state[p]["exp_avg_sq"].is_cuda for p in cuda_params)
    for p in cuda_params:
        p.grad = torch.randn_like(p)
    opt2.step()  # warm-up: the first step may build/load the op
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt2.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_load_before_first_step():
    params = make_params(torch.float32)
    opt = NovoGrad(params, lr=0.05)
    fresh = NovoGrad(params, lr=0.05)
    fresh.load_state_dict(opt.state_dict())  # empty state
    run_ours(params, fresh, torch.float32, steps=2)
    assert fresh.state[params[0]]["step"] == 2


def test_default_backend_is_recorded():
    params = make_params(torch.float32)
    opt = NovoGrad(params)
    assert opt.backend is None
    run_ours(params, opt, torch.float32, steps=1)
    assert opt.backend in ("fused", "foreach")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), r"lr=-1.0"),
        (dict(eps=-1e-8), r"eps=-1e-08"),
        (dict(weight_decay=-0.1), r"weight_decay=-0.1"),
        (dict(betas=(1.0, 0.98)), r"beta1=1.0"),
        (dict(betas=(0.9, -0.1)), r"beta2=-0.1"),
        (dict(betas=(0.9, 1.5)), r"beta2=1.5"),
        (dict(betas=0.9), r"pair"),
        (dict(fused=True, foreach=True), r"fused=True and foreach=True"),
        (dict(lr=torch.tensor(0.1)), r"Python float"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NovoGrad([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_param_group_hyperparameters():
    opt = NovoGrad([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"lr=-0.5"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -0.5})


def test_complex_params_refused():
    with pytest.raises(ValueError, match=r"complex.*view_as_real"):
        NovoGrad([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sparse_gradient_refused(backend):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = new_opt(list(emb.parameters()), backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*sparse=False"):
        opt.step()


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = NovoGrad([p], lr=0.05, grad_averaging=True)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss.detach()

    losses = [float(opt.step(closure)) for _ in range(100)]
    assert losses[0] == 5.0
    assert losses[-1] < 0.01 * losses[0]


def test_foreach_norms_of_large_cpu_tensors_are_accurate():
    """NOTE: [accurate CPU norms]: torch's one-pass fp32 CPU norm is off by ~1e-3 at 25M elements; ours is not."""
    from novograd_ds.kernels.foreach import ForeachBackend

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3_000_001, generator=gen) * torch.rand(3_000_001, generator=gen),
             torch.randn(2049, 3, generator=gen).bfloat16(), torch.randn(5, generator=gen)]
    for g, n in zip(grads, ForeachBackend().sq_norms(grads)):
        exact = float(g.double().square().sum())
        assert abs(float(n) - exact) <= 1e-6 * exact, (g.shape, float(n), exact)
