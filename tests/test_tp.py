"""Megatron-style tensor parallelism (issue 6): NovoGrad's per-layer norms of TP-split weights are summed over the
tensor-parallel group, so a TP=2 run (alone, or x DP=2 under ZeRO-1/2/3) gives the parameters of the TP=1 run; the
same run without the TP reduction does not.

The Transformer block is split by hand, Megatron-style: q/k/v and the first MLP layer are column-parallel (output
dim split, ``partition_dim=0``), the attention output and the second MLP layer row-parallel (input dim split,
``partition_dim=1``, output all-reduced, bias replicated), the layer norms replicated. ``MPU`` is the minimal
``mpu`` DeepSpeed reads. One process launch (4 ranks) runs every hand-split configuration: ranks {0,1} and {2,3}
are the TP groups; DP groups are {0,2},{1,3} (TP=2 x DP=2), or singletons (TP=2, DP=1: two identical replicas).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_ranks

deepspeed = pytest.importorskip("deepspeed")

H, HEADS, FFN, SEQ, MICRO = 8, 2, 16, 3, 2
STEPS, LR, WD = 6, 0.05, 0.01
BETAS = (0.9, 0.98)
RTOL = 1e-5
SPLIT = {"wq": 0, "bq": 0, "wk": 0, "wv": 0, "bv": 0, "wo": 1, "w1": 0, "b1": 0, "w2": 1}  # partition_dim
NAMES = ["ln1.weight", "ln1.bias", "wq", "bq", "wk", "wv", "bv", "wo", "bo",
         "ln2.weight", "ln2.bias", "w1", "b1", "w2", "b2"]


# -- quick, in-process ----------------------------------------------------------------------------------------------
def test_tp_layer_mask_follows_megatron_attributes():
    from novograd_ds.integrations.megatron import tp_layer_mask

    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    ps[1].tensor_model_parallel = True
    ps[2].model_parallel = True          # the older Megatron / DeepSpeed spelling
    ps[3].tensor_model_parallel = False  # Megatron sets it to False on replicated tensors
    assert tp_layer_mask(ps).tolist() == [False, True, True, False]
    assert tp_layer_mask([ps[0], ps[3]]) is None  # nothing split: no collective at all


def test_set_tensor_parallel_group_errors_name_the_fix():
    from novograd_ds import NovoGrad, set_tensor_parallel_group

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="basic_optimizer"):
        set_tensor_parallel_group(torch.optim.SGD([p], lr=0.1), None)
    opt = NovoGrad([p])
    with pytest.raises(ValueError, match="not both"):
        set_tensor_parallel_group(opt, object(), mpu=object())
    with pytest.raises(TypeError, match="set_tensor_parallel_group"):
        set_tensor_parallel_group(opt, mpu=object())  # no get_*_parallel_group method

    class NoTP:  # an mpu without tensor parallelism
        def get_tensor_model_parallel_group(self):
            return None

    set_tensor_parallel_group(opt, mpu=NoTP())
    p.grad = torch.ones(2)
    opt.step()  # no TP group: the plain step, no collective
    assert float(opt.state[p]["exp_avg_sq"]) == 2.0


# -- Megatron's f and g operators -----------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def full_weights():
    g = torch.Generator().manual_seed(7)
    w = {}
    for name in NAMES:
        if name.startswith("ln"):
            shape = (H,)
            base = torch.ones(H) if name.endswith("weight") else torch.zeros(H)
            w[name] = base + 0.1 * torch.randn(shape, generator=g)
            continue
        shape = {"wq": (H, H), "wk": (H, H), "wv": (H, H), "wo": (H, H), "w1": (FFN, H), "w2": (H, FFN),
                 "bq": (H,), "bv": (H,), "bo": (H,), "b1": (FFN,), "b2": (H,)}[name]
        w[name] = torch.randn(shape, generator=g) / (shape[-1] ** 0.5)
    return w


def shard(name, t, tp, rank):
    dim = SPLIT.get(name)
    return t if dim is None or tp == 1 else t.chunk(tp, dim=dim)[rank].clone()


class Block(torch.nn.Module):
    """Pre-LN Transformer block (attention + MLP); ``tp > 1`` holds this TP rank's shards.

    No key bias: softmax is invariant to it, so its gradient is rounding noise, which NovoGrad's per-layer
    normalisation would blow up to a unit-size, run-dependent step.
    """

    def __init__(self, tp=1, tp_rank=0, group=None):
        super().__init__()
        self.tp, self.group = tp, group
        self.ln1 = torch.nn.LayerNorm(H)
        self.ln2 = torch.nn.LayerNorm(H)
        full = full_weights()
        with torch.no_grad():
            for name in NAMES:
                if name.startswith("ln"):
                    mod, attr = name.split(".")
                    getattr(getattr(self, mod), attr).copy_(full[name])
                else:
                    p = torch.nn.Parameter(shard(name, full[name], tp, tp_rank))
                    if name in SPLIT:  # Megatron's marking (set at every TP degree, as Megatron does)
                        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, SPLIT[name], 1
                    self.register_parameter(name, p)

    def _f(self, x):
        return _CopyToTP.apply(x, self.group) if self.tp > 1 else x

    def _g(self, x):
        return _ReduceFromTP.apply(x, self.group) if self.tp > 1 else x

    def forward(self, x):
        b, s, _ = x.shape
        heads = HEADS // self.tp
        h = self._f(self.ln1(x))
        q, k, v = (F.linear(h, w, bias).view(b, s, heads, -1).transpose(1, 2)
                   for w, bias in ((self.wq, self.bq), (self.wk, None), (self.wv, self.bv)))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        x = x + self._g(F.linear(a, self.wo)) + self.bo
        h = self._f(self.ln2(x))
        return x + self._g(F.linear(F.gelu(F.linear(h, self.w1, self.b1)), self.w2)) + self.b2


def batch(step, dp_rank):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(MICRO, SEQ, H, generator=g), torch.randn(MICRO, SEQ, H, generator=g)


def reference(dp):
    """TP=1, one process: the global batch of ``dp`` replicas, plain NovoGrad."""
    from novograd_ds import NovoGrad

    model = Block()
    opt = NovoGrad(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    for step in range(STEPS):
        opt.zero_grad()
        for r in range(dp):
            x, y = batch(step, r)
            (F.mse_loss(model(x), y) / dp).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class MPU:
    """The ``mpu`` interface DeepSpeed reads (Megatron's names), for TP x DP with no pipeline."""

    def __init__(self, tp_group, dp_group):
        self.tp_group, self.dp_group = tp_group, dp_group

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.tp_group)

    def get_tensor_model_parallel_rank(self):
        return torch.distributed.get_rank(group=self.tp_group)

    def get_tensor_model_parallel_src_rank(self):
        return torch.distributed.get_process_group_ranks(self.tp_group)[0]

    # no pipeline: the model-parallel group is the tensor-parallel group
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self.dp_group)

    def get_data_parallel_rank(self):
        return torch.distributed.get_rank(group=self.dp_group)

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def make_groups(rank, world_size, tp):
    """Every rank creates every group, in the same order. TP groups: consecutive ranks."""
    dist = torch.distributed
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world_size, tp)]
    dp_groups = [dist.new_group(list(range(t, world_size, tp))) for t in range(tp)]  # TP=2 x DP=world/2
    single = [dist.new_group([r]) for r in range(world_size)]                      # DP=1 replicas
    return tp_groups[rank // tp], dp_groups[rank % tp], single[rank]


def gather_full(model, tp_group, tp):
    """The full (TP=1) tensors from this TP group's shards."""
    out = {}
    for n, p in model.named_parameters():
        t = p.detach().float().clone()
        if n in SPLIT and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            torch.distributed.all_gather(parts, t, group=tp_group)
            t = torch.cat(parts, dim=SPLIT[n])
        out[n] = t
    return out


def rel_err(params, ref):
    return max(float((params[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


def ds_config(stage, dp, *, with_optimizer):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * dp,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the TP=1 reference does not clip
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }
    if stage == 3:
        cfg["zero_optimization"]["sub_group_size"] = 150
    if with_optimizer:
        cfg["optimizer"] = {"type": "NovoGrad", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WD}}
    return cfg


def train_ds(mpu, stage, *, client, tp_off=False):
    """One DeepSpeed engine: the config path (``"type": "NovoGrad"``) or the client-instance path; ``mpu=``."""
    import novograd_ds
    from novograd_ds import NovoGrad

    tp = mpu.get_tensor_model_parallel_world_size()
    dp = mpu.get_data_parallel_world_size()
    model = Block(tp, mpu.get_tensor_model_parallel_rank(), mpu.tp_group)
    kwargs = {"model_parameters": model.parameters()}
    if client:
        kwargs = {"optimizer": NovoGrad(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config(stage, dp, with_optimizer=not client),
                                           mpu=mpu, **kwargs)
    if tp_off:  # the same run without the TP reduction (explicit None wins over engine.mpu)
        novograd_ds.set_tensor_parallel_group(engine.basic_optimizer, None)
    for step in range(STEPS):
        x, y = batch(step, mpu.get_data_parallel_rank())
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = gather_full(engine.module, mpu.tp_group, tp)
    else:
        params = gather_full(engine.module, mpu.tp_group, tp)
    info = {"wrapper": type(engine.optimizer).__name__,
            "tp_layouts": sum(any(r.label == "tensor parallel" for r in engine.basic_optimizer.layer_reductions(lay.tensor))
                              for lay in engine.basic_optimizer._layouts.values())}
    return params, info


def train_plain(mpu, *, tp_off=False):
    """No DeepSpeed engine: NovoGrad on the TP shards, gradients averaged over DP by hand."""
    import novograd_ds
    from novograd_ds import NovoGrad

    tp, dp = mpu.get_tensor_model_parallel_world_size(), mpu.get_data_parallel_world_size()
    model = Block(tp, mpu.get_tensor_model_parallel_rank(), mpu.tp_group)
    opt = NovoGrad(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    if not tp_off:
        novograd_ds.set_tensor_parallel_group(opt, mpu=mpu)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(step, mpu.get_data_parallel_rank())
        F.mse_loss(model(x), y).backward()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=mpu.dp_group)
            p.grad /= dp
        opt.step()
    return gather_full(model, mpu.tp_group, 2), {"wrapper": "none"}


# name -> (dp, how). dp=2: TP=2 x DP=2 over 4 ranks; dp=1: two TP=2 replicas.
CONFIGS = {
    "tp2_plain": (1, dict(plain=True)),
    "tp2_plain_noTP": (1, dict(plain=True, tp_off=True)),
    "tp2_z0_config": (1, dict(stage=0, client=False)),
    "tp2_z1_client": (1, dict(stage=1, client=True)),
    "tp2dp2_z1_client": (2, dict(stage=1, client=True)),
    "tp2dp2_z2_config": (2, dict(stage=2, client=False)),
    "tp2dp2_z3_config": (2, dict(stage=3, client=False)),
    "tp2dp2_z2_noTP": (2, dict(stage=2, client=False, tp_off=True)),
}


def tp_worker(rank, world_size, names):
    import novograd_ds  # noqa: F401  (registers NovoGrad)

    tp_group, dp_group, single = make_groups(rank, world_size, 2)
    refs = {1: reference(1), 2: reference(2)}
    results = {}
    for name in names:
        dp, how = CONFIGS[name]
        how = dict(how)
        mpu = MPU(tp_group, dp_group if dp == 2 else single)
        if how.pop("plain", False):
            params, info = train_plain(mpu, **how)
        else:
            params, info = train_ds(mpu, **how)
        results[name] = dict(info, err=rel_err(params, refs[dp]), params=params)

    # the ZeRO-3 exception: a partition group that spans the TP ranks gets no TP reduction
    from novograd_ds import NovoGrad, set_tensor_parallel_group
    from novograd_ds.kernels import SegmentTable
    from novograd_ds.sharding import FlatLayout, LayerReduction

    marked = torch.nn.Parameter(torch.zeros(2))
    marked.tensor_model_parallel = True
    flat_a, flat_b = torch.zeros(2), torch.zeros(2)
    world = torch.distributed.group.WORLD
    spans = FlatLayout(SegmentTable([0], [2], [0]), 1, 2, (LayerReduction(world),), tensor=flat_a, layer_params=[marked])
    narrow = FlatLayout(SegmentTable([0], [2], [0]), 1, 2, (LayerReduction(dp_group),), tensor=flat_b,
                        layer_params=[marked])
    opt = NovoGrad([marked])
    opt.bind_layouts({id(flat_a): spans, id(flat_b): narrow})
    set_tensor_parallel_group(opt, tp_group)
    tp_of = [[r.group for r in opt.layer_reductions(t) if r.label == "tensor parallel"] for t in (flat_a, flat_b)]
    results["spans"] = (tp_of[0] == [], len(tp_of[1]) == 1 and tp_of[1][0] is tp_group)
    return results


@pytest.mark.slow
def test_tensor_parallel_equals_tp1():
    names = list(CONFIGS)
    results = run_ranks(tp_worker, 4, names)
    for name in names:
        errs = [r[name]["err"] for r in results]
        print(f"{name:20s} {results[0][name]['wrapper']:28s} tp-layouts {results[0][name].get('tp_layouts', '-')}"
              f"  rel err vs TP=1: {max(errs):.3e}")
    for name in names:
        errs = [r[name]["err"] for r in results]
        if name.endswith("noTP"):
            assert min(errs) > 1e-3, f"{name}: without the TP reduction the result should differ from TP=1 ({errs})"
        else:
            assert max(errs) < RTOL, f"{name}: rel err {errs} vs the TP=1 run"
            for r in results[1:]:  # every rank gathered the same full parameters
                for n, t in results[0][name]["params"].items():
                    assert torch.allclose(r[name]["params"][n], t, rtol=0, atol=1e-7), (name, n)
        if "_z" in name and not name.endswith("noTP") and "_z0" not in name:
            assert results[0][name]["tp_layouts"] > 0, f"{name}: no layout got the TP group"
    assert all(r["spans"] == (True, True) for r in results), [r["spans"] for r in results]


# -- real megatron-core layers ---------------------------------------------------------------------------------------
HAS_MCORE = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


class MegatronMPU:
    """megatron.core.parallel_state as DeepSpeed's ``mpu``: it lacks get_model_parallel_rank/world_size, which
    DeepSpeed reads (checkpoint naming); Megatron-DeepSpeed's own mpu has them."""

    def __init__(self, ps):
        self._ps = ps

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(group=self._ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size(group=self._ps.get_model_parallel_group())


def mcore_full_weights():
    g = torch.Generator().manual_seed(11)
    return {"ln.weight": 1 + 0.1 * torch.randn(H, generator=g), "ln.bias": 0.1 * torch.randn(H, generator=g),
            "fc1.weight": torch.randn(FFN, H, generator=g) / H ** 0.5, "fc1.bias": 0.1 * torch.randn(FFN, generator=g),
            "fc2.weight": torch.randn(H, FFN, generator=g) / FFN ** 0.5, "fc2.bias": 0.1 * torch.randn(H, generator=g)}


MCORE_SPLIT = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}


class MCoreMLP(torch.nn.Module):
    """LayerNorm (replicated) -> ColumnParallelLinear -> gelu -> RowParallelLinear, residual; TP=1 if ``ps`` None."""

    def __init__(self, ps=None):
        super().__init__()
        self.ln = torch.nn.LayerNorm(H)
        tp, rank = 1, 0
        if ps is None:
            self.fc1, self.fc2 = torch.nn.Linear(H, FFN), torch.nn.Linear(FFN, H)
        else:
            from megatron.core.model_parallel_config import ModelParallelConfig
            from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                      params_dtype=torch.float32)
            init = torch.nn.init.zeros_
            self.fc1 = ColumnParallelLinear(H, FFN, config=cfg, init_method=init, bias=True, gather_output=False)
            self.fc2 = RowParallelLinear(FFN, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                         skip_bias_add=False)
        self.megatron = ps is not None
        full = mcore_full_weights()
        with torch.no_grad():
            for n, p in self.named_parameters():
                t = full[n]
                if n in MCORE_SPLIT and tp > 1:
                    t = t.chunk(tp, dim=MCORE_SPLIT[n])[rank]
                p.copy_(t)

    def forward(self, x):
        h = self.ln(x)
        if self.megatron:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)[0]))[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def mcore_worker(rank, world_size):
    import novograd_ds
    from megatron.core import parallel_state as ps
    from novograd_ds import NovoGrad

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    tp_group = ps.get_tensor_model_parallel_group()

    def run(model, opt, engine=None):
        for step in range(STEPS):
            x, y = batch(step, 0)
            if engine is None:
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
            else:
                engine.backward(F.mse_loss(engine(x), y))
                engine.step()
        out = {}
        for n, p in model.named_parameters():
            t = p.detach().clone()
            if n in MCORE_SPLIT and world_size > 1 and model is not ref_model:
                parts = [torch.empty_like(t) for _ in range(world_size)]
                torch.distributed.all_gather(parts, t, group=tp_group)
                t = torch.cat(parts, dim=MCORE_SPLIT[n])
            out[n] = t
        return out

    ref_model = MCoreMLP()
    ref = run(ref_model, NovoGrad(ref_model.parameters(), lr=LR, betas=BETAS, weight_decay=WD))
    results = {"marks": {n: bool(getattr(p, "tensor_model_parallel", False))
                         for n, p in MCoreMLP(ps).named_parameters()}}
    for name in ("mcore_plain", "mcore_plain_noTP", "mcore_z1_client"):
        model = MCoreMLP(ps)
        opt = NovoGrad(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
        engine = None
        if name == "mcore_z1_client":
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, mpu=MegatronMPU(ps),
                                                   config=ds_config(1, 1, with_optimizer=False))
        elif name == "mcore_plain":
            novograd_ds.set_tensor_parallel_group(opt, mpu=ps)
        results[name] = rel_err(run(model, opt, engine), ref)
    ps.destroy_model_parallel()
    return results


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MCORE, reason="megatron-core is not installed (pip install megatron-core==0.16.1)")
def test_megatron_core_layers_equal_tp1():
    results = run_ranks(mcore_worker, 2)
    print({k: v for k, v in results[0].items()})
    for r in results:
        assert r["marks"] == {"ln.weight": False, "ln.bias": False, "fc1.weight": True, "fc1.bias": True,
                              "fc2.weight": True, "fc2.bias": False}, r["marks"]
        assert r["mcore_plain"] < RTOL and r["mcore_z1_client"] < RTOL, r
        assert r["mcore_plain_noTP"] > 1e-3, r
