"""mptkit: pretrain, finetune, evaluate and serve MPT-style language models."""

__version__ = "0.1.0"

from mptkit.errors import MPTKitError

__all__ = ["MPTKitError", "__version__"]
