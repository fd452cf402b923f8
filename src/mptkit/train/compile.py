"""``compile_config`` (llm-foundry's key, passed to composer, which ``torch.compile``s the model with these
options): mptkit compiles each transformer block for training (``block.compile(**compile_config)``, in place,
so checkpoints, FSDP units and the optimizer see the same parameters and names). ``compile_config: {}``
compiles with torch's defaults; null (the default) does not compile.

On CPU the compiled blocks were measured no faster than eager for mptkit's models (docs/training.md,
compile_config), so there the key is accepted and the blocks run eagerly, with a warning saying so;
``MPTKIT_COMPILE_ON_CPU=1`` compiles anyway.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from mptkit.errors import ConfigError

log = logging.getLogger(__name__)

# torch.compile's keyword arguments (what composer passes compile_config as)
COMPILE_KEYS = {"fullgraph", "dynamic", "backend", "mode", "options", "disable"}


def check_compile_config(d) -> dict:
    if not isinstance(d, dict):
        raise ConfigError("compile_config: expected a mapping of torch.compile options (mode, backend, fullgraph, "
                          f"dynamic, options, disable), or {{}} for torch's defaults; got {d!r}")
    from mptkit.train.sections import _check_keys

    _check_keys(d, COMPILE_KEYS, "compile_config")
    if "mode" in d and d["mode"] not in (None, "default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"):
        raise ConfigError(f"compile_config.mode: {d['mode']!r} is not a torch.compile mode (default, "
                          "reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")
    if "options" in d and not isinstance(d["options"], (dict, type(None))):
        raise ConfigError("compile_config.options: expected a mapping of inductor options")
    return d


def compile_blocks(model: nn.Module, compile_config: dict, device_type: str) -> int:
    """``torch.compile`` each of ``model``'s transformer blocks in place; returns how many were compiled (0 when
    skipped: ``disable: true``, or on CPU, see the module docstring)."""
    kw = dict(compile_config)
    if kw.get("disable"):
        log.info("compile_config.disable: true: the blocks run eagerly")
        return 0
    if device_type != "cuda" and os.environ.get("MPTKIT_COMPILE_ON_CPU", "") in ("", "0"):
        log.warning("compile_config: the blocks run eagerly on %s (compiled blocks were measured no faster there; "
                    "docs/training.md); MPTKIT_COMPILE_ON_CPU=1 compiles them anyway", device_type)
        return 0
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ConfigError(f"compile_config: mptkit compiles MPT blocks; {type(model).__name__} has none")
    for b in blocks:
        b.compile(**kw)
    log.info("compile_config: compiled %d blocks with torch.compile(%s)", len(blocks),
             ", ".join(f"{k}={v!r}" for k, v in kw.items()))
    return len(blocks)
