"""What every command that writes an output (a folder or a file) checks first, and OS errors as one line.

* :func:`check_output`: one check for ``OUT`` before any work — never the source itself, inside it or
  around it; an existing ``OUT`` only when it is what the command itself wrote earlier (and, where the
  command has the flag, with ``--overwrite``); a path whose folder can actually be written (a probe file
  is created and removed). The writers then build under a temporary name beside ``OUT`` and rename it
  into place when complete (:mod:`mptkit.utils.fs`).
* :func:`describe_os_error`: an ``OSError`` (disk full, permission denied, read-only file system, a file
  where a folder is expected, …) or the ``RuntimeError`` that torch / safetensors raise for a failed write
  ("basic_ios::clear: iostream error") as one line: what failed, the path, what to do.
* :func:`write_errors`: a context manager that turns those errors into the command's own
  :class:`~mptkit.errors.MPTKitError` subclass, naming the path being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mptkit.errors import MPTKitError
from mptkit.utils.fs import real_path

# Text of the errors torch.save (C++ streams) and safetensors raise when a write fails, e.g. on a full disk.
_IO_RUNTIME_MARKERS = ("basic_ios::clear", "iostream error", "file write failed", "unexpected pos",
                       "No space left on device", "StorageFull", "IoError(", "Disk quota exceeded")

_HINTS = {  # what to do, after the OS's own reason
    errno.ENOSPC: "the disk is full{free}: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up{free}: free some space or write somewhere else",
    errno.EACCES: "check the permissions of the folder or choose another path",
    errno.EPERM: "check the permissions of the folder or choose another path",
    errno.EROFS: "choose a location on a writable file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "a file was expected: give a file path",
    errno.ENOENT: "check the path",
    errno.ELOOP: "a symbolic link loop: fix or remove the link",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "raise the open-files limit (ulimit -n)",
    errno.ENFILE: "close some programs or raise the system's open-files limit",
    errno.EIO: "the device reported an error: check the disk",
    errno.EXDEV: "write the output on the same file system",
}


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed write that the OS or a writer library reports: an ``OSError`` carrying an
    errno, or torch's / safetensors' runtime error for a failed stream ("basic_ios::clear: iostream error")."""
    if isinstance(e, OSError):
        return e.errno is not None
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        text = str(e)
        return any(m in text for m in _IO_RUNTIME_MARKERS)
    return False


def _existing(p: Path) -> Path | None:
    """``p`` or its nearest existing ancestor."""
    p = Path(os.path.abspath(p))
    while True:
        try:
            if p.exists():
                return p
        except OSError:
            pass
        if p.parent == p:
            return None
        p = p.parent


def free_space(path: str | os.PathLike | None) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing ancestor), or None."""
    if path is None:
        return None
    p = _existing(Path(path))
    if p is None:
        return None
    try:
        return shutil.disk_usage(p if p.is_dir() else p.parent).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def describe_os_error(e: BaseException, path: str | os.PathLike | None = None, doing: str = "cannot write") -> str:
    """One line for a failed file operation: ``{doing} {path}: {reason}; {what to do}``.

    ``path``: what was being written or read, when the error does not name it (torch's and safetensors'
    errors never do). For torch's "basic_ios::clear: iostream error" the free space on that disk decides
    between "the disk is full" and "the write failed"."""
    where = getattr(e, "filename", None) or path
    head = " ".join(str(x) for x in (doing, where) if x)

    def line(msg: str) -> str:
        return f"{head}: {msg}" if head else msg

    if isinstance(e, OSError) and e.errno is not None:
        free = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            f = free_space(where)
            free = f" ({_size(f)} free now)" if f is not None else ""
        hint = _HINTS.get(e.errno, "").format(free=free)
        reason = e.strerror or os.strerror(e.errno)
        return line(reason + (f"; {hint}" if hint else ""))
    if isinstance(e, UnicodeDecodeError):
        return line(f"not valid UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8")
    if isinstance(e, UnicodeError):
        return line(f"a text encoding error ({e}); the text must be valid Unicode (UTF-8)")
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if any(m in str(e) for m in ("No space left on device", "StorageFull", "Disk quota exceeded")):
        f = free_space(where)
        return line(f"the disk is full{f' ({_size(f)} free now)' if f is not None else ''}: free some space or "
                    "write somewhere else")
    if is_write_failure(e):
        f = free_space(where)
        if f is not None and f < (256 << 20):
            return line(f"the disk is full ({_size(f)} free): free some space or write somewhere else ({text})")
        free = f" ({_size(f)} free now)" if f is not None else ""
        return line(f"the write failed ({text}): the disk may have filled up during the write{free}, or the file "
                    "system failed; check the disk and run again")
    return line(f"{type(e).__name__}: {text}")


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, error: type[MPTKitError] = MPTKitError,
                 doing: str = "cannot write") -> Iterator[None]:
    """Turn a failed write inside the block (see :func:`is_write_failure`) into ``error``, one line naming
    ``path`` (or the file the OS error names). Other exceptions pass through unchanged."""
    try:
        yield
    except MPTKitError:
        raise
    except Exception as e:
        if is_write_failure(e):
            raise error(describe_os_error(e, path, doing)) from e
        raise


def _related(a: Path, b: Path) -> str | None:
    """How output ``a`` relates to ``b``: 'is', 'inside', 'contains' or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    if a in b.parents:
        return "contains"
    return None


