"""NovoGrad under real DeepSpeed engines on real processes (CPU, gloo): every ZeRO stage and wrapper must give the
same parameters as one-process NovoGrad on the same global batch, and a per-shard NovoGrad must not.

One process launch per world size runs every configuration (see tests/dist_harness.py).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dist_harness import run_ranks

deepspeed = pytest.importorskip("deepspeed")

STEPS, MICRO, GAS, LR = 6, 2, 2, 0.05
RTOL = 1e-5
OPT_PARAMS = {"lr": LR, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}


class Net(torch.nn.Module):
    """Odd sizes so that tensors straddle partition boundaries; one frozen layer."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(13, 13)
        self.frozen.requires_grad_(False)
        self.l1 = torch.nn.Linear(13, 11)
        self.l2 = torch.nn.Linear(11, 7)
        self.l3 = torch.nn.Linear(7, 3)

    def forward(self, x):
        x = torch.tanh(self.frozen(x))
        x = torch.tanh(self.l1(x))
        x = torch.tanh(self.l2(x))
        return self.l3(x)


def make_model():
    torch.manual_seed(1234)
    return Net()


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [{"params": decay, "weight_decay": OPT_PARAMS["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]


def batch(step, micro, rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(MICRO, 13, generator=g)
    y = torch.randn(MICRO, 3, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out.float(), y.float())


def reference(world_size, steps=STEPS, clip=1.0):
    """One process, plain NovoGrad, the same global batch and the same clipping as DeepSpeed."""
    from novograd_ds import NovoGrad

    model = make_model()
    opt = NovoGrad(param_groups(model), **{k: v for k, v in OPT_PARAMS.items() if k != "weight_decay"})
    for step in range(steps):
        opt.zero_grad()
        for r in range(world_size):
            for m in range(GAS):
                x, y = batch(step, m, r)
                (loss_fn(model(x), y) / (GAS * world_size)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    v = {}
    for n, p in model.named_parameters():
        if p in opt.state:
            v[n] = float(opt.state[p]["exp_avg_sq"])
    return {n: p.detach().clone() for n, p in model.named_parameters()}, v


def ds_config(world_size, stage, **zero_extra):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": MICRO * GAS * world_size,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "NovoGrad", "params": dict(OPT_PARAMS)},
        "zero_optimization": {"stage": stage, **zero_extra},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    return cfg


CONFIGS = {
    "z0": dict(stage=0),
    "z1": dict(stage=1),
    "z2": dict(stage=2),
    "z2_rr": dict(stage=2, round_robin_gradients=True),
    "z2_rr_align": dict(stage=2, round_robin_gradients=True, parameter_alignment=True),
    "z3_subgroups": dict(stage=3, sub_group_size=100),
    "z2_offload": dict(stage=2, offload_optimizer={"device": "cpu"}),
    "z3_offload": dict(stage=3, sub_group_size=100, offload_optimizer={"device": "cpu"}),
}


def train(rank, world_size, cfg, *, client=None, naive=False, dtype=torch.float32):
    from novograd_ds import NovoGrad

    model = make_model()
    kwargs = {}
    if client is not None or naive:
        opt = NovoGrad(param_groups(model), **{k: v for k, v in OPT_PARAMS.items() if k != "weight_decay"})
        opt._naive_per_tensor = naive
        kwargs["optimizer"] = opt
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
        if cfg["zero_optimization"].get("offload_optimizer"):
            cfg["zero_force_ds_cpu_optimizer"] = False
    else:
        kwargs["model_parameters"] = param_groups(model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, **kwargs)
    for step in range(STEPS):
        for m in range(GAS):
            x, y = batch(step, m, rank, dtype)
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
    return engine


def full_params(engine):
    out = {}
    stage3 = engine.zero_optimization_stage() == 3
    for n, p in engine.module.named_parameters():
        if stage3:
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.detach().float().clone()
        else:
            out[n] = p.detach().float().clone()
    return out


def layer_v(engine):
    """{param name: v} from the bound NovoGrad's per-layer state (plain path: the per-tensor state)."""
    opt = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    v = {}
    for key, lay in opt._layouts.items():
        st = opt.state.get(lay.tensor, {})
        if "exp_avg_sq_layer" in st:
            for k, p in enumerate(lay.layer_params):
                v[names[id(p)]] = float(st["exp_avg_sq_layer"][k])
    if not opt._layouts:
        for n, p in engine.module.named_parameters():
            if p in opt.state:
                v[n] = float(opt.state[p]["exp_avg_sq"])
    return v


def rel_err(params, ref):
    return max(float((params[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


def equivalence_worker(rank, world_size, names):
    import novograd_ds  # noqa: F401  (registers NovoGrad)

    ref, ref_v = reference(world_size)
    results = {}
    for name in names:
        spec = dict(CONFIGS[name])
        client = spec.pop("client", None)
        engine = train(rank, world_size, ds_config(world_size, **spec), client=client)
        params, v = full_params(engine), layer_v(engine)
        results[name] = {
            "wrapper": type(engine.optimizer).__name__,
            "bound": len(engine.basic_optimizer._layouts),
            "err": rel_err(params, ref),
            "v": v,
            "v_err": max(abs(v[n] - ref_v[n]) / ref_v[n] for n in ref_v),
            "params": params,
        }
        del engine
    # the client-instance path, and the naive per-shard computation that must differ
    for name, kw in (("z2_client", dict(client=True)), ("z2_naive", dict(naive=True)),
                     ("z3_naive", dict(naive=True))):
        stage = 3 if name.startswith("z3") else 2
        extra = {"sub_group_size": 100} if stage == 3 else {}
        engine = train(rank, world_size, ds_config(world_size, stage, **extra), **kw)
        results[name] = {"wrapper": type(engine.optimizer).__name__, "bound": len(engine.basic_optimizer._layouts),
                         "err": rel_err(full_params(engine), ref)}
        del engine
    return results


def check_equivalence(results, names):
    for name in names:
        per_rank = [r[name] for r in results]
        print(name, per_rank[0]["wrapper"], "bound flats:", per_rank[0]["bound"], "rel err:", per_rank[0]["err"])
        assert per_rank[0]["err"] < RTOL, (name, per_rank[0]["err"])
        assert per_rank[0]["v_err"] < RTOL, (name, per_rank[0]["v_err"])
        for other in per_rank[1:]:
            assert other["v"] == per_rank[0]["v"], f"{name}: ranks disagree on v"
            for n, t in per_rank[0]["params"].items():
                assert torch.equal(other["params"][n], t), f"{name}: ranks disagree on {n}"
    assert results[0]["z2_client"]["err"] < RTOL and results[0]["z2_client"]["bound"] > 0
    for name in ("z2_naive", "z3_naive"):
        print(name, "rel err:", results[0][name]["err"])
        assert results[0][name]["err"] > 100 * RTOL, f"{name}: the per-shard computation should differ"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_zero_equivalence(world_size):
    names = list(CONFIGS)
    results = run_ranks(equivalence_worker, world_size, names)
    check_equivalence(results, names)
