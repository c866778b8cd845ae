"""NovoGrad (from the DeepSpeed config) vs DeepSpeed's own Adam under ZeRO-2 on 2 CPU ranks (or GPUs).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/bench_zero.py [--steps 30] [--d-model 256]
    deepspeed --num_gpus 2 benchmarks/bench_zero.py        # on GPUs: NCCL, DeepSpeed's FusedAdam (JIT-built)

Prints, from rank 0, the median full training step (forward, backward, engine.step)
for each optimizer, their ratio, and the optimizer state bytes per rank (all tensors in the inner optimizer's
state) and their ratio. Targets: time <= 1.03x Adam, state bytes <= 0.51x Adam.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import novograd_ds  # noqa: F401  (registers "NovoGrad")
import deepspeed
from deepspeed.accelerator import get_accelerator


class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=1000, d=256, layers=4, heads=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def run(opt_type, args):
    torch.manual_seed(0)
    model = TinyTransformer(d=args.d_model, layers=args.layers)
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": opt_type, "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10 ** 9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    g = torch.Generator().manual_seed(engine.global_rank)
    times = []
    for step in range(args.warmup + args.steps):
        idx = torch.randint(0, 1000, (args.batch, args.seq), generator=g).to(engine.device)
        t0 = time.perf_counter()
        logits = engine(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), idx[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        get_accelerator().synchronize()  # a no-op on the CPU; on a GPU the step is asynchronous
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    opt = engine.basic_optimizer
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t))
    name = type(opt).__name__
    del engine
    return name, statistics.median(times), state_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=65)
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = ap.parse_args()
    # The backend follows DeepSpeed's accelerator: the ZeRO collectives run on the engine's tensors, and NCCL
    # takes CUDA tensors only. Without DS_ACCELERATOR=cpu on a GPU machine this times the GPU step.
    accelerator = get_accelerator().device_name()
    if accelerator == "cuda":
        torch.cuda.set_device(args.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if accelerator == "cuda" else "gloo")
    results = {}
    for round_ in range(2):  # interleave to even out machine noise: Adam, NovoGrad, Adam, NovoGrad
        for opt_type in ("Adam", "NovoGrad"):
            name, t, b = run(opt_type, args)
            results.setdefault(opt_type, []).append((name, t, b))
    if torch.distributed.get_rank() == 0:
        a_t = min(t for _, t, _ in results["Adam"])
        n_t = min(t for _, t, _ in results["NovoGrad"])
        a_b, n_b = results["Adam"][0][2], results["NovoGrad"][0][2]
        print(f"ZeRO-2, {torch.distributed.get_world_size()} {accelerator} ranks, TinyTransformer d={args.d_model} "
              f"layers={args.layers} batch={args.batch} seq={args.seq - 1}, median of {args.steps} steps (best of 2 "
              "rounds)")
        print(f"  Adam     ({results['Adam'][0][0]}): step {a_t * 1e3:8.2f} ms   optimizer state {a_b / 2**20:8.2f} MiB/rank")
        print(f"  NovoGrad ({results['NovoGrad'][0][0]}): step {n_t * 1e3:8.2f} ms   optimizer state {n_b / 2**20:8.2f} MiB/rank")
        print(f"  time ratio NovoGrad/Adam = {n_t / a_t:.3f} (target <= 1.03)   "
              f"state ratio = {n_b / a_b:.4f} (target <= 0.51)")


if __name__ == "__main__":
    main()