def check_writable(folder: str | os.PathLike, flag: str, error: type[MPTKitError] = MPTKitError,
                   out: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, a folder that cannot be written: creates and removes a probe file in
    ``folder`` (or in its nearest existing ancestor, where the missing folders would be created)."""
    shown = out if out is not None else folder
    p = _existing(Path(folder))
    if p is None:
        raise error(f"{flag} {shown}: no existing folder on its path")
    if not p.is_dir():
        raise error(f"{flag} {shown}: {p} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mptkit-write-test-", suffix=".tmp", dir=p)  # a temporary name
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise error(f"{flag} {shown}: " + describe_os_error(e, p, "cannot write in")) from None


def check_output(
    out: str | os.PathLike,
    *,
    kind: str = "folder",
    flag: str = "OUT",
    sources: Iterable[str | os.PathLike] = (),
    inputs: Iterable[str | os.PathLike] = (),
    replaceable: Callable[[Path], bool] | None = None,
    earlier: str = "an earlier output of this command",
    overwrite: bool | None = False,
    error: type[MPTKitError] = MPTKitError,
) -> Path:
    """Check an output path before any work; raise ``error`` (one line naming ``flag`` and the path) when

    * ``out`` is, lies inside, or contains one of ``sources`` (the model being exported: writing there
      would destroy what is being read), or is or contains one of ``inputs`` (``inputs`` may hold it: a
      prepared folder inside its corpus folder is never read back);
    * ``out`` exists as the wrong kind (``kind``: ``"folder"`` or ``"file"``);
    * ``out`` exists (a non-empty folder, or a file) and ``replaceable(out)`` is false: only what this
      command itself wrote earlier (``earlier`` names it in the message) is ever replaced;
    * it is replaceable but ``overwrite`` is False (``--overwrite`` is needed); ``overwrite=None``: the
      command replaces its earlier output without a flag (a re-run of ``data prepare``);
    * the folder holding ``out`` (and an existing ``out`` folder) cannot be written (a probe file is
      created and removed there).

    Returns ``Path(out)``. Symbolic links are followed for the comparisons.
    """
    out = Path(out)
    o = real_path(out)
    for s in sources:
        rel = _related(o, real_path(s))
        if rel is not None:
            what = {"is": "is", "inside": "is inside", "contains": "contains"}[rel]
            raise error(f"{flag} {out}: {what} the source {s}; writing it would replace the source: choose "
                        "another path")
    for s in inputs:
        rel = _related(o, real_path(s))
        if rel in ("is", "contains"):
            raise error(f"{flag} {out}: {'is' if rel == 'is' else 'contains'} the input {s}; writing it would "
                        "replace the input: choose another path")
    exists = out.exists() or out.is_symlink()
    if exists and kind == "folder":
        if not out.is_dir():
            raise error(f"{flag} {out}: exists and is a file, not a folder; choose a folder path")
        if any(out.iterdir()):
            if replaceable is None or not replaceable(out):
                raise error(f"{flag} {out}: exists and is not empty, and is not {earlier}; refusing to replace it "
                            "(choose a new or empty folder)")
            if overwrite is False:
                raise error(f"{flag} {out}: exists and is not empty (it holds {earlier}); pass --overwrite to "
                            "replace it")
    elif exists:
        if out.is_dir():
            raise error(f"{flag} {out}: is a folder; give the path of the file to write")
        if replaceable is None or not replaceable(out):
            raise error(f"{flag} {out}: exists and is not {earlier}; refusing to replace it (choose another "
                        "file name)")
        if overwrite is False:
            raise error(f"{flag} {out}: exists; pass --overwrite to replace it")
    check_writable(out.parent, flag, error, out=out)  # the temporary output is made beside OUT
    if kind == "folder" and out.is_dir():
        check_writable(out, flag, error)
    return out


__all__ = ["check_output", "check_writable", "describe_os_error", "free_space", "is_write_failure", "write_errors"]
