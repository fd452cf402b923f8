"""The ``mptkit`` command: one subcommand per job, each a thin wrapper over the Python API.

Each area registers its subcommands from a module named in ``COMMAND_MODULES`` that defines
``register(subparsers)``; a subcommand's handler is stored as ``func`` on its parser and receives the
parsed ``argparse.Namespace``. Handlers raise :class:`mptkit.errors.MPTKitError` for user errors: the
CLI prints one line (no traceback) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mptkit import __version__
from mptkit.errors import MPTKitError

# Modules that add subcommands (each defines register(subparsers)). Missing modules are skipped.
COMMAND_MODULES = (
    "mptkit.model.commands",
    "mptkit.data.commands",
    "mptkit.train.commands",
    "mptkit.infer.commands",
    "mptkit.eval.commands",
    "mptkit.export.commands",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mptkit",
        description="Pretrain, finetune, evaluate and serve MPT-style language models.",
    )
    p.add_argument("--version", action="version", version=f"mptkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return p


def configure_cpu_numerics() -> bool:
    """Flush denormal floats to zero on CPU (ALiBi's far-away keys get probabilities ~e^-90, and x86 handles
    denormals up to ~100x slower: ~4x on attention backward). Must run before the first parallel op, since
    OpenMP workers inherit the setting when created. ``MPTKIT_KEEP_DENORMALS=1`` opts out. Returns whether
    flushing is on."""
    if os.environ.get("MPTKIT_KEEP_DENORMALS", "") not in ("", "0"):
        return False
    import torch

    return bool(torch.set_flush_denormal(True))


def main(argv: list[str] | None = None) -> int:
    configure_cpu_numerics()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
        return int(rc or 0)
    except MPTKitError as e:
        if args.debug:
            raise
        print(f"mptkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
