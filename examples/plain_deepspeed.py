"""A plain DeepSpeed script that never imports novograd_ds; its config asks for "type": "NovoGrad".

Run it through the shim, which registers NovoGrad first (without the shim DeepSpeed says
"NovoGrad is not a supported DeepSpeed Optimizer")::

    deepspeed --num_gpus 2 --module novograd_ds.run examples/plain_deepspeed.py --out /tmp/plain
    torchrun --nproc_per_node 2 -m novograd_ds.run examples/plain_deepspeed.py --out /tmp/plain

Fits y = A x with a two-layer MLP; rank 0 writes OUT/result.json (losses, optimizer class).
"""

import argparse
import json
import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
args = p.parse_args()

# The backend follows DeepSpeed's accelerator (NCCL takes CUDA tensors only, gloo CPU tensors), so every tensor
# below that takes part in a collective lives on engine.device.
accelerator = get_accelerator().device_name()
if accelerator == "cuda":
    torch.cuda.set_device(args.local_rank)
deepspeed.init_distributed(dist_backend="nccl" if accelerator == "cuda" else "gloo")
rank = torch.distributed.get_rank()
config = {
    "train_micro_batch_size_per_gpu": 32,
    "optimizer": {"type": "NovoGrad", "params": {"lr": 0.05, "betas": [0.95, 0.98], "weight_decay": 0.001}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
A = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
gen = torch.Generator().manual_seed(100 + rank)
losses = []
for _ in range(args.steps):
    x = torch.randn(32, 16, generator=gen)
    loss = torch.nn.functional.mse_loss(engine(x.to(engine.device)), (x @ A.T).to(engine.device))
    engine.backward(loss)
    engine.step()
    t = loss.detach().float().reshape(1)  # on engine.device: the device the backend takes
    torch.distributed.all_reduce(t)
    losses.append(float(t.cpu()) / torch.distributed.get_world_size())
opt = engine.basic_optimizer
if rank == 0:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"losses": losses, "basic_optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}",
                   "optimizer_wrapper": type(engine.optimizer).__name__,
                   "world_size": torch.distributed.get_world_size(), "argv_local_rank": args.local_rank}, f)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} with {type(opt).__name__} in {type(engine.optimizer).__name__}")
# Leave no communication threads running at interpreter exit (an undestroyed gloo group can abort a rank there).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
