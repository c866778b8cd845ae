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
