"""launch/*, examples/* and the novograd_ds.run shim, each run for real with 2 CPU processes.

Every launcher runs the same tiny job (configs/zero2.json, 2 ranks, micro-batch 4, no accumulation) and is
compared with ONE reference: a single process with accumulation 2, which sees exactly the same sequences per
step. Multi-node launchers run as two "nodes" on this machine, 1 rank each:

* torchrun: two agents meeting at a static master address, and two agents meeting through c10d rendezvous;
* deepspeed: started on each node by hand (--no_ssh), and for real through pdsh -> ssh into the two hosts of a
  hostfile (localhost, 127.0.0.1), served by an sshd of the test's own (scripts/multinode_setup.sh);
* SLURM: launch/slurm.sbatch submitted with real sbatch to a two-node Slurm cluster of the test's own (slurmctld,
  two slurmd, munge; scripts/multinode_setup.sh), and also run with fake `srun`/`scontrol` on PATH (needs nothing
  installed).

The real ssh and Slurm tests need root and Debian's pdsh/openssh-server/slurmctld/slurmd/munge (`bash
scripts/multinode_setup.sh install`; .ci/run does it); without them they skip and say which is missing.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from subproc import child_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--max-steps", "3", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--seq-len", "64",
        "--micro-batch", "4", "--eval-batches", "2", "--eval-interval", "3", "--no-progress"]
CONFIG = "configs/zero2.json"
SETUP = ROOT / "scripts" / "multinode_setup.sh"

pytestmark = pytest.mark.slow


def _env(**extra) -> dict[str, str]:
    return child_env(**extra)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=600):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def _run_nodes(cmds_envs, timeout=600):
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in cmds_envs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _run([sys.executable, "-m", "novograd_ds.train", "--deepspeed-config", CONFIG, "--out", str(out), *TINY,
          "--grad-accum", "2"], _env())
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 1 and m["basic_optimizer_is_novograd"]
    return m


def _check(out: Path, reference, world=2):
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == world and m["steps"] == 3
    assert m["basic_optimizer_is_novograd"] and m["basic_optimizer"] == "novograd_ds.optimizer.NovoGrad"
    assert m["optimizer_wrapper"] == "DeepSpeedZeroOptimizer"
    assert m["val_loss"] < m["initial_val_loss"] - 0.05
    assert [h[1] for h in m["train_history"]] == pytest.approx([h[1] for h in reference["train_history"]], abs=2e-4)
    assert m["val_loss"] == pytest.approx(reference["val_loss"], abs=2e-4)
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest").is_file()
    return m


def test_deepspeed_launcher_one_node(tmp_path, reference):
    out = tmp_path / "run"
    _run(["bash", "launch/deepspeed_single_node.sh", *TINY],
         _env(NUM_GPUS=2, MASTER_PORT=_port(), CONFIG=CONFIG, OUT=out))
    _check(out, reference)


def test_deepspeed_launcher_two_nodes_hostfile(tmp_path, reference):
    """The multi-node script with a two-host hostfile, started on each "node" (NO_SSH=1, NODE_RANK=i)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "run", _port()
    common = dict(HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NO_SSH=1, CONFIG=CONFIG, OUT=out)
    _run_nodes([(["bash", "launch/deepspeed_multi_node.sh", *TINY], _env(NODE_RANK=i, **common)) for i in (0, 1)])
    _check(out, reference)


def test_torchrun_one_node(tmp_path, reference):
    out = tmp_path / "run"
    _run(["bash", "launch/torchrun.sh", *TINY], _env(NPROC_PER_NODE=2, MASTER_PORT=_port(), CONFIG=CONFIG, OUT=out))
    _check(out, reference)


def test_torchrun_two_nodes_one_rendezvous(tmp_path, reference):
    out, port = tmp_path / "run", _port()
    common = dict(NNODES=2, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CONFIG=CONFIG, OUT=out)
    _run_nodes([(["bash", "launch/torchrun.sh", *TINY], _env(NODE_RANK=i, **common)) for i in (0, 1)])
    _check(out, reference)


