"""Run an unmodified training script with NovoGrad registered for DeepSpeed.

    python -m novograd_ds.run script.py [script args]        # or: -m some.module [args]
    deepspeed --num_gpus 8 --module novograd_ds.run script.py --deepspeed ds.json ...
    torchrun --nproc_per_node 8 -m novograd_ds.run script.py ...
    accelerate launch -m novograd_ds.run script.py ...

The shim imports :mod:`novograd_ds` (which makes ``"optimizer": {"type": "NovoGrad"}`` valid in a DeepSpeed
config) and then runs the script as ``__main__`` with :mod:`runpy`, with ``sys.argv`` and ``sys.path[0]`` as
if it had been started directly. The ``deepspeed`` launcher puts ``--local_rank=N`` *before* the script name
(it appends it to the module it starts); the shim moves it behind the script name, where the script expects it.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m novograd_ds.run script.py [args ...]  |  python -m novograd_ds.run -m module [args ...]"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading launcher options (--local_rank) and the rest."""
    lead = []
    while argv and (argv[0].startswith("--local_rank") or argv[0].startswith("--local-rank")):
        opt = argv.pop(0)
        lead.append(opt)
        if "=" not in opt and argv:
            lead.append(argv.pop(0))
    return lead, argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    lead, argv = _split(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2 if not argv else 0)

    import novograd_ds

    novograd_ds.register()  # idempotent; also covers NOVOGRAD_DS_AUTOREGISTER=0 (this shim exists to register)

    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        module, rest = argv[1], argv[2:]
        sys.argv = [module] + rest + lead
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"novograd_ds.run: error: {script}: no such script (give a path to a .py file, or -m module)",
              file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script] + rest + lead
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
