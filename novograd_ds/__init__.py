"""novograd_ds: NovoGrad for DeepSpeed, PyTorch FSDP2 and Megatron.

``from novograd_ds import NovoGrad``. See README.md for the update rule and the DeepSpeed integration.

Importing the package registers NovoGrad with DeepSpeed when DeepSpeed is importable (so a DeepSpeed config can
say ``"optimizer": {"type": "NovoGrad"}``), unless ``NOVOGRAD_DS_AUTOREGISTER=0``. Then call :func:`register`
yourself before ``deepspeed.initialize``, or :func:`bind` right after it.
"""

import importlib.util as _ilu
import os as _os

from .integrations import fsdp2 as _fsdp2
from .optimizer import NovoGrad

__version__ = "0.1.0"

__all__ = ["NovoGrad", "register", "unregister", "bind", "set_tensor_parallel_group", "__version__"]


def register(*, force: bool = False) -> bool:
    """Register NovoGrad with DeepSpeed; see :func:`novograd_ds.integrations.deepspeed.register`."""
    from .integrations.deepspeed import register as _register

    return _register(force=force)


def unregister() -> None:
    """Undo :func:`register`; see :func:`novograd_ds.integrations.deepspeed.unregister`."""
    from .integrations.deepspeed import unregister as _unregister

    _unregister()


def bind(engine):
    """Bind the engine's NovoGrad to DeepSpeed's flat partitions; see :func:`novograd_ds.integrations.deepspeed.bind`."""
    from .integrations.deepspeed import bind as _bind

    return _bind(engine)


def set_tensor_parallel_group(optimizer, group=None, *, mpu=None):
    """Sum TP-split layers' norms over a TP group; see :func:`novograd_ds.integrations.megatron.set_tensor_parallel_group`."""
    from .integrations.megatron import set_tensor_parallel_group as _set

    _set(optimizer, group, mpu=mpu)


# FSDP2 / DTensor parameters need no call: the optimizer asks this resolver about each parameter.
_fsdp2.install()

if _os.environ.get("NOVOGRAD_DS_AUTOREGISTER", "1") != "0" and _ilu.find_spec("deepspeed") is not None:
    register()
