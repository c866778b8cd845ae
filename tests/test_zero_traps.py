"""The traps DeepSpeed's own layer-aware optimizer (Muon) fell into, each as a test for NovoGrad (DEEPSPEED_NOTES §9.2),
on real DeepSpeed engines at world size 2 (CPU, gloo), each against one-process NovoGrad on the same global batch:

* parameters created already partitioned under ``deepspeed.zero.Init`` (their ``shape`` is ``(0,)``, the real one is
  ``ds_shape``);
* stage 0 with bf16 (BF16_Optimizer in DeepSpeed 0.16, FP16_UnfusedOptimizer since 0.17) and BF16_Optimizer at stage 1;
* gradient accumulation: NovoGrad steps once per optimizer step, never per micro-step;
* ZeRO-2 with ``reduce_scatter`` on and off, ``overlap_comm``, ``contiguous_gradients``, round-robin gradients;
* CPU offload with pinned memory (ZeRO-2 and ZeRO-3);
* layers that cross partition boundaries (checked: some layer has elements on both ranks);
* a layer that gets no gradient for its first steps, and one that drops out in the middle (NOTE: [no gradient, no
  step] in optimizer.py): ZeRO 1/2/3 equal the plain path in one process.

These are the tests CI also runs under every supported DeepSpeed minor (``-m deepspeed_matrix``, see .ci/run). Where
a DeepSpeed release is broken for a configuration whatever the optimizer (reproduced with ``torch.optim.SGD``), the
case says so and runs the nearest configuration that release gets right (``DS_BUGS`` below; docs/zero.md lists them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dist_harness import run_ranks

deepspeed = pytest.importorskip("deepspeed")

from test_zero import OPT_PARAMS, batch, full_params, loss_fn, master_params, rel_err  # noqa: E402

STEPS, GAS, MICRO = 4, 2, 2
RTOL = 1e-5
LR_PARAMS = {k: v for k, v in OPT_PARAMS.items() if k != "weight_decay"}


def ds_version() -> tuple[int, int, int]:
    from novograd_ds.integrations.deepspeed import _version_tuple

    return (tuple(_version_tuple(deepspeed.__version__)) + (0, 0, 0))[:3]


# -- DeepSpeed's own bugs, per release (each reproduced with torch.optim.SGD on these CPU/gloo runs) ------------------
def ds_bug(zero: dict, extra: dict, gas: int, version=None) -> tuple[str, str] | None:
    """``(what the test does instead, why)`` when this DeepSpeed release gets the configuration wrong for every
    optimizer: each entry was reproduced with ``torch.optim.SGD`` on these CPU/gloo runs, against the same release's
    ZeRO-1 (or, for bf16, ZeRO-3 bf16) run. ``gas=1``: run without gradient accumulation; ``skip``: do not run."""
    v = version or ds_version()
    stage = zero.get("stage", 0)
    bf16 = bool(extra.get("bf16", {}).get("enabled"))
    fp32_accum = extra.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    if v < (0, 19, 8) and stage == 2 and zero.get("contiguous_gradients") is False:
        return ("skip", "DeepSpeed before 0.19.8 (seen in 0.16.9, 0.17.6, 0.18.9, 0.19.2) gives ZeRO-2 with "
                        "contiguous_gradients=false wrong gradients (torch SGD 0.05 off, also without accumulation)")
    if v[:2] == (0, 17) and stage == 0 and bf16 and not fp32_accum:
        return ("skip", "DeepSpeed 0.17 (seen in 0.17.6) steps bf16 without ZeRO (FP16_UnfusedOptimizer) on wrong "
                        "gradients (torch SGD 0.07 off, also without accumulation)")
    if v[:2] == (0, 18) and stage == 1 and bf16 and fp32_accum:
        return ("skip", "DeepSpeed 0.18 (seen in 0.18.9) BF16_Optimizer steps on wrong gradients (torch SGD 0.04 "
                        "off, also without accumulation)")
    if (0, 17, 6) <= v < (0, 18, 3) and stage == 2 and gas > 1:
        return ("gas=1", "DeepSpeed 0.17.6-0.18.2 ZeRO-2 loses gradients under gradient accumulation (DeepSpeed "
                         "issue #7718, fixed in 0.18.3; torch SGD 0.12 off)")
    return None


def ds_cpu_workarounds():
    """Close a race DeepSpeed < 0.19.8 has on CPU (gloo) only, in every rank process before any engine is built.

    ZeRO-3's coalesced parameter all-gather launches one async all-gather per parameter and waits on the last handle
    only (``_allgather_params_coalesced``: ``launch_handles[-1].wait()``). On CUDA the collectives run in order on one
    stream, so that is enough; on gloo each runs on its own thread, and the forward pass can read a parameter before
    its gather landed (uninitialised memory: we measured ZeRO-3 runs off by 1e-3 to 1e17 in one run of three to twelve,
    with torch SGD as with NovoGrad). DeepSpeed PR #8539 (in 0.19.8) waits on every handle; here each async all-gather
    is waited on as it is launched, which orders them as CUDA would.
    """
    if ds_version() >= (0, 19, 8):
        return
    import deepspeed.comm as dcomm

    for name in ("all_gather_into_tensor", "all_gather"):
        original = getattr(dcomm, name)
        if getattr(original, "_novograd_test_sync", False):
            continue

        def synchronous(*args, _original=original, **kwargs):
            handle = _original(*args, **kwargs)
            if kwargs.get("async_op") and handle is not None:
                handle.wait()
            return handle

        synchronous._novograd_test_sync = True
        setattr(dcomm, name, synchronous)


def ds_initialize(model, config, **kwargs):
    """``deepspeed.initialize``, working around DeepSpeed 0.18's ZeRO-1/2 flat buffer.

    DeepSpeed 0.18 builds ZeRO-1/2's flat bit16 buffer from the parameters without detaching it when it flattens on
    the accelerator (always, on CPU), so the buffer requires grad, and the all-gather into it after each step fails on
    gloo ("Output 0 of Split is a view and is being modified inplace"), for every optimizer. 0.19.0 detaches it;
    building the engine under ``torch.no_grad()`` gives the same buffer on 0.18. (BF16_Optimizer, which ZeRO-1 with
    bf16 and fp32 gradient accumulation gets, has no such buffer and is built as usual.)
    """
    stage = config.get("zero_optimization", {}).get("stage", 0)
    bf16_optimizer = stage == 1 and config.get("bf16", {}).get("enabled") and \
        config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    ctx = torch.no_grad() if (0, 18) <= ds_version()[:2] < (0, 19) and stage in (1, 2) and not bf16_optimizer \
        else contextlib.nullcontext()
    with ctx:
        return deepspeed.initialize(model=model, config=config, **kwargs)


# -- the model: odd sizes so layers straddle partitions; one frozen layer; two layers that sometimes get no gradient --
class GatedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(13, 13)
        self.frozen.requires_grad_(False)
        self.l1 = torch.nn.Linear(13, 11)
        self.late = torch.nn.Linear(11, 11)  # no gradient on the first LATE_OFF steps
        self.gap = torch.nn.Linear(11, 11)  # no gradient on the GAP_OFF steps in the middle
        self.l2 = torch.nn.Linear(11, 7)
        self.l3 = torch.nn.Linear(7, 3)

    def forward(self, x, late_on=True, gap_on=True):
        x = torch.tanh(self.frozen(x))
        x = torch.tanh(self.l1(x))
        if late_on:
            x = x + torch.tanh(self.late(x))
        if gap_on:
            x = x + torch.tanh(self.gap(x))
        x = torch.tanh(self.l2(x))
        return self.l3(x)


def make_model():
    torch.manual_seed(4321)
    return GatedNet()


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [{"params": decay, "weight_decay": OPT_PARAMS["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]


ALWAYS = dict(late_on=True, gap_on=True)
LATE_OFF, GAP_OFF = (0, 1, 2), (2, 3)


def gates(step, schedule):
    """``always``; ``late``: `late` has no gradient on LATE_OFF; ``gap``: `gap` none on GAP_OFF; ``both``."""
    return dict(late_on=schedule not in ("late", "both") or step not in LATE_OFF,
                gap_on=schedule not in ("gap", "both") or step not in GAP_OFF)


def reference(world_size, steps, gas, schedule="always", clip=1.0, dtype=torch.float32):
    """One process, plain NovoGrad (fp32 master weights; with bf16, a bf16 copy for forward/backward and each
    micro-batch's gradient accumulated in fp32), the same global batch and clipping as DeepSpeed."""
    from novograd_ds import NovoGrad

    master = make_model()
    opt = NovoGrad(param_groups(master), **LR_PARAMS)
    for step in range(steps):
        acc = {n: None for n, p in master.named_parameters() if p.requires_grad}
        lowp = master if dtype == torch.float32 else make_model().to(dtype)
        if lowp is not master:
            lowp.load_state_dict({k: v.to(dtype) for k, v in master.state_dict().items()})
        for r in range(world_size):
            for m in range(gas):
                lowp.zero_grad(set_to_none=True)
                x, y = batch(step, m, r, dtype)
                (loss_fn(lowp(x, **gates(step, schedule)), y) / gas).backward()
                for n, p in lowp.named_parameters():
                    if p.grad is not None:
                        g = p.grad.float() / world_size
                        acc[n] = g if acc[n] is None else acc[n] + g
        for n, p in master.named_parameters():
            if p.requires_grad:
                p.grad = acc[n]
        torch.nn.utils.clip_grad_norm_([p for p in master.parameters() if p.grad is not None], clip)
        opt.step()
    return ({n: p.detach().clone() for n, p in master.named_parameters()},
            {n: int(opt.state[p].get("step", 0)) for n, p in master.named_parameters() if p in opt.state})


def ds_config(world_size, gas, zero, extra=None):
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO * gas * world_size,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "NovoGrad", "params": dict(OPT_PARAMS)},
        "zero_optimization": dict(zero),
        "steps_per_print": 10_000,
        **(extra or {}),
    }


