"""Helpers for configuration keys: closest-match suggestions for misspelled names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate nearest to ``name`` (difflib ratio >= cutoff), or None."""
    m = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return m[0] if m else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or '' — to append to an error message."""
    c = closest(name, candidates)
    return f" (did you mean '{c}'?)" if c else ""
