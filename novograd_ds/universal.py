"""``python -m novograd_ds.universal``: DeepSpeed's universal-checkpoint conversion for NovoGrad checkpoints.

Same options as ``python -m deepspeed.checkpoint.ds_to_universal``; see
:mod:`novograd_ds.integrations.universal`.
"""

import sys

from .integrations.universal import main

if __name__ == "__main__":
    sys.exit(main())
