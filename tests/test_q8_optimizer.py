"""NovoGrad(state_bits=8): the optimizer around the 8-bit kernels (NOTE: [8-bit state] in novograd_ds/quantized.py).

Plain parameters against the float64 rule's 8-bit form, every backend the same codes and scales, state bytes against
AdamW's, checkpoints; FSDP2 (sharded runs with blocks shared between ranks) equal to one process; DCP resharding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_harness import run_ranks
from novograd_ds import NovoGrad
from novograd_ds.kernels import eightbit as eb
from novograd_ds.testing.rule import RuleOptimizer

SHAPES = [(96, 80), (80,), (4096,), (33, 129), (7,)]  # 7680 and 4096 quantised; the rest fp32
HP = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def make(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def grads(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * (1 + i)).to(dtype) for i, s in enumerate(SHAPES)]


def run(params, opt, steps, dtype=torch.float32):
    for k in range(steps):
        for p, g in zip(params, grads(k, dtype)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("kw", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                         ids=["reference", "foreach", "fused"])
@pytest.mark.parametrize("qmap,rounding", [("linear", "nearest"), ("sqrt", "nearest"), ("linear", "stochastic")])
def test_plain_8bit_against_the_float64_rule(kw, qmap, rounding):
    params = make()
    opt = NovoGrad(params, **HP, state_bits=8, quant_map=qmap, quant_rounding=rounding, quant_seed=5, **kw)
    rule = RuleOptimizer(make(), state_bits=8, q8=dict(qmap=qmap, rounding=rounding, seed=5), lr=0.01, b1=0.9,
                         b2=0.98, eps=1e-8, wd=0.01, grad_averaging=False, amsgrad=False, decoupled=False)
    for k in range(6):
        g = grads(k)
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()
        rule.step(g)
    for i, p in enumerate(params):
        ref = rule.w[i]
        err = float((p.detach().double() - ref).norm() / ref.norm())
        assert err < 1e-5, (i, err)
        st = opt.state[p]
        assert ("exp_avg_codes" in st) == (p.numel() >= eb.MIN_QUANTIZED_NUMEL)
        assert float(st["exp_avg_sq"]) == pytest.approx(rule.state[i]["v"], rel=1e-6)


def test_every_backend_gives_the_same_codes_and_scales():
    """Bit-for-bit agreement of the 8-bit kernels from identical inputs is tests/test_eightbit.py's; here, through the
    optimizer, each backend's own norm (a last-bit difference in the denominator) may flip a code that lies at a
    rounding boundary, so: codes equal but for a few, scales and weights to fp32 rounding."""
    out = {}
    for name, kw in (("reference", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        params = make()
        opt = NovoGrad(params, **HP, state_bits=8, **kw)
        run(params, opt, 5)
        out[name] = [(p.detach().clone(), opt.state[p].get("exp_avg_codes"), opt.state[p].get("exp_avg_scales"))
                     for p in params]
    for name in ("foreach", "fused"):
        for (w, c, s), (w0, c0, s0) in zip(out[name], out["reference"]):
            torch.testing.assert_close(w, w0, rtol=1e-5, atol=1e-7)
            if c is not None:
                assert float((c == c0).float().mean()) > 0.999, name
                assert int((c.int() - c0.int()).abs().max()) <= 1, name
                torch.testing.assert_close(s, s0, rtol=1e-5, atol=0)


def test_state_bytes_against_adamw():
    """A GPT-2-124M-shaped parameter list: 8-bit NovoGrad's state at most 0.14x fp32 AdamW's 8 bytes per parameter."""
    d, vocab, layers = 768, 50257, 12
    shapes = [(vocab, d), (1024, d)] + [s for _ in range(layers) for s in
                                        [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                                         (4 * d,), (4 * d, d), (d,)]] + [(d,), (d,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = NovoGrad(params, lr=1e-3, state_bits=8, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    n = sum(p.numel() for p in params)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    per_param = state / n
    print(f"8-bit NovoGrad state: {per_param:.4f} bytes/param = {per_param / 8:.4f}x fp32 AdamW")
    assert per_param / 8 <= 0.14 and per_param < 1.06


def test_state_dict_round_trip_is_bitwise_and_keeps_dtypes():
    params = make(dtype=torch.bfloat16)
    opt = NovoGrad(params, **HP, state_bits=8, foreach=True)
    run(params, opt, 3, torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = NovoGrad(resumed, lr=1.0, state_bits=8, foreach=True)
    opt2.load_state_dict(saved)
    for p, q in zip(params, resumed):
        for key in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq"):
            if key in opt.state[p]:
                assert opt2.state[q][key].dtype == opt.state[p][key].dtype
                assert torch.equal(opt2.state[q][key], opt.state[p][key])
    for k in range(3, 6):
        for a, b, g in zip(params, resumed, grads(k, torch.bfloat16)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_32bit_checkpoint_into_an_8bit_optimizer_and_back():
    params = make()
    opt = NovoGrad(params, **HP, foreach=True)
    run(params, opt, 2)
    q8 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt8 = NovoGrad(q8, **HP, state_bits=8, foreach=True)
    opt8.load_state_dict(opt.state_dict())
    run(q8, opt8, 1)  # quantises the loaded fp32 moments on its first step
    assert "exp_avg_codes" in opt8.state[q8[0]] and "exp_avg" not in opt8.state[q8[0]]
    back = [torch.nn.Parameter(p.detach().clone()) for p in q8]
    opt32 = NovoGrad(back, **HP, foreach=True)
    opt32.load_state_dict(opt8.state_dict())
    run(back, opt32, 1)
    assert "exp_avg" in opt32.state[back[0]] and "exp_avg_codes" not in opt32.state[back[0]]


# -- bound flat tensors (ZeRO partitions; the real engines: tests/test_q8_zero.py) -----------------------------------
def flat_of(params, kw, gap=5):
    """One flat holding every tensor of ``params`` as one segment each (with gaps), bound like a ZeRO partition."""
    from novograd_ds.kernels import SegmentTable
    from novograd_ds.sharding import FlatLayout

    numels = [p.numel() for p in params]
    offsets = [sum(numels[:i]) + gap * (i + 1) for i in range(len(numels))]
    flat = torch.zeros(offsets[-1] + numels[-1] + gap)
    for o, p in zip(offsets, params):
        flat[o:o + p.numel()] = p.detach().reshape(-1)
    layout = FlatLayout(SegmentTable(offsets, numels, range(len(numels)), [0] * len(numels)), len(numels),
                        flat.numel(), label="test flat", tensor=flat, layer_numels=numels,
                        layer_cuts=[[] for _ in numels], layer_keys=range(len(numels)))
    opt = NovoGrad([flat], **HP, **kw)
    opt.bind_layouts({id(flat): layout})
    return flat, opt, offsets


def step_flat(flat, opt, offsets, k):
    flat.grad = torch.zeros_like(flat)
    for o, g in zip(offsets, grads(k)):
        flat.grad[o:o + g.numel()] = g.reshape(-1)
    opt.step()


@pytest.mark.parametrize("kw", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
def test_flat_8bit_equals_whole_tensors(kw):
    q8 = dict(state_bits=8, quant_map="sqrt", quant_rounding="stochastic", quant_seed=2)
    params = make()
    opt = NovoGrad(params, **HP, **q8, **kw)
    run(params, opt, 5)
    flat, fopt, offsets = flat_of(make(), {**q8, **kw})
    for k in range(5):
        step_flat(flat, fopt, offsets, k)
    st = fopt.state[flat]
    assert st["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in st
    assert st["exp_avg_small"].numel() == sum(p.numel() for p in params if p.numel() < eb.MIN_QUANTIZED_NUMEL)
    for o, p in zip(offsets, params):
        assert torch.equal(flat[o:o + p.numel()], p.detach().reshape(-1))
        if "exp_avg_codes" in opt.state[p]:
            assert torch.equal(st["exp_avg_codes"][o:o + p.numel()], opt.state[p]["exp_avg_codes"].reshape(-1))


def test_flat_8bit_state_dict_round_trip_and_conversions():
    from novograd_ds.checkpoint import CheckpointError
    from novograd_ds.quantized import FlatQ8, dequantize_flat_fragment

    q8 = dict(state_bits=8, quant_map="sqrt", quant_rounding="stochastic", foreach=True)
    flat, opt, offsets = flat_of(make(), q8)
    for k in range(3):
        step_flat(flat, opt, offsets, k)
    saved = copy.deepcopy(opt.state_dict())  # the state dict holds the live tensors, which go on stepping
    entry = saved["state"][0]
    assert entry["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in entry
    assert {"exp_avg_scales", "exp_avg_small", "q8"} <= set(entry["novograd"])
    # resumed: bitwise
    flat2, opt2, _ = flat_of(make(), q8)
    flat2.copy_(flat)
    opt2.load_state_dict(copy.deepcopy(saved))
    for k in range(3, 5):
        step_flat(flat, opt, offsets, k)
        step_flat(flat2, opt2, offsets, k)
    assert torch.equal(flat, flat2)
    assert torch.equal(opt.state[flat]["exp_avg_codes"], opt2.state[flat2]["exp_avg_codes"])
    # what the universal converter writes: the dequantised moment, fragment by fragment
    compact = entry["novograd"]
    saved_q8 = {"exp_avg_codes": entry["exp_avg_codes"], "exp_avg_scales": compact["exp_avg_scales"],
                "exp_avg_small": compact["exp_avg_small"]}
    whole = FlatQ8(opt._layouts[id(flat)]).dequantize(saved_q8, "sqrt", flat.numel())
    frag = dequantize_flat_fragment(entry["exp_avg_codes"], compact["exp_avg_scales"], compact["exp_avg_small"],
                                    compact["q8"], 300, 9000)
    assert torch.equal(frag, whole[300:9300])
    ref = make()  # each 8-bit layer's dequantised moment is close to what 32-bit NovoGrad holds after 3 steps
    ref_opt = NovoGrad(ref, **HP, foreach=True)
    run(ref, ref_opt, 3)
    for o, p in zip(offsets, ref):
        m32 = ref_opt.state[p]["exp_avg"].reshape(-1)
        err = float((whole[o:o + p.numel()] - m32).norm() / m32.norm())
        assert err < (0.05 if p.numel() >= eb.MIN_QUANTIZED_NUMEL else 1e-6), (tuple(p.shape), err)
    # into a 32-bit optimizer: the codes dequantised with the saved map; and back into 8-bit
    flat32, opt32, _ = flat_of(make(), dict(foreach=True))
    opt32.load_state_dict(copy.deepcopy(saved))
    step_flat(flat32, opt32, offsets, 3)
    assert "exp_avg" in opt32.state[flat32] and "exp_avg_codes" not in opt32.state[flat32]
    flat8, opt8, _ = flat_of(make(), q8)
    opt8.load_state_dict(opt32.state_dict())
    step_flat(flat8, opt8, offsets, 4)
    assert "exp_avg_codes" in opt8.state[flat8] and "exp_avg" not in opt8.state[flat8]
    # codes in another map than the optimizer's: one error naming the fix
    flat_l, opt_l, _ = flat_of(make(), dict(q8, quant_map="linear"))
    with pytest.raises(CheckpointError, match="quant_map='sqrt'"):
        opt_l.load_state_dict(copy.deepcopy(saved))


def test_bad_state_bits_is_one_clear_error():
    with pytest.raises(ValueError, match="state_bits=16"):
        NovoGrad(make(), state_bits=16)
    with pytest.raises(ValueError, match="qmap='log'"):
        NovoGrad(make(), state_bits=8, quant_map="log")


# -- FSDP2: runs of a layer on several ranks, blocks shared at the cuts -----------------------------------------------
class Net(torch.nn.Module):
    """Row counts that cut 256-element blocks between ranks: a 37 x 200 (7400 elements) and c 70 x 64 (4480)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(200, 37)
        self.b = torch.nn.Linear(37, 64, bias=False)
        self.c = torch.nn.Linear(64, 70)
        self.out = torch.nn.Linear(70, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def fsdp_worker(rank, world, steps, path=None, phase=None):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def batch(k, r=None):
        gen = torch.Generator().manual_seed(300 + k)
        x, y = torch.randn(12, 200, generator=gen), torch.randn(12, 3, generator=gen)
        if r is None:
            return x, y
        n = 12 // world
        return x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]

    torch.manual_seed(3)
    ref = Net()
    model = copy.deepcopy(ref)
    out = {}
    if phase is None:
        ropt = NovoGrad(ref.parameters(), **HP, state_bits=8, foreach=True)
        for k in range(steps):
            ropt.zero_grad()
            F.mse_loss(ref(batch(k)[0]), batch(k)[1]).backward()
            ropt.step()
        out["ref"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
        out["ref_codes"] = {n: ropt.state[p]["exp_avg_codes"].clone() for n, p in ref.named_parameters()
                            if "exp_avg_codes" in ropt.state[p]}
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.a, model.b, model.c):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = NovoGrad(model.parameters(), **HP, state_bits=8, foreach=True)
    todo = range(steps)
    if phase == "load":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        todo = range(3, steps)
    for k in todo:
        opt.zero_grad()
        x, y = batch(k, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        if phase == "save" and k == 2:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=path)
    out["params"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    out["codes"] = {n: opt.state[p]["exp_avg_codes"].full_tensor().clone() for n, p in model.named_parameters()
                    if "exp_avg_codes" in opt.state[p]}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_8bit_equals_one_process(world):
    r = run_ranks(fsdp_worker, world, 6)[0]
    assert set(r["codes"]) == set(r["ref_codes"]) == {"a.weight", "c.weight"}  # b.weight: 2368 < 4096, fp32
    for n, c in r["codes"].items():
        same = float((c == r["ref_codes"][n]).float().mean())
        print(f"world {world} {n}: codes identical {same:.6f}")
        assert same == 1.0, (n, same)
    err = max(float((r["params"][n] - t).norm() / t.norm()) for n, t in r["ref"].items())
    print(f"world {world}: weights rel err {err:.2e}")
    assert err < 1e-6


@pytest.mark.slow
def test_fsdp2_8bit_dcp_world3_to_world2(tmp_path):
    path = str(tmp_path / "ckpt")
    straight = run_ranks(fsdp_worker, 3, 6, path, "save")[0]
    resumed = run_ranks(fsdp_worker, 2, 6, path, "load")[0]
    for n, c in straight["codes"].items():
        assert torch.equal(resumed["codes"][n], c), n
    err = max(float((resumed["params"][n] - t).norm() / t.norm()) for n, t in straight["params"].items())
    print("8-bit DCP world 3 -> 2 rel err", err)
    assert err < 1e-6
