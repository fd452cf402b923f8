"""argparse ``type=`` checks for flags several commands share: a bad value is an argparse error naming the
flag (``mptkit generate: error: argument --device: ...``, exit 2), found before any model is read."""

from __future__ import annotations

import argparse


def threads(value: str) -> int:
    """``--threads N``: torch CPU threads, 1 or more."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number of threads, 1 or more")
    return n


def _device(value: str, allow_auto: bool) -> str:
    import torch

    if allow_auto and value == "auto":
        return value
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{value!r}: not a device; use cpu, cuda, cuda:1, mps" + (" or auto" if allow_auto else "")) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{value}: CUDA is not available on this machine ({why}); use "
                                             "--device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{value}: no such CUDA device ({n} visible: cuda:0 .. cuda:{n - 1}); "
                                             "use one of those or --device cpu")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available on this machine; use --device cpu")
    return value


def device(value: str) -> str:
    """``--device``: cpu, cuda, cuda:N (that exists), mps — checked against this machine."""
    return _device(value, allow_auto=False)


def device_or_auto(value: str) -> str:
    """``--device``: as :func:`device`, or ``auto`` (CUDA when available, else CPU)."""
    return _device(value, allow_auto=True)


__all__ = ["device", "device_or_auto", "threads"]