def run_engine(rank, world_size, cfg, *, steps, gas, schedule="always", dtype=torch.float32, zero_init=False):
    out = {}
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model()
        out["created_shapes"] = sorted({tuple(p.shape) for p in model.parameters()})
        out["ds_shapes_ok"] = all(tuple(p.ds_shape) == tuple(q.shape) for p, q in
                                  zip(model.parameters(), GatedNet().parameters()))
    else:
        model = make_model()
    engine, *_ = ds_initialize(model, cfg, model_parameters=param_groups(model))
    for step in range(steps):
        for m in range(gas):
            x, y = batch(step, m, rank, dtype)
            engine.backward(loss_fn(engine(x, **gates(step, schedule)), y))
            engine.step()
    out.update(describe(engine, rank))
    out["params"] = master_params(engine) if dtype != torch.float32 else full_params(engine)
    out["global_steps"] = engine.global_steps
    return out


def describe(engine, rank):
    """What the bound NovoGrad holds: its wrapper, per-flat step counts, and per layer how many elements are local."""
    opt = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    flat_steps, held = [], {}
    for lay in opt._layouts.values():
        st = opt.state.get(lay.tensor, {})
        flat_steps.append(int(st.get("step", 0)))
        for o, n, k in zip(lay.segments.offsets, lay.segments.lengths, lay.segments.layers):
            name = names[id(lay.layer_params[k])]
            held[name] = held.get(name, 0) + n
    plain_steps = {names[id(p)]: int(st.get("step", 0)) for p, st in opt.state.items() if id(p) in names}
    return {"wrapper": type(engine.optimizer).__name__, "bound": len(opt._layouts), "flat_steps": flat_steps,
            "plain_steps": plain_steps, "held": held, "numel": {n: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                                for n, p in engine.module.named_parameters()}}


