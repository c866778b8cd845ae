"""Environment report, in the spirit of ``ds_report``: ``python -m novograd_ds.env``.

Prints the versions of what novograd_ds works with, each backend (whether it can be used here, and why not),
and the state of the DeepSpeed integration. It never builds anything; ``--build`` builds the native ops first.

``--check`` instead runs every usable backend on every visible device against the float64 rule (and the fused
ops' self-check), one line per check, and exits 1 when one fails (:mod:`novograd_ds.testing.check`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover - depends on the machine
        return f"{exe} (version unknown: {e})"
    line = next((ln for ln in reversed(out) if ln.strip()), "") if cmd[0] == "nvcc" else (out[0] if out else "")
    return f"{line} ({exe})"


def versions() -> list[tuple[str, str]]:
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    rows = [
        ("python", platform.python_version()),
        ("novograd-ds", _version("novograd-ds")),
        ("torch", f"{torch.__version__} (CUDA {cuda}; GPU available: {torch.cuda.is_available()})"),
        ("deepspeed", _version("deepspeed")),
        ("transformers", _version("transformers")),
        ("accelerate", _version("accelerate")),
        ("ninja", _version("ninja")),
        ("C++ compiler", _tool_version([os.environ.get("CXX", "c++"), "--version"])),
        ("nvcc", _tool_version(["nvcc", "--version"])),
        ("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", "(unset: torch's default cache)")),
    ]
    return rows


def backends(build: bool = False) -> list[dict]:
    rows = [
        dict(name="reference", available=True, reason="pure PyTorch, one tensor at a time", build_dir=""),
        dict(name="foreach", available=True, reason="pure PyTorch torch._foreach_* ops", build_dir=""),
    ]
    try:
        from .kernels import native

        describe = getattr(native, "describe", None)
        if describe is None:
            rows.append(dict(name="fused", available=False, reason="this build has no native ops", build_dir=""))
        else:
            rows.extend(describe(build=build) if build else describe())
    except Exception as e:  # the report must print even when a backend is broken
        rows.append(dict(name="fused", available=False, reason=f"error while probing: {e!r}", build_dir=""))
    return rows


def deepspeed_integration() -> list[tuple[str, str]]:
    if importlib.util.find_spec("deepspeed") is None:
        return [("deepspeed integration", "deepspeed is not installed (pip install 'novograd-ds[deepspeed]')")]
    try:
        integ = importlib.import_module("novograd_ds.integrations.deepspeed")
    except Exception as e:
        return [("deepspeed integration", f"unavailable: {e!r}")]
    status = getattr(integ, "status", None)
    if status is None:
        return [("deepspeed integration", "present")]
    return list(status().items())


def report(build: bool = False, out=sys.stdout) -> None:
    w = out.write
    w("-" * 78 + "\nnovograd_ds environment report\n" + "-" * 78 + "\n")
    for name, value in versions():
        w(f"{name:<22} {value}\n")
    w("-" * 78 + "\nbackends (NovoGrad(fused=None) uses the first usable of: fused, foreach)\n" + "-" * 78 + "\n")
    w(f"{'backend':<14} {'usable':<8} detail\n")
    for row in backends(build=build):
        usable = "yes" if row["available"] else "NO"
        detail = row["reason"] + (f" [build dir: {row['build_dir']}]" if row.get("build_dir") else "")
        w(f"{row['name']:<14} {usable:<8} {detail}\n")
    w("-" * 78 + "\nDeepSpeed integration\n" + "-" * 78 + "\n")
    for name, value in deepspeed_integration():
        w(f"{name:<22} {value}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m novograd_ds.env", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build (or load) the native ops before reporting")
    parser.add_argument("--check", action="store_true",
                        help="run every usable backend on every visible device against the float64 rule (builds the "
                             "native ops if needed); one line per check, exit status 1 on any failure")
    parser.add_argument("--device", action="append", metavar="DEV",
                        help="with --check: only this device (cpu, cuda, cuda:1; repeatable)")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="with --check: only this backend (reference, foreach, fused-cpu, fused-cuda; repeatable)")
    parser.add_argument("--inject-fault", metavar="BACKEND",
                        help="with --check: perturb BACKEND's updates by 1e-3 (e.g. fused-cpu), to see a check fail")
    args = parser.parse_args(argv)
    if args.check:
        from .testing.check import run_checks

        return 1 if run_checks(inject_fault=args.inject_fault, only=args.device, backends=args.backend) else 0
    report(build=args.build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
