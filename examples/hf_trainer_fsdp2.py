"""Causal-LM training with the HF ``transformers.Trainer``, PyTorch FSDP2 and NovoGrad.

Two ways, both with nothing NovoGrad-specific beyond naming the optimizer:

1. accelerate applies FSDP2 (GPUs; accelerate 1.15 enables its FSDP plugin only when CUDA is present)::

       accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 examples/hf_trainer_fsdp2.py \
           --output_dir runs/hf_fsdp2 --max_steps 200 --learning_rate 0.01 --weight_decay 0.001

   The Trainer builds ``NovoGrad`` itself after accelerate has sharded the model
   (``Trainer(optimizer_cls_and_kwargs=(NovoGrad, {...}))``), so it steps the DTensor parameters.

2. You shard the model yourself with ``fully_shard`` and hand the Trainer the optimizer (any launcher; this is what
   the CPU test runs)::

       torchrun --nproc_per_node 2 examples/hf_trainer_fsdp2.py --shard_myself --output_dir runs/hf_fsdp2 ...

   ``Trainer(optimizers=(NovoGrad(param_groups(model, wd), ...), None))``. The Trainer sees one process here (accelerate
   applies no data parallelism of its own to a model it did not shard), so every rank is given its own slice of the
   data (``--shard_myself`` does that); FSDP2 averages the gradients across ranks.

NovoGrad needs no call for FSDP2: on DTensor parameters each layer's norm is summed over the mesh by the optimizer
itself (novograd_ds/integrations/fsdp2.py). Model and data as in examples/hf_trainer_clm.py. Rank 0 writes
OUTPUT_DIR/hf_metrics.json.
"""

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments

from novograd_ds import NovoGrad
from novograd_ds.lm import data as lmdata


@dataclass
class ScriptArgs:
    data: Optional[list[str]] = None
    vocab_size: int = 4096
    seq_len: int = 128
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    train_windows: int = 20000
    betas: str = "0.95,0.98"
    shard_myself: bool = False  # fully_shard the model here and pass optimizers=(NovoGrad(...), None)
    sequential: bool = False  # read the data in order (no shuffling): runs that can be compared step by step
    emulate_world: int = 1  # one process reading the batches `emulate_world` ranks would read together (a reference)


class Windows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch)

    def __getitem__(self, i):
        return {"input_ids": self.batch[i], "labels": self.batch[i]}


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases and norms), as the Trainer groups its own optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def rank_batches(windows: torch.Tensor, rank: int, world: int, per_rank: int) -> torch.Tensor:
    """Rank ``rank``'s sequences: batch ``i`` of every rank together is one global batch of ``world * per_rank``."""
    steps = len(windows) // (world * per_rank)
    w = windows[: steps * world * per_rank].reshape(steps, world, per_rank, -1)
    return w[:, rank].reshape(steps * per_rank, -1)


def main():
    script, targs = HfArgumentParser((ScriptArgs, TrainingArguments)).parse_args_into_dataclasses(args=sys.argv[1:])
    betas = tuple(float(b) for b in script.betas.split(","))
    if script.shard_myself and "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0

    corpus = lmdata.load_corpus(script.data, vocab_size=script.vocab_size)
    windows = lmdata.sample_batch(corpus.train, script.train_windows, script.seq_len - 1, targs.seed)
    per_rank = targs.per_device_train_batch_size
    if script.emulate_world > 1:  # one process, batch i = the concatenation of the ranks' batches i
        per_rank //= script.emulate_world
        parts = [rank_batches(windows, r, script.emulate_world, per_rank) for r in range(script.emulate_world)]
        train = torch.stack([p.reshape(-1, per_rank, p.shape[-1]) for p in parts], 1).reshape(-1, windows.shape[-1])
    elif script.shard_myself and world > 1:
        train = rank_batches(windows, rank, world, per_rank)
    else:
        train = windows

    torch.manual_seed(targs.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=corpus.vocab_size, n_positions=script.seq_len,
                                       n_embd=script.n_embd, n_layer=script.n_layer, n_head=script.n_head,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=corpus.eot_id,
                                       eos_token_id=corpus.eot_id))
    hp = dict(lr=targs.learning_rate, betas=betas, weight_decay=targs.weight_decay)
    cls = SequentialTrainer if script.sequential else Trainer
    if script.emulate_world > 1:  # the reference for --shard_myself: the same optimizer, nothing sharded
        trainer = cls(model=model, args=targs, train_dataset=Windows(train),
                      optimizers=(NovoGrad(param_groups(model, targs.weight_decay), **hp), None))
    elif script.shard_myself and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (world,))
        model.to(device)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trainer = cls(model=model, args=targs, train_dataset=Windows(train),
                      optimizers=(NovoGrad(param_groups(model, targs.weight_decay), **hp), None))
    else:
        trainer = cls(model=model, args=targs, train_dataset=Windows(train), optimizer_cls_and_kwargs=(NovoGrad, hp))
    trainer.train()

    opt = trainer.optimizer
    basic = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    params = list(trainer.model.parameters())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = dict(
        world_size=world, trainer_world_size=targs.world_size, steps=trainer.state.global_step, train_losses=losses,
        basic_optimizer=f"{type(basic).__module__}.{type(basic).__qualname__}",
        dtensor_params=sum(type(p).__name__ == "DTensor" for p in params), n_params=len(params),
        optimizer_steps=sorted({basic.state[p]["step"] for p in params if p in basic.state}),
        layer_moments=[float(basic.state[p]["exp_avg_sq"]) for p in params if p in basic.state],
        param_norms=[float((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().norm()) for p in params],
    )
    if rank == 0:
        os.makedirs(targs.output_dir, exist_ok=True)
        with open(os.path.join(targs.output_dir, "hf_metrics.json"), "w") as f:
            json.dump(out, f, indent=2)
        print(f"world {world}: train loss {losses[0]:.4f} -> {losses[-1]:.4f}, {out['basic_optimizer']}, "
              f"{out['dtensor_params']}/{out['n_params']} DTensor parameters")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