# -- the cases -----------------------------------------------------------------------------------------------------------
BF16 = {"bf16": {"enabled": True}}
FP32_ACCUM = {"data_types": {"grad_accum_dtype": "fp32"}}
CASES = {
    # name: (zero_optimization, top-level additions, options)
    "z1": (dict(stage=1), {}, {}),
    "z2_reduce_scatter": (dict(stage=2, reduce_scatter=True, overlap_comm=False, contiguous_gradients=True), {}, {}),
    "z2_no_reduce_scatter": (dict(stage=2, reduce_scatter=False), {}, {}),
    "z2_overlap_contiguous": (dict(stage=2, overlap_comm=True, contiguous_gradients=True), {}, {}),
    "z2_not_contiguous": (dict(stage=2, reduce_scatter=True, overlap_comm=False, contiguous_gradients=False), {}, {}),
    "z2_round_robin": (dict(stage=2, round_robin_gradients=True), {}, {}),
    "z2_offload_pinned": (dict(stage=2, offload_optimizer={"device": "cpu", "pin_memory": True}), {}, {}),
    "z3": (dict(stage=3, sub_group_size=100), {}, {}),
    "z3_offload_pinned": (dict(stage=3, sub_group_size=100, offload_optimizer={"device": "cpu", "pin_memory": True}),
                          {}, {}),
    "z3_zero_init": (dict(stage=3, sub_group_size=100), {}, dict(zero_init=True)),
    "bf16_stage0": (dict(stage=0), BF16, dict(dtype=torch.bfloat16)),
    "bf16_z1_fp32_accum": (dict(stage=1), {**BF16, **FP32_ACCUM}, dict(dtype=torch.bfloat16)),
    "bf16_z2": (dict(stage=2), BF16, dict(dtype=torch.bfloat16)),
    "bf16_z3": (dict(stage=3, sub_group_size=100), BF16, dict(dtype=torch.bfloat16)),
}
# bf16 runs against the mixed-precision reference: with fp32 gradient accumulation (BF16_Optimizer) they agree to the
# order of the fp32 all-reduce; where DeepSpeed accumulates micro-batch gradients in bf16 (FP16_UnfusedOptimizer, ZeRO
# 2/3 bf16) only to bf16 rounding. A per-shard NovoGrad is off by more than 0.2 (test_zero.py).
BF16_RTOL = 5e-2


