"""The ``mptkit`` command: one subcommand per job, each a thin wrapper over the Python API.

Each area registers its subcommands from a module of this package (``mptkit.cli.train``, ``mptkit.cli.infer``
…, named in ``COMMAND_MODULES``) that defines ``register(subparsers)``; a subcommand's handler is stored as ``func`` on its parser and receives the
parsed ``argparse.Namespace``. Handlers raise :class:`mptkit.errors.MPTKitError` for user errors: the
CLI prints one line (no traceback) unless ``--debug`` is given. So are the ordinary errors of the machine that
escape a handler: an ``OSError`` (disk full, permission denied, read-only file system, ...), a
``UnicodeError`` (a file that is not UTF-8), and torch's / safetensors' error for a failed write
("basic_ios::clear: iostream error"): one line saying what failed, where and what to do
(:func:`mptkit.utils.outputs.describe_os_error`); exit code 2. Any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mptkit import __version__
from mptkit.errors import EXIT_NOT_RETRYABLE, MPTKitError, TrainPreempted, not_retryable

# The modules of this package that add subcommands, one per area (each defines register(subparsers)).
COMMAND_MODULES = (
    "mptkit.cli.model",
    "mptkit.cli.data",
    "mptkit.cli.train",
    "mptkit.cli.infer",
    "mptkit.cli.eval",
    "mptkit.cli.export",
    "mptkit.cli.convert",
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
        importlib.import_module(name).register(sub)
    return p


def configure_cpu_numerics() -> bool:
    """Flush denormal floats to zero on CPU (ALiBi's far-away keys get probabilities ~e^-90, and x86 handles
    denormals far more slowly than normal floats, attention backward included). Must run before the first
    parallel op, since OpenMP workers inherit the setting when created. ``MPTKIT_KEEP_DENORMALS=1`` opts out.
    Returns whether flushing is on."""
    if os.environ.get("MPTKIT_KEEP_DENORMALS", "") not in ("", "0"):
        return False
    import torch

    return bool(torch.set_flush_denormal(True))


def _not_retryable_exit(e: BaseException) -> int:
    """`mptkit train` failed before its first step (or on its data): under torchrun, record it for the restarts
    of this same agent (``mptkit.train.restarts``), so they stop at once saying so instead of redoing the work."""
    from mptkit.train.restarts import record_not_retryable

    record_not_retryable(str(e))
    return EXIT_NOT_RETRYABLE


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
    except TrainPreempted as e:  # not an error: the checkpoint is saved, the same command resumes
        print(f"mptkit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except MPTKitError as e:
        if args.debug:
            raise
        print(f"mptkit {args.command}: error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", None)  # e.g. TrainDiverged's EXIT_DIVERGED (not to be retried)
        if code:
            return code
        if args.command == "train" and not_retryable(e):  # a retry fails the same way (docs/training.md)
            return _not_retryable_exit(e)
        return 2
    except Exception as e:
        from mptkit.utils.outputs import describe_os_error, is_write_failure

        if args.debug or not (isinstance(e, (OSError, UnicodeError)) or is_write_failure(e)):
            raise
        print(f"mptkit {args.command}: error: {describe_os_error(e, doing='')} (--debug for the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
