"""The main job with ``--engine fsdp2`` (PyTorch fully_shard + NovoGrad, novograd_ds/lm/fsdp2_engine.py), run for
real under torchrun with 2 CPU ranks, and compared with the DeepSpeed engine in one process on the same sequences."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from subproc import child_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--seq-len", "64", "--micro-batch", "4",
        "--eval-batches", "2", "--no-progress"]
CONFIG = "configs/zero2.json"

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def _torchrun(n: int, *args: str):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                 str(_port()), "-m", "novograd_ds.train", *args])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def deepspeed_reference(tmp_path_factory):
    """One process, the DeepSpeed engine, accumulation 2: the same sequences per step as 2 ranks without it."""
    out = tmp_path_factory.mktemp("ds")
    _run([sys.executable, "-m", "novograd_ds.train", "--deepspeed-config", CONFIG, "--out", str(out), *TINY,
          "--max-steps", "5", "--eval-interval", "5", "--grad-accum", "2"])
    return _metrics(out)


def test_fsdp2_engine_world2_equals_deepspeed_one_process(tmp_path, deepspeed_reference):
    """launch/torchrun.sh with ENGINE=fsdp2, 2 ranks."""
    out = tmp_path / "fsdp2"
    env = child_env(ENGINE="fsdp2", NPROC_PER_NODE=2, MASTER_PORT=_port(), CONFIG=CONFIG, OUT=out)
    r = subprocess.run(["bash", "launch/torchrun.sh", *TINY, "--max-steps", "5", "--eval-interval", "5"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    m = _metrics(out)
    assert m["engine"] == "fsdp2" and m["world_size"] == 2 and m["steps"] == 5
    assert m["basic_optimizer"] == "novograd_ds.optimizer.NovoGrad" and m["optimizer_wrapper"] == "NovoGrad"  # no wrapper
    ref = deepspeed_reference
    assert [h[1] for h in m["train_history"]] == pytest.approx([h[1] for h in ref["train_history"]], abs=2e-4)
    assert [h[2] for h in m["train_history"]] == pytest.approx([h[2] for h in ref["train_history"]])  # same schedule
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=2e-4)
    assert m["val_loss"] < m["initial_val_loss"] - 0.05
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest").is_file()


def test_fsdp2_resume_at_another_world_size(tmp_path, deepspeed_reference):
    """3 steps at world 2, saved through torch.distributed.checkpoint, resumed to 5 steps at world 1 (accumulation 2,
    the same sequences): equal to the uninterrupted run."""
    out = tmp_path / "run"
    _torchrun(2, "--engine", "fsdp2", "--deepspeed-config", CONFIG, "--out", str(out), *TINY, "--max-steps", "3",
              "--schedule-steps", "5", "--eval-interval", "5")
    _run([sys.executable, "-m", "novograd_ds.train", "--engine", "fsdp2", "--deepspeed-config", CONFIG, "--out",
          str(out), *TINY, "--max-steps", "5", "--eval-interval", "5", "--grad-accum", "2", "--resume"])
    m = _metrics(out)
    assert m["resumed_from_step"] == 3 and m["steps"] == 5 and m["world_size"] == 1
    ref = deepspeed_reference
    assert [h[1] for h in m["train_history"]] == pytest.approx([h[1] for h in ref["train_history"]], abs=2e-4)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=2e-4)


@pytest.mark.parametrize("edit, key", [
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}, "optimizer.type"),
])
def test_fsdp2_refuses_what_it_cannot_run(tmp_path, edit, key):
    cfg = json.loads((ROOT / CONFIG).read_text())
    cfg.update(edit)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "novograd_ds.train", "--engine", "fsdp2", "--deepspeed-config",
                        str(path), "--out", str(tmp_path / "o"), *TINY, "--max-steps", "1"],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("novograd_ds.train: error")]
    assert len(err) == 1 and key in err[0], r.stderr[-2000:]  # (fp16 is refused earlier on a CPU: no fp16 there)
