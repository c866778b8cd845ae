"""The evidence study (benchmarks/study.py) keeps working: a tiny version, end to end, with its page."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    doc = tmp_path / "docs" / "results.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--out", str(tmp_path / "study"), "--tiny",
                    "--write-docs", str(doc)], check=True, timeout=900, cwd=ROOT)
    data = json.loads((tmp_path / "study" / "results.json").read_text())
    s = data["summary"]
    names = {r["optimizer"] for r in data["runs"]}
    assert names == {"novograd", "adamw", "sgd", "novograd+grad_averaging", "novograd_blocks+adamw_rest",
                     "adamw_blocks+novograd_rest"}
    assert set(s["variants"]) == names - {"novograd", "adamw", "sgd"}
    assert set(s["long"]) == {"novograd", "adamw"}
    n_params = data["runs"][0]["n_params"]
    n_tensors_bytes = s["novograd"]["state_bytes"] - 4 * n_params
    # Analytic state sizes: AdamW 2 fp32 per element (+ a 0-dim fp32 step per tensor); SGD momentum 1;
    # NovoGrad 1 per element + 1 fp32 per tensor.
    assert 0 < s["adamw"]["state_bytes"] - 8 * n_params < 4 * 100
    assert s["sgd"]["state_bytes"] == 4 * n_params
    assert 0 < n_tensors_bytes < 4 * 100  # one fp32 scalar per tensor, fewer than 100 tensors
    assert s["state_ratio_novograd_adamw"] <= 0.51
    for name in ("novograd", "adamw", "sgd"):
        assert s[name]["best_val_loss"] < 8.5  # ln(4096) = 8.32 at init; nothing diverged in 4 steps
    assert not s["big_batch"]["diverged"]
    page = doc.read_text()
    assert "| state bytes at most 0.51x AdamW's |" in page
    assert "## What was tried where NovoGrad trails" in page
    assert (doc.parent / "study_lr_sweep.png").stat().st_size > 1000
    assert (doc.parent / "study_curves.png").stat().st_size > 1000