def plan(cases, gas):
    """[(name, gas to run, note)] for ``{name: (zero_optimization, top-level additions)}`` under this DeepSpeed
    release; cases it cannot run are printed with the reason and left out."""
    out = []
    for name, (zero, extra) in cases.items():
        bug = ds_bug(zero, extra, gas)
        if bug is None:
            out.append((name, gas, ""))
        elif bug[0] == "gas=1":
            out.append((name, 1, bug[1]))
        else:
            out.append((name, None, bug[1]))
    for name, g, note in out:
        if note:
            print(f"{name}: {'skipped' if g is None else f'gradient_accumulation_steps={g}'}: {note}")
    return [r for r in out if r[1] is not None]


def traps_worker(rank, world_size, runs):
    import novograd_ds  # noqa: F401  (registers NovoGrad)

    ds_cpu_workarounds()
    results = {}
    for name, gas, _ in runs:
        zero, extra, opts = CASES[name]
        opts = dict(opts)
        cfg = ds_config(world_size, gas, zero, extra)
        results[name] = run_engine(rank, world_size, cfg, steps=STEPS, gas=gas, **opts)
    return results


@pytest.mark.slow
@pytest.mark.deepspeed_matrix
def test_traps_equal_one_process():
    runs = plan({name: case[:2] for name, case in CASES.items()}, GAS)
    results = run_ranks(traps_worker, 2, runs)
    refs = {}
    failures = []
    for name, gas, _ in runs:
        zero, extra, opts = CASES[name]
        dtype = opts.get("dtype", torch.float32)
        if (gas, dtype) not in refs:
            refs[(gas, dtype)] = reference(2, STEPS, gas, dtype=dtype)
        ref, _ = refs[(gas, dtype)]
        r0, r1 = results[0][name], results[1][name]
        err = rel_err(r0["params"], ref)
        tol = RTOL if dtype == torch.float32 else BF16_RTOL
        print(f"{name}: {r0['wrapper']} bound flats {r0['bound']} flat steps {r0['flat_steps']} rel err {err:.3g}")
        if not err < tol:
            failures.append(f"{name}: rel err {err} >= {tol}")
        # ranks agree bit for bit
        for n, t in r0["params"].items():
            assert torch.equal(r1["params"][n], t), f"{name}: ranks disagree on {n}"
        # gradient accumulation: one NovoGrad step per optimizer step, never per micro-step
        assert r0["global_steps"] == STEPS, (name, r0["global_steps"])
        if r0["bound"]:
            assert r0["flat_steps"] and all(s == STEPS for s in r0["flat_steps"]), (name, r0["flat_steps"])
        else:
            assert r0["plain_steps"] and all(s == STEPS for s in r0["plain_steps"].values()), (name, r0["plain_steps"])
        # a sharded flat: some layer has elements on both ranks (crosses the partition boundary)
        if zero.get("stage", 0) >= 1 and r0["bound"] and r0["wrapper"] != "FP16_UnfusedOptimizer":
            crossing = [n for n in r0["held"] if 0 < r0["held"][n] < r0["numel"][n] and r1["held"].get(n, 0) > 0]
            assert crossing, f"{name}: no layer crosses a partition boundary: {r0['held']} / {r1['held']}"
        if opts.get("zero_init"):
            assert r0["created_shapes"] == [(0,)], f"{name}: zero.Init made {r0['created_shapes']}, expected (0,)"
            assert r0["ds_shapes_ok"], f"{name}: ds_shape does not match the model's shapes"
    assert not failures, failures