def test_torchrun_two_agents_c10d_rendezvous(tmp_path, reference):
    """Two torchrun agents (one per "node", 1 rank each) that meet through c10d rendezvous: no NODE_RANK and no
    MASTER_ADDR; the agent that binds the endpoint serves the store, the other joins it, ranks are assigned."""
    out, port = tmp_path / "run", _port()
    common = dict(NNODES=2, NPROC_PER_NODE=1, RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"test-c10d-{port}",
                  CONFIG=CONFIG, OUT=out)
    outs = _run_nodes([(["bash", "launch/torchrun.sh", *TINY], _env(**common)) for _ in (0, 1)])
    _check(out, reference)
    assert sum("[novograd_ds.train] done" in o for o in outs) == 1  # exactly one agent got global rank 0


def _setup(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *map(str, args)], capture_output=True, text=True, timeout=120)


def _start(part: str, tmp_path_factory, *args):
    """Starts sshd or the Slurm cluster under a fresh directory; skips (with the reason) where it cannot run."""
    why = _setup("check", part)
    if why.returncode:
        pytest.skip(f"real multi-node launch ({part}): {why.stdout.strip()}")
    d = tmp_path_factory.mktemp(part)
    r = _setup(f"{'sshd' if part == 'ssh' else part}-start", d, *args)
    if r.returncode:
        _setup("stop", d)
        pytest.fail(f"scripts/multinode_setup.sh could not start {part}:\n{r.stdout}\n{r.stderr}")
    return d


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 with its own host key, accepting root with a key made for the test. `bin/ssh` runs
    /usr/bin/ssh with the test's ssh config (that key, no host key checks); ~/.ssh is never read or written."""
    port = _port()
    d = _start("ssh", tmp_path_factory, port)
    yield SimpleNamespace(dir=d, port=port, bin=d / "bin", log=d / "sshd.log")
    _setup("stop", d)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real two-node Slurm cluster on this machine: munged, slurmctld and two slurmd (node1, node2)."""
    d = _start("slurm", tmp_path_factory, _port(), _port(), _port())
    yield SimpleNamespace(dir=d, conf=d / "slurm.conf")
    _setup("stop", d)


# What a rank needs from the test's environment (tests/subproc.py child_env). ssh starts a login environment, so
# the deepspeed launcher must carry these to the remote side: DeepSpeed exports PYTHON* itself and the
# KEY=VALUE lines of ~/.deepspeed_env, or of the file DS_ENV_FILE names.
REMOTE_ENV = ("DS_ACCELERATOR", "NOVOGRAD_DS_CACHE", "NOVOGRAD_DS_DISABLE_NATIVE", "OMP_NUM_THREADS",
              "TORCH_EXTENSIONS_DIR", "PATH")


def test_deepspeed_launcher_two_nodes_pdsh_ssh(tmp_path, sshd, reference):  # sshd first: skip before the reference run
    """The multi-node script's own path: deepspeed -> pdsh -> ssh into both hosts of a two-entry hostfile (both
    this machine), each host running deepspeed.launcher.launch --node_rank=%n with the same venv python."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, ds_env = tmp_path / "run", tmp_path / "deepspeed_env"
    env = _env(HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1", MASTER_PORT=_port(), SSH_PORT=sshd.port, CONFIG=CONFIG,
               OUT=out, DS_ENV_FILE=ds_env)  # an absolute DS_ENV_FILE replaces ~/.deepspeed_env
    env["PATH"] = f"{sshd.bin}{os.pathsep}{env['PATH']}"  # ssh = /usr/bin/ssh -F <the test's ssh config>
    ds_env.write_text("".join(f"{k}={env[k]}\n" for k in REMOTE_ENV if k in env))
    logins = sshd.log.read_text().count("Accepted publickey for")
    r = _run(["bash", "launch/deepspeed_multi_node.sh", *TINY], env)
    _check(out, reference)
    text = r.stdout + r.stderr
    assert "cmd = pdsh" in text and "localhost: " in text and "127.0.0.1: " in text  # pdsh's per-host prefixes
    assert "node_rank=0" in text and "node_rank=1" in text
    # DeepSpeed's ssh check, then one pdsh session per host
    assert sshd.log.read_text().count("Accepted publickey for") - logins == 3


def _wait_for_job(job: str, env, timeout=600) -> str:
    """Polls the job until Slurm reports an end state (sbatch --wait sleeps 2, 8, then 32 s between its polls)."""
    deadline = time.monotonic() + timeout
    while True:
        info = subprocess.run(["scontrol", "show", "job", "--oneliner", job], env=env, capture_output=True,
                              text=True).stdout
        state = info.split("JobState=", 1)[1].split()[0] if "JobState=" in info else "UNKNOWN"
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env)
            pytest.fail(f"Slurm job {job} still {state} after {timeout} s:\n{info}")
        time.sleep(0.5)


