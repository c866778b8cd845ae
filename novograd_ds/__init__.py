"""novograd_ds: NovoGrad for DeepSpeed and Megatron.

``from novograd_ds import NovoGrad``. See README.md for the update rule and the DeepSpeed integration.
"""

from .optimizer import NovoGrad

__version__ = "0.1.0"

__all__ = ["NovoGrad", "__version__"]