# -- a layer without a gradient ------------------------------------------------------------------------------------------
NOGRAD_STEPS = 6
NOGRAD_CASES = {
    "z0": dict(stage=0),
    "z1": dict(stage=1),
    "z2": dict(stage=2),
    "z2_offload": dict(stage=2, offload_optimizer={"device": "cpu"}),
    "z3": dict(stage=3, sub_group_size=100),
}
# DeepSpeed bug (not NovoGrad's; DeepSpeed 0.19.8 and earlier): under ZeRO-2 with CPU offload and under ZeRO-3, a
# parameter that gets no gradient in an optimizer step is handed the gradient of the last step in which it had one
# (its slice of the gradient accumulation buffer is never cleared). Measured with torch SGD too (gap.weight 3.4e-3 off,
# against 0 for ZeRO-1/2). A layer without a gradient on its FIRST steps is unaffected (the buffers start at zero).
STALE_GRADIENT_BUG = ("z2_offload", "z3")
# Stage 0 fp32 (no wrapper: NovoGrad steps the model's own tensors, the plain path): DeepSpeed replaces a missing
# gradient with zeros before its all-reduce (so every rank joins it). Binding tells NovoGrad so
# (NovoGrad.skip_zero_gradients), and the plain path then skips an exactly-zero layer as the flats do.


def nograd_worker(rank, world_size, runs):
    import novograd_ds  # noqa: F401

    ds_cpu_workarounds()
    out = {}
    for name, gas, schedule in runs:
        cfg = ds_config(world_size, gas, NOGRAD_CASES[name])
        out[(name, schedule)] = run_engine(rank, world_size, cfg, steps=NOGRAD_STEPS, gas=gas, schedule=schedule)
    return out


def nograd_errors(names, schedule):
    """Run ``names`` under ``schedule`` at world size 2; ``{name: (worst rel err, worst layer, note)}``."""
    planned = plan({n: (NOGRAD_CASES[n], {}) for n in names}, GAS)
    runs = [(name, gas, schedule) for name, gas, _ in planned]
    notes = {name: note for name, _, note in planned}
    results = run_ranks(nograd_worker, 2, runs)
    refs, out = {}, {}
    for name, gas, _ in runs:
        if gas not in refs:
            refs[gas] = reference(2, NOGRAD_STEPS, gas, schedule=schedule)
            steps = refs[gas][1]
            assert steps["late.weight"] == NOGRAD_STEPS - (len(LATE_OFF) if schedule in ("late", "both") else 0)
            assert steps["gap.weight"] == NOGRAD_STEPS - (len(GAP_OFF) if schedule in ("gap", "both") else 0)
        ref = refs[gas][0]
        r0, r1 = results[0][(name, schedule)], results[1][(name, schedule)]
        for n, t in r0["params"].items():
            assert torch.equal(r1["params"][n], t), f"{name}: ranks disagree on {n}"
        errs = {n: float((r0["params"][n] - ref[n]).norm() / ref[n].norm()) for n in ref}
        worst = max(errs, key=errs.get)
        print(f"{schedule} {name}{' (' + notes[name] + ')' if notes[name] else ''}: {r0['wrapper']} rel err "
              f"{errs[worst]:.3g} (worst: {worst}); late {errs['late.weight']:.3g}, gap {errs['gap.weight']:.3g}")
        out[name] = (errs[worst], worst)
    return out


@pytest.mark.slow
@pytest.mark.deepspeed_matrix
def test_layer_without_gradient_equals_one_process():
    """`late` gets no gradient on its first 3 steps (and, on ZeRO-1/2, `gap` none on steps 2-3 as well): under ZeRO
    1/2/3 DeepSpeed hands zeros for them inside the flats, and NovoGrad must do what one process does with
    ``grad is None``: no step for that layer (NOTE: [no gradient, no step] in optimizer.py)."""
    errs = nograd_errors(list(NOGRAD_CASES), "late")
    errs.update({f"{n} (and gap)": e for n, e in nograd_errors([n for n in NOGRAD_CASES if n not in
                                                                STALE_GRADIENT_BUG], "both").items()})
    bad = {n: e for n, e in errs.items() if not e[0] < RTOL}
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="DeepSpeed hands a parameter without a gradient its previous step's gradient "
                   "under ZeRO-2 offload and ZeRO-3 (every optimizer; see STALE_GRADIENT_BUG). When this passes, "
                   "DeepSpeed fixed it: move these cases into test_layer_without_gradient_equals_one_process.")