def test_slurm_sbatch_real_cluster(tmp_path, slurm, reference):
    """launch/slurm.sbatch submitted with real sbatch to a two-node Slurm cluster; srun starts
    launch/slurm_node.sh on node1 and node2 (one slurmd each), each starts torchrun with 1 rank."""
    out, log = tmp_path / "run", tmp_path / "slurm-%j.out"
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}  # not the allocation we may run in
    env.update(SLURM_CONF=str(slurm.conf), GPUS_PER_NODE="1", MASTER_PORT=str(_port()), CONFIG=CONFIG, OUT=str(out))
    # The script asks for 8 GPUs and 32 CPUs per node; these nodes have 1 CPU and no GPU: override on the command
    # line (sbatch's options win over #SBATCH lines), as one would on a smaller partition.
    r = _run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
              "launch/slurm.sbatch", *TINY], env)
    job = r.stdout.strip().split(";")[0]
    info = _wait_for_job(job, env)
    job_out = Path(str(log).replace("%j", job))
    text = job_out.read_text() if job_out.is_file() else "(no job output)"
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, f"{info}\n{text[-4000:]}"
    assert "NumNodes=2" in info and "NodeList=node[1-2]" in info, info
    _check(out, reference)


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_sbatch_script(tmp_path, reference):
    """Runs launch/slurm.sbatch as sbatch would, with a fake srun that starts one task per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && '
                                      'tr "," "\\n" <<< "$3"\n')
    _executable(bin_dir / "srun", """#!/usr/bin/env bash
# fake srun: drop srun options, start the command once per node with SLURM's per-task variables
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
""")
    out = tmp_path / "run"
    env = _env(SLURM_JOB_ID=4242, SLURM_NNODES=2, SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=2,
               SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE=1, MASTER_PORT=_port(), CONFIG=CONFIG, OUT=out)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    _run(["bash", "launch/slurm.sbatch", *TINY], env)
    _check(out, reference)


def test_accelerate_hf_trainer(tmp_path):
    """accelerate launch (DeepSpeed plugin, 2 processes) + transformers.Trainer + configs/hf_zero2.json."""
    out = tmp_path / "hf"
    _run(["accelerate", "launch", "--config_file", "launch/accelerate_deepspeed.yaml", "--main_process_port",
          str(_port()), "examples/hf_trainer_clm.py", "--deepspeed", "configs/hf_zero2.json", "--output_dir",
          str(out), "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "0.01",
          "--adam_beta1", "0.95", "--adam_beta2", "0.98", "--weight_decay", "0.001", "--n_layer", "1",
          "--n_embd", "64", "--n_head", "2", "--seq_len", "64", "--train_windows", "64", "--eval_windows", "8",
          "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"], _env())
    m = json.loads((out / "hf_metrics.json").read_text())
    assert m["basic_optimizer_is_novograd"] and m["optimizer_wrapper"] == "DeepSpeedZeroOptimizer"
    assert m["world_size"] == 2 and m["steps"] == 4
    assert m["betas"] == [0.95, 0.98] and m["weight_decay"] == pytest.approx(0.001)  # "auto" <- --adam_beta*
    assert m["last_train_loss"] < m["first_train_loss"] and m["eval_loss"] < m["first_train_loss"]


def test_run_shim_under_deepspeed_launcher(tmp_path):
    """An unmodified DeepSpeed script asking for "type": "NovoGrad" fails alone and works through the shim."""
    alone = subprocess.run([sys.executable, "examples/plain_deepspeed.py", "--out", str(tmp_path / "alone")],
                           cwd=ROOT, env=_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=_port()),
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "NovoGrad is not a supported DeepSpeed Optimizer" in alone.stderr

    out = tmp_path / "shim"
    _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "--module", "novograd_ds.run",
          "examples/plain_deepspeed.py", "--out", str(out)], _env())
    m = json.loads((out / "result.json").read_text())
    assert m["basic_optimizer"] == "novograd_ds.optimizer.NovoGrad" and m["world_size"] == 2
    assert m["argv_local_rank"] == 0  # the launcher's --local_rank reached the script behind the shim
    assert m["losses"][-1] < 0.5 * m["losses"][0]
