"""The one table of floating dtype names for the whole package: the three dtypes mptkit computes and stores in,
every spelling it accepts for them (CLI ``--dtype``/``--kv-dtype``, ``export_hf(dtype=)``, ``fsdp_config``'s
mixed precision, the recipe's ``precision``), and their torch dtypes.

The table maps to torch attribute names, so command modules can list the choices without importing torch."""

from __future__ import annotations

# short name -> torch attribute name: the floating dtypes mptkit computes and stores in
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# every spelling mptkit accepts -> short name (lower case)
ALIASES = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16",
}  # fmt: skip

# the recipe's ``precision`` -> the short name of the dtype it computes in (autocast's for the amp_* ones)
PRECISIONS = {"fp32": "fp32", "amp_bf16": "bf16", "amp_fp16": "fp16"}

# the weight / KV-cache dtype names of the commands (``--dtype``, ``--kv-dtype``): short and torch names
WEIGHT_DTYPES = {n: DTYPES[ALIASES[n]] for n in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")}


def torch_dtype(name: str):
    """The torch dtype for a name of :data:`WEIGHT_DTYPES` (KeyError for any other)."""
    import torch

    return getattr(torch, WEIGHT_DTYPES[name])


def any_torch_dtype(name: str):
    """The torch dtype for any spelling in :data:`ALIASES` or :data:`PRECISIONS` (KeyError for any other)."""
    import torch

    short = PRECISIONS.get(name) or ALIASES[name]
    return getattr(torch, DTYPES[short])


def torch_name(dtype) -> str:
    """The torch attribute name of one of the :data:`DTYPES` ("float32" for ``torch.float32``; KeyError for any
    other), as config.json's ``torch_dtype`` records it."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES.values():
        raise KeyError(dtype)
    return name
