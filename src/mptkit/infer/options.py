"""The decode path's options: one frozen dataclass given to ``Generator`` (and through it to the KV cache, the
fast decoder and the serving engine) instead of module globals and environment variables read at call time.

Environment variables are only the defaults (read when a :class:`DecodeOptions` is made):
``MPTKIT_CPU_KERNELS=0`` (no compiled CPU kernels) and ``MPTKIT_KEEP_OPENMP_POOL=1`` (the engine keeps the
starting thread's OpenMP pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mptkit.errors import InferenceError
from mptkit.model.fastpath import env_flag


@dataclass(frozen=True)
class DecodeOptions:
    """``cpu_kernels``: use mptkit's compiled CPU decode kernels where they build (default from
    ``MPTKIT_CPU_KERNELS``, unset: on). ``small_rows``: decode batches up to this many rows run the linears on
    the small-M kernel, larger ones ``torch.mm``. ``skip_min_past``: prefill chunks after this many cached
    tokens look for far keys an ALiBi head gives weight 0, and leave them out. ``keep_openmp_pool``: the engine
    does not hand back the starting thread's OpenMP workers (default from ``MPTKIT_KEEP_OPENMP_POOL``, unset:
    off; for comparisons). ``quant_int_dot``: quantised linears (``--quant``) round each decode row's activations
    to q8_0 blocks and take integer dot products, as llama.cpp does (faster; not the exact dequantise-then-matmul
    arithmetic: the activations' rounding is added; False: the exact path; default from ``MPTKIT_QUANT_INT_DOT``,
    unset: on)."""

    cpu_kernels: bool = field(default_factory=lambda: env_flag("MPTKIT_CPU_KERNELS", True))
    small_rows: int = 16
    skip_min_past: int = 2048
    keep_openmp_pool: bool = field(default_factory=lambda: env_flag("MPTKIT_KEEP_OPENMP_POOL", False))
    quant_int_dot: bool = field(default_factory=lambda: env_flag("MPTKIT_QUANT_INT_DOT", True))

    def __post_init__(self) -> None:
        for name in ("small_rows", "skip_min_past"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InferenceError(f"decode option {name} must be a whole number >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DecodeOptions:
        """From a recipe or server section (e.g. ``decode: {cpu_kernels: false}``); an unknown key is an error."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise InferenceError(f"decode options: unknown option(s) {bad}; known: {sorted(known)}")
        return cls(**d)


__all__ = ["DecodeOptions"]
