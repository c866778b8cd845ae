"""Checkpoint size and the memory a save allocates: NovoGrad's compact form vs its earlier expanded form vs Adam.

    DS_ACCELERATOR=cpu python benchmarks/bench_checkpoint.py [--d 512 --blocks 12]      # one CPU process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/bench_checkpoint.py            # 2 CPU ranks (gloo)
    deepspeed --num_gpus 8 benchmarks/bench_checkpoint.py                               # on GPUs

One DeepSpeed ZeRO-2 engine per optimizer on the same model (``--blocks`` x [LayerNorm, Linear d->4d, Linear 4d->d],
about 25M parameters in 72 tensors by default), one step, then ``engine.save_checkpoint``. Rows:

* ``novograd``: this version (compact: exp_avg per element, per-layer v and a segment index);
* ``novograd-expanded``: the form written up to commit 997ee90, emulated by expanding each flat's v into a per-element
  ``exp_avg_sq`` inside ``state_dict()`` exactly as that version did;
* ``adam``: DeepSpeed's Adam (``"type": "Adam"``, ``torch_adam``: torch.optim.Adam; same state as FusedAdam).

For each: bytes per parameter of this rank's optimizer shard file (fp32 master partition + optimizer state), the
ratio to Adam's, and the peak memory the save allocated on top of what was live before it (the torch allocator's
events during ``save_checkpoint``, from torch.profiler with ``profile_memory``; on a GPU also
``torch.cuda.max_memory_allocated``), in bytes per local parameter. Timings are not the point and not printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch


class Net(torch.nn.Module):
    def __init__(self, d: int, blocks: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                torch.nn.Linear(4 * d, d)) for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _peak_of(prof) -> int:
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = best = 0
    for e in events:
        cur += e.nbytes()
        best = max(best, cur)
    return best


def _expanded_state_dict(self):
    """NovoGrad.state_dict() as of 997ee90: each bound flat's v expanded to a per-element exp_avg_sq."""
    from novograd_ds.checkpoint import COMPACT
    from novograd_ds.kernels import SegmentTable
    from novograd_ds.sharding import expand_layer_values

    sd = _compact_state_dict(self)
    for i, st in sd["state"].items():
        c = st.pop(COMPACT, None)
        if c is not None:
            st["exp_avg_sq"] = expand_layer_values(c["exp_avg_sq_layer"].to(st["exp_avg"].device),
                                                   SegmentTable(*c["segments"].tolist()), c["numel"])
    return sd


_compact_state_dict = None


def run(name: str, args, root: str) -> dict:
    import deepspeed

    from novograd_ds import NovoGrad

    global _compact_state_dict
    if _compact_state_dict is None:
        _compact_state_dict = NovoGrad.state_dict
    NovoGrad.state_dict = _expanded_state_dict if name == "novograd-expanded" else _compact_state_dict
    torch.manual_seed(0)
    model = Net(args.d, args.blocks)
    opt = ({"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}} if name == "adam"
           else {"type": "NovoGrad", "params": {"lr": 1e-3}})
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "optimizer": opt,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(2, args.d, device=engine.device)
    engine.backward(engine(x).square().mean())
    engine.step()
    path = os.path.join(root, name)
    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.save_checkpoint(path, tag="t")
    rank = torch.distributed.get_rank()
    local = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    out = {"numel": sum(p.numel() for p in model.parameters()), "local": local,
           "file": os.path.getsize(os.path.join(path, "t", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")),
           "peak_cpu": _peak_of(prof)}
    if on_gpu:
        out["peak_gpu"] = torch.cuda.max_memory_allocated() - before
    NovoGrad.state_dict = _compact_state_dict
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    import deepspeed

    import novograd_ds  # noqa: F401

    deepspeed.init_distributed()
    root = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        rows = {name: run(name, args, root) for name in ("adam", "novograd", "novograd-expanded")}
    finally:
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    if torch.distributed.get_rank() == 0:
        adam = rows["adam"]
        print(f"ZeRO-2, {adam['numel'] / 1e6:.2f}M parameters, {torch.distributed.get_world_size()} rank(s), "
              f"{adam['local'] / 1e6:.2f}M local on rank 0")
        print(f"{'optimizer':20s} {'shard B/param':>14s} {'vs Adam':>8s} {'save peak CPU B/param':>22s}"
              + (f" {'save peak GPU B/param':>22s}" if "peak_gpu" in adam else ""))
        for name, r in rows.items():
            line = (f"{name:20s} {r['file'] / r['local']:14.3f} {r['file'] / adam['file']:8.4f} "
                    f"{r['peak_cpu'] / r['local']:22.4f}")
            if "peak_gpu" in r:
                line += f" {r['peak_gpu'] / r['local']:22.4f}"
            print(line)


if __name__ == "__main__":
    main()
