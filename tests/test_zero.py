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


def reference_bf16(world_size, steps=STEPS, clip=1.0):
    """One process, mixed precision as DeepSpeed does it: fp32 master weights stepped by NovoGrad, a bf16 copy
    for forward/backward, each micro-batch's bf16 gradient accumulated in fp32."""
    from novograd_ds import NovoGrad

    master = make_model()
    opt = NovoGrad(param_groups(master), **{k: v for k, v in OPT_PARAMS.items() if k != "weight_decay"})
    for step in range(steps):
        lowp = copy.deepcopy(master).to(torch.bfloat16)
        acc = {n: torch.zeros_like(p) for n, p in master.named_parameters() if p.requires_grad}
        for r in range(world_size):
            for m in range(GAS):
                lowp.zero_grad()
                x, y = batch(step, m, r, torch.bfloat16)
                (loss_fn(lowp(x), y) / GAS).backward()
                for n, p in lowp.named_parameters():
                    if p.requires_grad:
                        acc[n] += p.grad.float() / world_size
        for n, p in master.named_parameters():
            if p.requires_grad:
                p.grad = acc[n]
        torch.nn.utils.clip_grad_norm_([p for p in master.parameters() if p.requires_grad], clip)
        opt.step()
    return {n: p.detach().clone() for n, p in master.named_parameters()}, {
        n: float(opt.state[p]["exp_avg_sq"]) for n, p in master.named_parameters() if p in opt.state}


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



def zero_keys_supported(zero):
    """False when this DeepSpeed release has no such zero_optimization key (parameter_alignment: 0.19.7 on)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    return all(k in fields or k in aliases for k in zero if k != "client")


def supported_configs():
    return [name for name, spec in CONFIGS.items() if zero_keys_supported(spec)]


# bf16 wrappers: (zero config, top-level config additions). fp16 cannot run here: DeepSpeed's CPU accelerator
# refuses it ("Type fp16 is not supported on your device.", engine.py _do_sanity_check) unless the CPU has mkldnn
# fp16 (AVX512-FP16/AMX); bf16 without ZeRO goes through the same FP16_UnfusedOptimizer, so that wrapper is covered.
BF16_CONFIGS = {
    "bf16_optimizer": (dict(stage=1), {"data_types": {"grad_accum_dtype": "fp32"}}),
    "bf16_unfused": (dict(stage=0), {}),
    "z2_bf16": (dict(stage=2), {}),
}
# Against the mixed-precision one-process reference, bf16 runs agree only to bf16 gradient-accumulation rounding
# (DeepSpeed accumulates micro-batch gradients in bf16 here); measured 4e-3 at world 2 and 3e-2 at world 3 after 6 steps, while
# the per-shard computation is off by >0.2. The sharp check: BF16_Optimizer (flat ZeRO-1 partitions) must equal
# the whole-tensor FP16_UnfusedOptimizer run (bf16, stage 0; same DeepSpeed gradients) within 1e-5.
BF16_RTOL = {"bf16_optimizer": 1e-1, "bf16_unfused": 1e-1, "z2_bf16": 1e-1}


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


def master_params(engine):
    """fp32 master weights by parameter name (bf16 runs)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    wrapper = engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        m = {id(lp): hp for g16, g32 in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(g16, g32)}
        return {n: (m[id(p)] if id(p) in m else p).detach().float().clone() for n, p in engine.module.named_parameters()}
    return {n: (safe_get_full_fp32_param(p) if p.requires_grad else p).detach().float().clone()
            for n, p in engine.module.named_parameters()}


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


def equivalence_worker(rank, world_size, names, bf16_names=()):
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
    if bf16_names:
        ref_b, ref_bv = reference_bf16(world_size)
        for name in bf16_names:
            zero, extra = BF16_CONFIGS[name]
            cfg = {**ds_config(world_size, **zero), "bf16": {"enabled": True}, **extra}
            engine = train(rank, world_size, cfg, dtype=torch.bfloat16)
            params, v = master_params(engine), layer_v(engine)
            results[name] = {"wrapper": type(engine.optimizer).__name__, "bound": len(engine.basic_optimizer._layouts),
                             "err": rel_err(params, ref_b), "v": v,
                             "v_err": max(abs(v[n] - ref_bv[n]) / ref_bv[n] for n in ref_bv), "params": params}
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


