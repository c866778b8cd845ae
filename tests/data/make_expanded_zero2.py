"""Write tests/data/expanded_zero2/: a ZeRO-2 checkpoint in NovoGrad's first (expanded) checkpoint format.

Kept for the record of how the fixture was made; it only writes the *expanded* format when run on a commit whose
``NovoGrad.state_dict()`` still expands the per-layer second moment (main at 997ee90 and before). Run from the
repository root on such a commit:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 NOVOGRAD_DS_DISABLE_NATIVE=1 PYTHONPATH=. python tests/data/make_expanded_zero2.py

Two CPU ranks (gloo), ZeRO-2, the model of tests/test_checkpoints.py (FixtureNet), 3 optimizer steps, save (tag
"s3"), then 3 more steps; ``expected.pt`` holds what those 3 more steps gave (every parameter, fp32) and the
per-layer second moments at the save, so a later version can check that it loads this checkpoint and continues
exactly as the version that wrote it did.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for dist_harness and test_checkpoints' model

OUT = os.path.join(HERE, "expanded_zero2")


def worker(rank, world_size, out):
    import deepspeed

    import novograd_ds  # noqa: F401
    from test_checkpoints import fixture_config, fixture_engine, fixture_params, fixture_steps

    engine = fixture_engine(deepspeed, fixture_config(world_size))
    fixture_steps(engine, rank, world_size, range(3))
    engine.save_checkpoint(out, tag="s3")
    opt = engine.basic_optimizer
    v = {}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for lay in opt._layouts.values():
        for k, p in enumerate(lay.layer_params):
            v[names[id(p)]] = float(opt.state[lay.tensor]["exp_avg_sq_layer"][k])
    fixture_steps(engine, rank, world_size, range(3, 6))
    return {"params": fixture_params(engine), "v": v}


def main():
    from dist_harness import run_ranks

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    results = run_ranks(worker, 2, OUT)
    os.remove(os.path.join(OUT, "zero_to_fp32.py"))
    import deepspeed
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    torch.save({"params": results[0]["params"], "v": results[0]["v"], "commit": commit,
                "deepspeed": deepspeed.__version__, "torch": torch.__version__}, os.path.join(OUT, "expected.pt"))
    sd = torch.load(os.path.join(OUT, "s3", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
    for i, st in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].items():
        print("group", i, {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in st.items()})
    print("commit", commit, "deepspeed", deepspeed.__version__)


if __name__ == "__main__":
    main()
