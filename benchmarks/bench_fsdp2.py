"""Training-step time under PyTorch FSDP2: NovoGrad against torch's AdamW on the same sharded model, in one run.

    python benchmarks/bench_fsdp2.py                 # world 2 (CPU, gloo), a GPT-2-like stack, 30 timed steps each
    python benchmarks/bench_fsdp2.py --tiny          # seconds; what the test suite runs

Each rank builds the same model, shards it with ``fully_shard`` (one unit per block), and runs full training steps
(forward, backward with FSDP2's reduce-scatter, ``clip_grad_norm_``, ``optimizer.step()``) for NovoGrad and for
AdamW, alternating between the two optimizers round-robin so that any load from other processes hits both alike.
It prints the median step time of each, the median optimizer-step time alone, and the ratio NovoGrad / AdamW
(target: at most 1.05 for the whole step). NovoGrad's extra work under FSDP2 is one all-reduce of a vector with one
entry per parameter tensor per step (NOTE: [DTensor parameters] in novograd_ds/integrations/fsdp2.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def build(d: int, layers: int, vocab: int):
    import torch

    class MLPBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(d)
            self.attn = torch.nn.Linear(d, 3 * d)
            self.proj = torch.nn.Linear(3 * d, d)
            self.fc = torch.nn.Linear(d, 4 * d)
            self.out = torch.nn.Linear(4 * d, d)

        def forward(self, x):
            h = x + self.proj(torch.nn.functional.gelu(self.attn(self.ln(x))))
            return h + self.out(torch.nn.functional.gelu(self.fc(h)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, d)
            self.blocks = torch.nn.ModuleList(MLPBlock() for _ in range(layers))
            self.norm = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, vocab, bias=False)

        def forward(self, ids):
            x = self.emb(ids)
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x))

    return Net()


def worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import novograd_ds

    mesh = init_device_mesh("cpu", (world,))
    runs = {}
    for name in ("novograd", "adamw"):
        torch.manual_seed(0)
        model = build(args.d, args.layers, args.vocab)
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if name == "novograd":
            opt = novograd_ds.NovoGrad(model.parameters(), lr=1e-3, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        runs[name] = (model, opt, [], [])
    n_params = sum(p.numel() for p in runs["novograd"][0].parameters())
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]

    def one_step(model, opt, ids):
        dist.barrier()
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        return t2 - t0, t2 - t1

    for i in range(args.warmup + args.steps):
        for name in ("novograd", "adamw"):  # round robin
            model, opt, steps, opt_steps = runs[name]
            total, opt_only = one_step(model, opt, batches[i % len(batches)])
            if i >= args.warmup:
                steps.append(total)
                opt_steps.append(opt_only)
    if rank == 0:
        result = {name: dict(step_ms=1e3 * statistics.median(r[2]), opt_ms=1e3 * statistics.median(r[3]))
                  for name, r in runs.items()}
        result["n_params"] = n_params
        result["backend"] = runs["novograd"][1].backend
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=129)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, a few steps (a smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.d, args.layers, args.vocab, args.batch, args.seq, args.steps, args.warmup = 32, 1, 64, 2, 17, 3, 1
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(args.world, _port(), args, out), nprocs=args.world, join=True)
        with open(out) as f:
            r = json.load(f)
    ng, aw = r["novograd"], r["adamw"]
    print(f"FSDP2, world {args.world} (CPU, gloo, {args.threads} thread/rank), {r['n_params'] / 1e6:.2f}M params, "
          f"batch {args.batch}x{args.seq - 1} tokens/rank, median of {args.steps} round-robin steps; NovoGrad backend "
          f"{r['backend']}")
    print(f"{'optimizer':<10} {'step ms':>9} {'opt.step ms':>12}")
    print(f"{'NovoGrad':<10} {ng['step_ms']:>9.2f} {ng['opt_ms']:>12.2f}")
    print(f"{'AdamW':<10} {aw['step_ms']:>9.2f} {aw['opt_ms']:>12.2f}")
    print(f"ratio NovoGrad/AdamW: whole step {ng['step_ms'] / aw['step_ms']:.3f} (target <= 1.05), "
          f"optimizer step {ng['opt_ms'] / aw['opt_ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