def check_equivalence(results, names, bf16_names=()):
    for name in list(names) + list(bf16_names):
        per_rank = [r[name] for r in results]
        print(name, per_rank[0]["wrapper"], "bound flats:", per_rank[0]["bound"], "rel err:", per_rank[0]["err"])
        tol = BF16_RTOL.get(name, RTOL)
        assert per_rank[0]["err"] < tol, (name, per_rank[0]["err"])
        assert per_rank[0]["v_err"] < tol, (name, per_rank[0]["v_err"])
        for other in per_rank[1:]:
            assert other["v"] == per_rank[0]["v"], f"{name}: ranks disagree on v"
            for n, t in per_rank[0]["params"].items():
                assert torch.equal(other["params"][n], t), f"{name}: ranks disagree on {n}"
    assert results[0]["z2_client"]["err"] < RTOL and results[0]["z2_client"]["bound"] > 0
    # Sharp bf16 check at world size 2 only: there both wrappers see bit-identical gradients. At world size 3
    # FP16_UnfusedOptimizer averages bf16 gradients (a division by 3 in bf16), BF16_Optimizer fp32 ones, so the
    # gradients themselves differ (measured 9e-3 after 6 steps) and the comparison says nothing about NovoGrad.
    if len(results) == 2 and "bf16_optimizer" in bf16_names and "bf16_unfused" in bf16_names:
        sharded, whole = results[0]["bf16_optimizer"], results[0]["bf16_unfused"]
        err = rel_err(sharded["params"], whole["params"])
        print("bf16_optimizer vs bf16_unfused rel err:", err)
        assert err < RTOL
        assert all(abs(sharded["v"][n] - whole["v"][n]) <= RTOL * whole["v"][n] for n in whole["v"])
    for name in ("z2_naive", "z3_naive"):
        print(name, "rel err:", results[0][name]["err"])
        assert results[0][name]["err"] > 100 * RTOL, f"{name}: the per-shard computation should differ"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_zero_equivalence(world_size):
    names = supported_configs()
    results = run_ranks(equivalence_worker, world_size, names, list(BF16_CONFIGS))
    check_equivalence(results, names, list(BF16_CONFIGS))


# -- safety net, refusals, explicit bind, overflow ------------------------------------------------------------------
REFUSALS = {
    "offload_optimizer.ratio": (dict(stage=3, offload_optimizer={"device": "cpu", "ratio": 0.5}), {}),
    "super_offload": (dict(stage=3, offload_optimizer={"device": "cpu", "super_offload": True}), {}),
    "zenflow": (dict(stage=2, offload_optimizer={"device": "cpu"}, zenflow={"topk_ratio": 0.1}), {}),
    "bf16_master_weights_and_grads": (dict(stage=2), {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}),
    "bf16_optimizer_states": (dict(stage=2), {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                                       "bf16_optimizer_states": True}}),
}


def misc_worker(rank, world_size):
    import novograd_ds
    from novograd_ds.integrations.deepspeed import UnsupportedDeepSpeedConfig

    out = {"refusals": {}}
    for key, (zero, extra) in REFUSALS.items():
        cfg = {**ds_config(world_size, **zero), **extra}
        try:
            train(rank, world_size, cfg)
            out["refusals"][key] = None
        except UnsupportedDeepSpeedConfig as err:
            out["refusals"][key] = str(err)

    # unbound: registration off, a NovoGrad instance under ZeRO-2 must refuse to step, naming the fix
    novograd_ds.unregister()
    cfg = {**ds_config(world_size, 2), "zero_allow_untested_optimizer": True}
    try:
        train(rank, world_size, cfg, client=True)
        out["unbound"] = None
    except RuntimeError as err:
        out["unbound"] = str(err)
    # ... and novograd_ds.bind(engine) right after initialize fixes it
    model = make_model()
    opt = novograd_ds.NovoGrad(param_groups(model), **{k: v for k, v in OPT_PARAMS.items() if k != "weight_decay"})
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config={k: v for k, v in cfg.items() if k != "optimizer"})
    assert not opt.is_bound
    novograd_ds.bind(engine)
    for step in range(STEPS):
        for m in range(GAS):
            x, y = batch(step, m, rank)
            engine.backward(loss_fn(engine(x), y))
            engine.step()
    ref, _ = reference(world_size)
    out["explicit_bind_err"] = rel_err(full_params(engine), ref)
    novograd_ds.register()

    # overflow: a non-finite gradient makes DeepSpeed skip the step; NovoGrad's state must not move
    out["overflow"] = {}
    for name, (zero, extra) in (("bf16_optimizer", BF16_CONFIGS["bf16_optimizer"]), ("z2", (dict(stage=2), {}))):
        cfg = {**ds_config(world_size, **zero), **extra}
        if name != "z2":
            cfg["bf16"] = {"enabled": True}
        dtype = torch.bfloat16 if name != "z2" else torch.float32
        engine = train(rank, world_size, cfg, dtype=dtype)
        opt = engine.basic_optimizer
        before = {id(t): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for t, st in opt.state.items()}
        master_before = [t.detach().clone() for t in opt.state]
        for m in range(GAS):
            x, y = batch(99, m, rank, dtype)
            if rank == 0:
                x[0, 0] = float("nan")  # (an inf would saturate in tanh and give finite gradients)
            engine.backward(loss_fn(engine(x), y))
            engine.step()
        same = all(
            (torch.equal(v, before[id(t)][k]) if torch.is_tensor(v) else v == before[id(t)][k])
            for t, st in opt.state.items() for k, v in st.items()
        ) and all(torch.equal(a, t) for a, t in zip(master_before, opt.state))
        out["overflow"][name] = {"skipped": bool(engine.skipped_steps > 0), "state_unchanged": same}
    return out


