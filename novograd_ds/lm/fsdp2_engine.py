"""The main job's FSDP2 engine: PyTorch ``fully_shard`` + NovoGrad, driven by the same DeepSpeed-style config.

``python -m novograd_ds.train --engine fsdp2`` (under ``torchrun``, any number of ranks) builds this instead of a
DeepSpeed engine. It offers the few engine calls the training loop makes (``engine(...)``, ``backward``, ``step``,
``get_lr``, ``save_checkpoint``/``load_checkpoint``, ``eval``/``train``), with DeepSpeed's semantics, so one loop
serves both engines and their runs can be compared step for step:

* the config's batch keys, ``optimizer`` (``NovoGrad`` in any letter case, or ``AdamW``/``Adam``), ``scheduler``
  (DeepSpeed's own schedule classes from ``deepspeed.runtime.lr_schedules``, stepped once per optimizer step, as the
  DeepSpeed engine does), ``gradient_clipping`` (default 1.0, as DeepSpeed's) and ``bf16.enabled`` are honoured; ``zero_optimization`` is not
  (FSDP2 always shards parameters, gradients and optimizer state, like ZeRO-3);
* ``backward`` scales the loss by ``1/gradient_accumulation_steps`` and ``step`` steps the optimizer every
  ``gradient_accumulation_steps`` calls; gradients are reduced across ranks only on the last micro-step;
* bf16: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: bf16 compute, fp32 sharded master
  weights, fp32 gradient reduction; fp16 is refused (no loss scaling here);
* checkpoints go through ``torch.distributed.checkpoint`` (``get_/set_model_state_dict``,
  ``get_/set_optimizer_state_dict``): ``DIR/<tag>/`` plus ``DIR/latest`` naming the tag, like DeepSpeed's, so a run
  saved at one world size resumes at another.

NovoGrad needs no call here: on DTensor parameters it sums each layer's norm over the mesh by itself
(``novograd_ds/integrations/fsdp2.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["FSDP2Engine", "build_fsdp2_engine", "FSDP2ConfigError"]


class FSDP2ConfigError(ValueError):
    """A config the FSDP2 engine cannot run; the message names the key and the fix."""


def _optimizer(cfg: dict[str, Any], params) -> torch.optim.Optimizer:
    from ..optimizer import NovoGrad

    section = cfg.get("optimizer") or {"type": "NovoGrad", "params": {}}
    name = str(section.get("type", "NovoGrad"))
    p = dict(section.get("params", {}))
    if "betas" in p:
        p["betas"] = tuple(p["betas"])
    if name.lower() == "novograd":
        return NovoGrad(params, **p)
    if name.lower() in ("adamw", "adam"):
        cls = torch.optim.AdamW if name.lower() == "adamw" else torch.optim.Adam
        p.pop("torch_adam", None)
        p.pop("adam_w_mode", None)
        return cls(params, **p)
    raise FSDP2ConfigError(f"optimizer.type {name!r}: the FSDP2 engine builds NovoGrad, AdamW or Adam; change "
                           "optimizer.type (or use --engine deepspeed)")


def _scheduler(cfg: dict[str, Any], optimizer):
    section = cfg.get("scheduler")
    if not section:
        return None
    from deepspeed.runtime import lr_schedules

    name = section.get("type")
    cls = getattr(lr_schedules, str(name), None)
    if cls is None:
        raise FSDP2ConfigError(f"scheduler.type {name!r} is not one of DeepSpeed's schedules "
                               f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}); fix scheduler.type")
    return cls(optimizer, **section.get("params", {}))


def _check_config(cfg: dict[str, Any]) -> None:
    fp16 = cfg.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise FSDP2ConfigError("fp16.enabled is true: the FSDP2 engine has no loss scaling; use bf16 "
                               "(\"bf16\": {\"enabled\": true}) or --engine deepspeed")
    offload = (cfg.get("zero_optimization") or {}).get("offload_optimizer")
    if isinstance(offload, dict) and offload.get("device") not in (None, "none"):
        raise FSDP2ConfigError("zero_optimization.offload_optimizer is a DeepSpeed feature; remove it for "
                               "--engine fsdp2 (or use --engine deepspeed)")


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (GPT-2's transformer.h, else none: the root holds everything)."""
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "h", None)
    return list(blocks) if blocks is not None else []


