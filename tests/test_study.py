"""The evidence study (benchmarks/study.py) keeps working: a tiny version, end to end, with its page."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study_module():
    spec = importlib.util.spec_from_file_location("benchmarks_study", ROOT / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_study"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


study = _study_module()
INF = math.inf


def test_band_status_each_side():
    bs = study.band_status
    # The band (within 0.05 of 6.0) reaches the top: open above, closed below.
    assert bs([6.5, 6.0, 6.04]) == {"low": "closed", "high": "band at edge"}
    # A diverged run (inf or nan) is outside the band and closes its side.
    assert bs([6.5, 6.0, INF]) == {"low": "closed", "high": "closed"}
    assert bs([math.nan, 6.0, 6.2]) == {"low": "closed", "high": "closed"}
    # Outside the band but lower than its neighbour: a better rate may lie beyond, so still open.
    assert bs([6.5, 6.0, 6.4, 6.2]) == {"low": "closed", "high": "falling at edge"}
    assert bs([6.0]) == {"low": "band at edge", "high": "band at edge"}
    assert bs([INF, INF]) == {"low": "no band", "high": "no band"}


def test_next_grid_point_and_cap():
    grid = [0.25, 0.5, 1.0]
    assert study.next_grid_point(grid, [6.5, 6.0, 6.6], {"low": 0, "high": 0}) is None
    assert study.next_grid_point(grid, [6.01, 6.0, 6.6], {"low": 0, "high": 0}) == ("low", 0.125)
    assert study.next_grid_point(grid, [6.01, 6.0, 6.02], {"low": 0, "high": 0}) == ("low", 0.125)
    assert study.next_grid_point(grid, [6.01, 6.0, 6.02], {"low": 2, "high": 0}, cap=2) == ("high", 2.0)
    assert study.next_grid_point(grid, [6.01, 6.0, 6.02], {"low": 2, "high": 2}, cap=2) is None


def test_extend_grid_closes_the_band():
    calls = []

    def loss(lr):  # a plateau from 2^-6 to 2^-2 (the best at 2^-4), rising below, diverging from 2^0 up
        calls.append(lr)
        e = math.log2(lr)
        return INF if e >= 0 else 6.0 + 0.01 * abs(e + 4) + (0.2 * (-6 - e) if e < -6 else 0.0)

    start = [2.0 ** e for e in range(-10, -3)]            # the band touches the top: 2^-4 is the end point
    grid = study.extend_grid(start, loss, cap=8)
    assert grid == [2.0 ** e for e in range(-10, 1)]       # 2^-3 .. 2^-1 in the band, 2^0 diverged: closed
    assert calls == grid                                   # each point run once, in order
    losses = [loss(lr) for lr in grid]
    assert study.band_status(losses) == {"low": "closed", "high": "closed"}
    # A band the cap cuts off stays open, and the grid stops after ``cap`` points on that side.
    flat = study.extend_grid([1.0, 2.0], lambda lr: 6.0, cap=3)
    assert flat == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    # A non-monotone end (outside the band, still falling) gets one more point, where the loss turns back up.
    bumpy = {0.25: 6.5, 0.5: 6.0, 1.0: 6.4, 2.0: 6.2, 4.0: 6.3}
    assert study.extend_grid([0.25, 0.5, 1.0, 2.0], bumpy.__getitem__) == [0.25, 0.5, 1.0, 2.0, 4.0]


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    doc = tmp_path / "docs" / "results.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--out", str(tmp_path / "study"), "--tiny",
                    "--write-docs", str(doc)], check=True, timeout=900, cwd=ROOT)
    data = json.loads((tmp_path / "study" / "results.json").read_text())
    s = data["summary"]
    names = {r["optimizer"] for r in data["runs"]}
    assert names == {"novograd", "adamw", "sgd", "novograd+grad_averaging", "novograd_blocks+adamw_rest",
                     "adamw_blocks+novograd_rest", "novograd_8bit", "novograd_8bit_qseed1"}
    assert set(s["variants"]) == names - {"novograd", "adamw", "sgd", "novograd_8bit", "novograd_8bit_qseed1"}
    assert set(s["long"]) == {"novograd", "adamw"}
    n_params = data["runs"][0]["n_params"]
    n_tensors_bytes = s["novograd"]["state_bytes"] - 4 * n_params
    # Analytic state sizes: AdamW 2 fp32 per element (+ a 0-dim fp32 step per tensor); SGD momentum 1;
    # NovoGrad 1 per element + 1 fp32 per tensor.
    assert 0 < s["adamw"]["state_bytes"] - 8 * n_params < 4 * 100
    assert s["sgd"]["state_bytes"] == 4 * n_params
    assert 0 < n_tensors_bytes < 4 * 100  # one fp32 scalar per tensor, fewer than 100 tensors
    assert s["state_ratio_novograd_adamw"] <= 0.51
    # The 8-bit section: NovoGrad's best rate and its neighbours on the (two-point) tiny grid, both seeds, each 8-bit
    # run against the 32-bit run of the same rate and seed (the sweep's own run at seed 0).
    eb = s["eightbit"]
    grid = s["novograd"]["grid"]
    assert data["eightbit_lrs"] == grid and len(grid) == 2
    assert eb["settings"] == {"state_bits": 8, "quant_map": "linear", "quant_rounding": "stochastic"}
    assert sorted((r["lr"], r["seed"]) for r in eb["rows"]) == sorted((lr, sd) for lr in grid for sd in (0, 1))
    runs = {(r["optimizer"], r["lr"], r["seed"]): r for r in data["runs"]
            if not r["warmup"] and r["steps"] == data["config"]["steps"] and r["batch_tokens"] == 128}
    for row in eb["rows"]:
        r8, r32 = runs[("novograd_8bit", row["lr"], row["seed"])], runs[("novograd", row["lr"], row["seed"])]
        assert r8["quant"] == eb["settings"]
        assert r8["key"].endswith("|state_bits=8,quant_map=linear,quant_rounding=stochastic")
        assert row["q8"] == r8["final_val_loss"] and row["fp32"] == r32["final_val_loss"]
        assert row["diff"] == r8["final_val_loss"] - r32["final_val_loss"]
        assert abs(row["diff"]) < 0.05  # 4 steps from the same start: the state's rounding barely shows yet
        # The control: the same 8-bit run with another stochastic-rounding stream.
        rc = runs[("novograd_8bit_qseed1", row["lr"], row["seed"])]
        assert rc["quant"] == dict(eb["settings"], quant_seed=1) and row["q8_control"] == rc["final_val_loss"]
    sweep_keys = [r["key"] for r in data["runs"] if r["optimizer"] == "novograd" and r["seed"] == 0]
    assert len(sweep_keys) == len(set(sweep_keys))  # the sweep's 32-bit runs were reused, not run again
    assert eb["met"] == all(abs(r["diff"]) <= 0.02 for r in eb["rows"])
    # 8-bit: one byte per element, one fp32 scale per block, one fp32 per tensor: well under 32-bit's 4 bytes.
    assert n_params < eb["state_bytes"] < 0.5 * eb["state_bytes_fp32"]
    assert eb["state_bytes_fp32"] == s["novograd"]["state_bytes"]
    assert eb["state_bytes_adamw"] == s["adamw"]["state_bytes"]
    for name in ("novograd", "adamw", "sgd"):
        assert s[name]["best_val_loss"] < 8.5  # ln(4096) = 8.32 at init; nothing diverged in 4 steps
    assert not s["big_batch"]["diverged"]
    page = doc.read_text()
    assert "| state bytes at most 0.51x AdamW's |" in page
    assert "## What was tried where NovoGrad trails" in page
    assert "| 8-bit NovoGrad state within 0.02 of 32-bit at every rate and seed (this study) |" in page
    assert "## 8-bit NovoGrad state against 32-bit" in page
    assert "| learning rate | seed | 32-bit | 8-bit | 8-bit minus 32-bit | 8-bit, quant_seed=1 | its minus 8-bit |" in page
    assert (doc.parent / "study_lr_sweep.png").stat().st_size > 1000
    assert (doc.parent / "study_curves.png").stat().st_size > 1000
