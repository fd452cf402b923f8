"""Atomic file and folder writes, and checksums.

Nothing mptkit writes (weights, checkpoints, shards, manifests) may ever leave a half-written file
where a good one was: write to a temporary name in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def real_path(p: str | os.PathLike) -> Path:
    """``p`` absolute with every symbolic link followed; never raises on a symlink loop (``Path.resolve``
    does, on Python 3.11)."""
    return Path(os.path.realpath(p))


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, toggling it later races other threads


def _public_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create owner-only (0600/0700) entries; give the final file the mode a plain ``open``
    or ``mkdir`` would have (0666/0777 less the umask), so other users and containers can read exports."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if is_dir else 0o666) & ~_UMASK)


def publish_permissions(path: str | os.PathLike) -> None:
    """Give a finished output (a file, or a folder and the files in it) the permissions an ordinary write
    would have: temporary entries are created owner-only (0600/0700)."""
    path = Path(path)
    if path.is_dir():
        _public_mode(path, is_dir=True)
        for f in path.iterdir():
            if f.is_file():
                _public_mode(f, is_dir=False)
    elif path.is_file():
        _public_mode(path, is_dir=False)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (so a rename survives a power cut). No-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is fsynced and renamed onto ``final``.

    On an exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _public_mode(tmp_path, is_dir=False)
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` as a whole.

    An existing ``final`` is moved aside first and deleted only after the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        _public_mode(tmp, is_dir=True)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_dir(sub: str) -> Path:
    """``$MPTKIT_CACHE_DIR/<sub>`` (default ``$XDG_CACHE_HOME/mptkit`` or ``~/.cache/mptkit``): files mptkit
    derives and may rebuild at any time (compiled kernels, decompressed MDS shards)."""
    base = os.environ.get("MPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mptkit")
    return Path(base) / sub