class FSDP2Engine:
    """A model under ``fully_shard`` with its optimizer and schedule; the DeepSpeed engine calls the job uses."""

    def __init__(self, model: torch.nn.Module, cfg: dict[str, Any], *, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _check_config(cfg)
        self.config = cfg
        self.device = device
        self.world_size = torch.distributed.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("dp",))
        bf16 = isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") is True
        kw: dict[str, Any] = {"mesh": self.mesh}
        if bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model.to(device)
        for block in _blocks(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        self.module = model
        self.bf16 = bf16
        self.grad_accum = int(cfg["gradient_accumulation_steps"])
        # DeepSpeed clips at 1.0 when the config does not say (GRADIENT_CLIPPING_DEFAULT); so does this engine
        self.clip = float(cfg.get("gradient_clipping", 1.0) or 0.0)
        self.optimizer = self.basic_optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        self.lr_scheduler = _scheduler(cfg, self.optimizer)
        self.micro_steps = 0
        self.global_steps = 0
        self.module.set_requires_gradient_sync(self.grad_accum == 1)

    # -- the calls the training loop makes ------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()
        return self

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """One micro-step; the optimizer steps (and the schedule advances) on every ``grad_accum``-th call."""
        self.micro_steps += 1
        boundary = self.micro_steps % self.grad_accum == 0
        if not boundary:
            last = (self.micro_steps + 1) % self.grad_accum == 0
            self.module.set_requires_gradient_sync(last)
            return
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        self.module.set_requires_gradient_sync(self.grad_accum == 1)

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def zero_optimization_stage(self) -> Optional[int]:
        return None  # not a DeepSpeed ZeRO stage

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: Optional[dict[str, Any]] = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        root = Path(save_dir)
        state = {"model": get_model_state_dict(self.module),
                 "optim": get_optimizer_state_dict(self.module, self.optimizer)}
        dcp.save(state, checkpoint_id=str(root / tag))
        if torch.distributed.get_rank() == 0:
            extra = {"client_state": client_state or {}, "global_steps": self.global_steps,
                     "micro_steps": self.micro_steps, "world_size": self.world_size,
                     "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None}
            (root / tag / "engine_state.json").write_text(json.dumps(extra, default=str))
            (root / "latest").write_text(tag)
        torch.distributed.barrier()

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None) -> tuple[Optional[str], dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        root = Path(load_dir)
        if tag is None:
            latest = root / "latest"
            if not latest.is_file():
                return None, {}
            tag = latest.read_text().strip()
        path = root / tag
        extra_file = path / "engine_state.json"
        if not extra_file.is_file():
            raise FileNotFoundError(f"{path}: not an FSDP2 checkpoint of novograd_ds.train (no engine_state.json); "
                                    "was it written with --engine deepspeed? Resume with the same --engine")
        state = {"model": get_model_state_dict(self.module),
                 "optim": get_optimizer_state_dict(self.module, self.optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        extra = json.loads(extra_file.read_text())
        self.global_steps = int(extra["global_steps"])
        # counted afresh: the accumulation (and world size) may differ from the saving run's
        self.micro_steps = self.global_steps * self.grad_accum
        self.module.set_requires_gradient_sync(self.grad_accum == 1)
        if self.lr_scheduler is not None and extra.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        return str(path), extra.get("client_state", {})


def build_fsdp2_engine(model: torch.nn.Module, cfg: dict[str, Any], local_rank: int) -> FSDP2Engine:
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return FSDP2Engine(model, cfg, device=device)