@pytest.mark.slow
def test_safety_net_refusals_bind_overflow():
    results = run_ranks(misc_worker, 2)
    r = results[0]
    for key, msg in r["refusals"].items():
        print(key, "->", msg)
        assert msg is not None and "NovoGrad cannot run under this DeepSpeed configuration" in msg, key
        assert key.split(".")[-1] in msg, (key, msg)
    print("unbound ->", r["unbound"])
    assert r["unbound"] is not None and "novograd_ds.register()" in r["unbound"] and "novograd_ds.bind(engine)" in r["unbound"]
    assert r["explicit_bind_err"] < RTOL, r["explicit_bind_err"]
    for name, o in r["overflow"].items():
        print("overflow", name, o)
        assert o["skipped"] and o["state_unchanged"], name


# -- checkpoints ------------------------------------------------------------------------------------------------------
GLOBAL = 12  # samples per optimizer step, the same at world size 3 and 2
CKPT_STAGES = {"z2": dict(stage=2), "z3": dict(stage=3, sub_group_size=100)}


def global_batch(step, rank, micro, world_size):
    g = torch.Generator().manual_seed(777 + step)
    x, y = torch.randn(GLOBAL, 13, generator=g), torch.randn(GLOBAL, 3, generator=g)
    mb = GLOBAL // (world_size * GAS)
    lo = (rank * GAS + micro) * mb
    return x[lo:lo + mb], y[lo:lo + mb]


def ckpt_config(world_size, zero):
    cfg = ds_config(world_size, **zero)
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL // (world_size * GAS)
    cfg["train_batch_size"] = GLOBAL
    return cfg


def run_steps(engine, rank, world_size, steps):
    for step in steps:
        for m in range(GAS):
            x, y = global_batch(step, rank, m, world_size)
            engine.backward(loss_fn(engine(x), y))
            engine.step()


def new_engine(cfg):
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
    return engine


def ckpt_save_worker(rank, world_size, root):
    import novograd_ds  # noqa: F401

    out = {}
    for name, zero in CKPT_STAGES.items():
        cfg = ckpt_config(world_size, zero)
        engine = new_engine(cfg)
        run_steps(engine, rank, world_size, range(3))
        engine.save_checkpoint(os.path.join(root, name), tag="s3")
        run_steps(engine, rank, world_size, range(3, 6))
        uninterrupted = full_params(engine)
        del engine
        resumed = new_engine(cfg)
        resumed.load_checkpoint(os.path.join(root, name), tag="s3")
        run_steps(resumed, rank, world_size, range(3, 6))
        out[name] = {"uninterrupted": uninterrupted, "rigid": full_params(resumed)}
        del resumed
    return out


def ckpt_load_worker(rank, world_size, root):
    import novograd_ds  # noqa: F401

    out = {}
    for name, zero in CKPT_STAGES.items():
        cfg = {**ckpt_config(world_size, zero), "checkpoint": {"load_universal": True}}
        engine = new_engine(cfg)
        engine.load_checkpoint(os.path.join(root, name), tag="s3_uni", load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        if name == "z3":
            # DeepSpeed 0.19.8 bug, not NovoGrad's: the ZeRO-3 universal loader copies param_groups[0]'s
            # hyperparameters into EVERY param group (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3),
            # so the no-decay group gets weight_decay=0.01. Re-apply the real per-group values.
            for group, wd in zip(engine.basic_optimizer.param_groups, (OPT_PARAMS["weight_decay"], 0.0)):
                group["weight_decay"] = wd
        run_steps(engine, rank, world_size, range(3, 6))
        out[name] = full_params(engine)
    return out


@pytest.mark.slow
def test_checkpoint_rigid_and_universal(tmp_path):
    import subprocess
    import sys

    saved = run_ranks(ckpt_save_worker, 3, str(tmp_path))
    for name in CKPT_STAGES:
        for n, t in saved[0][name]["uninterrupted"].items():
            assert torch.equal(saved[0][name]["rigid"][n], t), f"{name}: rigid resume differs on {n}"
        src, dst = tmp_path / name / "s3", tmp_path / name / "s3_uni"
        proc = subprocess.run([sys.executable, "-m", "novograd_ds.universal", "--input_folder", str(src),
                               "--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1",
                               "--inject_missing_state"],
                              capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        (tmp_path / name / "latest_universal").write_text("s3_uni")
    loaded = run_ranks(ckpt_load_worker, 2, str(tmp_path))
    for name in CKPT_STAGES:
        err = rel_err(loaded[0][name], saved[0][name]["uninterrupted"])
        print(name, "universal 3 -> 2 rel err:", err)
        assert err < RTOL, (name, err)
