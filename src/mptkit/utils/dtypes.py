"""Weight dtype names the CLI and the Python API accept (``--dtype``), and their torch dtypes.

The table maps to torch attribute names, so command modules can list the choices without importing torch."""

from __future__ import annotations

WEIGHT_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16"}


def torch_dtype(name: str):
    """The torch dtype for a name of :data:`WEIGHT_DTYPES` (KeyError for any other)."""
    import torch

    return getattr(torch, WEIGHT_DTYPES[name])
