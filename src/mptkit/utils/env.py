"""Numbers read from environment variables (torchrun's ranks, mptkit's tuning knobs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def env_number(name: str, default: N, kind: Callable[[str], N], *,
               invalid: Callable[[str], Exception] | None = None) -> N:
    """``kind(os.environ[name])``; ``default`` when the variable is unset or empty. A value ``kind`` cannot
    read gives ``default`` too, or, with ``invalid``, raises ``invalid(value)``."""
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return kind(v)
    except ValueError:
        if invalid is None:
            return default
        raise invalid(v) from None


__all__ = ["env_number"]
