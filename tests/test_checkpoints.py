"""NovoGrad's checkpoints: the compact on-disk form, loading old expanded checkpoints, universal conversion."""

from __future__ import annotations

import torch

# -- the model and run of the old-format fixture (tests/data/expanded_zero2, made by tests/data/make_expanded_zero2.py)
FIX_GLOBAL, FIX_GAS = 8, 2
FIX_OPT = {"lr": 0.05, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01, "foreach": True}


class FixtureNet(torch.nn.Module):
    """Odd sizes so that tensors straddle partition boundaries; one frozen layer; two param groups."""

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


def fixture_groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [{"params": decay, "weight_decay": FIX_OPT["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]


def fixture_config(world_size, stage=2, **zero_extra):
    return {
        "train_micro_batch_size_per_gpu": FIX_GLOBAL // (world_size * FIX_GAS),
        "gradient_accumulation_steps": FIX_GAS,
        "train_batch_size": FIX_GLOBAL,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "NovoGrad", "params": dict(FIX_OPT)},
        "zero_optimization": {"stage": stage, **zero_extra},
        "steps_per_print": 10_000,
    }


def fixture_engine(deepspeed, cfg):
    torch.manual_seed(1234)
    model = FixtureNet()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=fixture_groups(model), config=cfg)
    return engine


def fixture_steps(engine, rank, world_size, steps):
    for step in steps:
        g = torch.Generator().manual_seed(4321 + step)
        x, y = torch.randn(FIX_GLOBAL, 13, generator=g), torch.randn(FIX_GLOBAL, 3, generator=g)
        mb = FIX_GLOBAL // (world_size * FIX_GAS)
        for m in range(FIX_GAS):
            lo = (rank * FIX_GAS + m) * mb
            loss = torch.nn.functional.mse_loss(engine(x[lo:lo + mb]), y[lo:lo + mb])
            engine.backward(loss)
            engine.step()


def fixture_params(engine):
    import deepspeed

    out = {}
    for n, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.detach().float().clone()
        else:
            out[n] = p.detach().float().clone()
    return out


# -- the core, one process: bound flats without an engine (no reductions, so no collectives) ---------------------------
import copy  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from novograd_ds import NovoGrad  # noqa: E402
from novograd_ds.checkpoint import COMPACT, CheckpointError, expand_fragment, segment_index  # noqa: E402
from novograd_ds.kernels import SegmentTable  # noqa: E402
from novograd_ds.sharding import FlatLayout, expand_layer_values  # noqa: E402

# two flats, as a ZeRO wrapper hands them over: segments of several layers, alignment gaps and padding in none
FLATS = {"a": (24, [(0, 5, 0), (5, 7, 1), (14, 6, 2)], 3), "b": (10, [(0, 4, 0), (4, 5, 1)], 2)}


def make_flats():
    gen = torch.Generator().manual_seed(5)
    flats, layouts = [], {}
    for name, (numel, segs, n_layers) in FLATS.items():
        t = torch.randn(numel, generator=gen)
        table = SegmentTable(*zip(*segs))
        flats.append(t)
        layouts[id(t)] = FlatLayout(table, n_layers, numel, (), label=f"flat {name}", tensor=t)
    return flats, layouts


def flat_grads(flats, step):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for t, (numel, segs, _) in zip(flats, FLATS.values()):
        g = torch.randn(numel, generator=gen)
        if step == 2:  # layer 1 of flat a has no gradient on step 2 (a layer with no gradient takes no step)
            o, n, _ = segs[1]
            g[o:o + n] = 0
        out.append(g)
    return out


def step_flats(opt, flats, steps):
    for step in steps:
        for t, g in zip(flats, flat_grads(flats, step)):
            t.grad = g
        opt.step()


def new_flat_opt(flats, layouts, **kw):
    opt = NovoGrad([{"params": [flats[0]]}, {"params": [flats[1]], "weight_decay": 0.0}], lr=0.05,
                   weight_decay=0.01, foreach=True, **kw)
    opt.bind_layouts({id(t): FlatLayout(lay.segments, lay.n_layers, lay.numel, (), lay.label, t)
                      for t, lay in zip(flats, layouts.values())})
    return opt


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def storages(opt):
    return {t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}


def new_tensor_bytes(obj, live):
    """Bytes of the tensors in ``obj`` that share no storage with ``live`` (what building ``obj`` allocated)."""
    if torch.is_tensor(obj):
        return 0 if obj.untyped_storage().data_ptr() in live else obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(new_tensor_bytes(v, live) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(new_tensor_bytes(v, live) for v in obj)
    return 0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_state_dict_is_compact_and_resumes_exactly(amsgrad):
    flats, layouts = make_flats()
    opt = new_flat_opt(flats, layouts, amsgrad=amsgrad)
    step_flats(opt, flats, range(1, 4))
    sd = opt.state_dict()
    for i, (numel, segs, n_layers) in enumerate(FLATS.values()):
        st = sd["state"][i]
        assert set(st) == {"step", "exp_avg", COMPACT} and st["step"] == 3
        assert st["exp_avg"] is opt.state[flats[i]]["exp_avg"]  # the live tensor, not a copy
        c = st[COMPACT]
        assert c["format"] == 1 and c["numel"] == numel and c["segments"].tolist() == [list(x) for x in zip(*segs)]
        keys = {"exp_avg_sq_layer", "max_exp_avg_sq_layer"} if amsgrad else {"exp_avg_sq_layer"}
        assert keys <= set(c) and all(c[k].shape == (n_layers,) and c[k].dtype == torch.float32 for k in keys)
    state_bytes = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    extra = new_tensor_bytes(sd, storages(opt))
    print(f"state_dict() allocated {extra} bytes; the optimizer state is {state_bytes} bytes")
    assert extra == sum(24 * len(segs) for _, segs, _ in FLATS.values())  # the [3, S] int64 indexes, nothing else

    saved = roundtrip(sd)
    resumed = [t.detach().clone() for t in flats]  # the weights at the save
    step_flats(opt, flats, range(4, 7))  # the uninterrupted run
    opt2 = new_flat_opt(resumed, layouts, amsgrad=amsgrad)
    opt2.param_groups[0]["lr"] = 123.0  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    assert opt2.state[resumed[0]]["exp_avg_sq_layer"].swappable is False
    step_flats(opt2, resumed, range(4, 7))
    for a, b in zip(flats, resumed):
        assert torch.equal(a, b)
    for a, b in zip(flats, resumed):
        for k, v in opt.state[a].items():
            assert (torch.equal(v, opt2.state[b][k]) if torch.is_tensor(v) else v == opt2.state[b][k]), k


def expanded_form(sd):
    """The state dict NovoGrad wrote up to 997ee90: per-element exp_avg_sq (each element its layer's v, else 0)."""
    sd = copy.deepcopy(sd)
    for st in sd["state"].values():
        c = st.pop(COMPACT)
        table = SegmentTable(*c["segments"].tolist())
        st["exp_avg_sq"] = expand_layer_values(c["exp_avg_sq_layer"], table, c["numel"])
        if "max_exp_avg_sq_layer" in c:
            st["max_exp_avg_sq"] = expand_layer_values(c["max_exp_avg_sq_layer"], table, c["numel"])
    return sd


def test_expanded_form_of_earlier_versions_still_loads_exactly():
    flats, layouts = make_flats()
    opt = new_flat_opt(flats, layouts, amsgrad=True)
    step_flats(opt, flats, range(1, 4))
    old = roundtrip(expanded_form(opt.state_dict()))
    weights = [t.detach().clone() for t in flats]
    step_flats(opt, flats, range(4, 7))
    opt2 = new_flat_opt(weights, layouts, amsgrad=True)
    opt2.load_state_dict(old)
    step_flats(opt2, weights, range(4, 7))
    for a, b in zip(flats, weights):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq_layer"], opt2.state[b]["exp_avg_sq_layer"])
        assert torch.equal(opt.state[a]["max_exp_avg_sq_layer"], opt2.state[b]["max_exp_avg_sq_layer"])
        assert "exp_avg_sq" not in opt2.state[b]  # folded and dropped on the first step


def _load_error(sd, flats=None, layouts=None, opt=None):
    if opt is None:
        flats, layouts = make_flats() if flats is None else (flats, layouts)
        opt = new_flat_opt(flats, layouts)
    with pytest.raises(CheckpointError) as err:
        opt.load_state_dict(sd)
    return str(err.value)


def test_incomplete_checkpoints_raise_and_name_what_is_missing():
    flats, layouts = make_flats()
    opt = new_flat_opt(flats, layouts)
    step_flats(opt, flats, range(1, 3))
    good = opt.state_dict()

    sd = copy.deepcopy(good)
    del sd["state"][1]["step"]
    msg = _load_error(sd)
    assert "state entry 1 (param group 1, position 0)" in msg and "no step" in msg and "flat b" in msg

    sd = copy.deepcopy(good)
    del sd["state"][0][COMPACT]
    msg = _load_error(sd)
    assert "no exp_avg_sq" in msg and "state entry 0" in msg

    sd = copy.deepcopy(good)
    del sd["state"][0]["exp_avg"]
    assert "no exp_avg" in _load_error(sd)

    sd = copy.deepcopy(good)
    del sd["state"][1]
    assert "state entry 1" in _load_error(sd) and "moments are missing" in _load_error(sd)

    sd = copy.deepcopy(good)
    sd["state"][0][COMPACT]["format"] = 99
    assert "format 99" in _load_error(sd)

    sd = copy.deepcopy(good)  # written for another partitioning
    sd["state"][0][COMPACT]["segments"] = segment_index(SegmentTable([0, 5], [5, 9], [0, 1]))
    assert "python -m novograd_ds.universal" in _load_error(sd)

    sd = copy.deepcopy(expanded_form(good))  # an expanded entry of the wrong length
    sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"][:-1]
    assert "another partitioning" in _load_error(sd)

    # a flat partition's compact state into a plain NovoGrad (not bound to any engine)
    plain = NovoGrad([{"params": [torch.zeros(24)]}, {"params": [torch.zeros(10)]}])
    assert "engine.load_checkpoint" in _load_error(copy.deepcopy(good), opt=plain)

    # another optimizer's checkpoint: Adam's per-element exp_avg_sq on plain parameters
    w = torch.nn.Parameter(torch.randn(4, 3))
    adam = torch.optim.Adam([w])
    w.grad = torch.ones_like(w)
    adam.step()
    assert "Adam" in _load_error(adam.state_dict(), opt=NovoGrad([torch.nn.Parameter(torch.randn(4, 3))]))

    # state put in place by an engine (a universal load) without its second moment: the step refuses
    flats, layouts = make_flats()
    opt = new_flat_opt(flats, layouts)
    for t in flats:
        opt.state[t].update(step=2, exp_avg=torch.zeros_like(t))
        t.grad = torch.ones_like(t)
    with pytest.raises(CheckpointError, match="flat a: the loaded optimizer state has no exp_avg_sq"):
        opt.step()


def test_expand_fragment_equals_the_narrowed_expansion():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        numel = int(torch.randint(1, 60, (), generator=gen))
        cuts = sorted(set(torch.randint(0, numel + 1, (6,), generator=gen).tolist()) | {0, numel})
        offs, lens, lays = [], [], []
        for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
            if hi > lo and k % 3 != 2:  # every third piece is a gap
                offs.append(lo)
                lens.append(hi - lo)
                lays.append(k % 4)
        table = SegmentTable(offs, lens, lays)
        values = torch.rand(4, generator=gen)
        full = expand_layer_values(values, table, numel)
        index = segment_index(table)
        for start in range(numel + 1):
            for length in range(numel - start + 1):
                assert torch.equal(expand_fragment(values, index, start, length), full.narrow(0, start, length))