def test_layer_dropping_out_midway_under_offload_and_zero3():
    errs = nograd_errors(list(STALE_GRADIENT_BUG), "gap")
    bad = {n: e for n, e in errs.items() if not e[0] < RTOL}
    assert not bad, bad


# -- what cannot be made correct is refused at start-up, naming the config key; the name in any letter case ----------
def refusal_worker(rank, world_size):
    import warnings

    import novograd_ds
    from novograd_ds.integrations.deepspeed import UnsupportedDeepSpeedConfig, UnsupportedDeepSpeedVersion

    ds_cpu_workarounds()
    out = {"names": {}, "refused": {}}
    for name in ("novograd", "NOVOGRAD", "NovoGrad"):
        cfg = ds_config(world_size, 1, dict(stage=2))
        cfg["optimizer"]["type"] = name
        r = run_engine(rank, world_size, cfg, steps=1, gas=1)
        out["names"][name] = (r["wrapper"], r["bound"], r["flat_steps"])

    def refused(cfg):
        model = make_model()
        try:
            ds_initialize(model, cfg, model_parameters=param_groups(model))
        except (UnsupportedDeepSpeedConfig, UnsupportedDeepSpeedVersion) as err:
            return f"{type(err).__name__}: {err}"
        return None

    out["refused"]["elastic_checkpoint"] = refused(ds_config(world_size, 1, dict(stage=2, elastic_checkpoint=True)))
    # outside the tested range: the config path and a client instance are refused at initialize, naming the fix
    real = deepspeed.__version__
    deepspeed.__version__ = "0.99.0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["outside_registered"] = novograd_ds.register()
    out["refused"]["version (config)"] = refused(ds_config(world_size, 1, dict(stage=2)))
    model = make_model()
    client = novograd_ds.NovoGrad(param_groups(model), **LR_PARAMS)
    cfg = {k: v for k, v in ds_config(world_size, 1, dict(stage=2)).items() if k != "optimizer"}
    cfg["zero_allow_untested_optimizer"] = True
    try:
        ds_initialize(model, cfg, optimizer=client)
        out["refused"]["version (client)"] = None
    except UnsupportedDeepSpeedVersion as err:
        out["refused"]["version (client)"] = f"{type(err).__name__}: {err}"
    deepspeed.__version__ = real
    out["registered_again"] = novograd_ds.register()
    # torch_autocast (DeepSpeed 0.17 on): last, since DeepSpeed keeps its autocast settings in module globals
    from deepspeed.runtime.engine import DeepSpeedEngine

    out["has_torch_autocast"] = hasattr(DeepSpeedEngine, "torch_autocast_enabled")
    if out["has_torch_autocast"]:
        out["refused"]["torch_autocast"] = refused(ds_config(world_size, 1, dict(stage=2), {
            "torch_autocast": {"enabled": True, "dtype": "fp16"}}))
    return out


@pytest.mark.slow
@pytest.mark.deepspeed_matrix
def test_refusals_and_name_any_case():
    r = run_ranks(refusal_worker, 2)[0]
    for name, (wrapper, bound, steps) in r["names"].items():
        print(f'"type": "{name}" ->', wrapper, "bound flats", bound, "steps", steps)
        assert wrapper == "DeepSpeedZeroOptimizer" and bound > 0 and steps and all(s == 1 for s in steps), name
    for key, msg in r["refused"].items():
        print(key, "->", msg)
        assert msg is not None, f"{key}: not refused"
    assert "zero_optimization.elastic_checkpoint=true" in r["refused"]["elastic_checkpoint"]
    assert "UnsupportedDeepSpeedConfig" in r["refused"]["elastic_checkpoint"]
    for key in ("version (config)", "version (client)"):
        msg = r["refused"][key]
        assert "UnsupportedDeepSpeedVersion" in msg and "DeepSpeed 0.99.0 is outside the range" in msg, msg
        assert 'pip install "deepspeed>=0.16,<0.20"' in msg and "NOVOGRAD_DS_ALLOW_UNVERIFIED_DEEPSPEED=1" in msg, msg
    assert r["outside_registered"] is False and r["registered_again"] is True
    if r["has_torch_autocast"]:
        msg = r["refused"]["torch_autocast"]
        assert "UnsupportedDeepSpeedConfig" in msg and "torch_autocast" in msg and "fp16" in msg, msg
