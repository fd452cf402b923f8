"""Tokenizer files on disk: the one list of their names, the one loader, copying them, finding them.

A tokenizer is the transformers files in a folder (``tokenizer.json``, ``tokenizer_config.json``, ...; the
first four names of :data:`TOKENIZER_FILES` are the ones a tokenizer can be loaded from) or a single
``tokenizer.json`` file. Everything is read from local files only; nothing is ever downloaded.

This module imports nothing from ``mptkit.model`` (the data layer, which may not import the model, uses it).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mptkit.errors import DataError

log = logging.getLogger(__name__)

# Every file a transformers tokenizer may consist of (copied verbatim beside a model or into an export). The
# first four are those it can be loaded from: a folder holding none of them holds no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "mptkit_tokenizer.json",
)
LOADABLE_TOKENIZER_FILES = TOKENIZER_FILES[:4]


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a folder holding a file a tokenizer can be loaded from."""
    p = Path(folder)
    return p.is_dir() and any((p / n).is_file() for n in LOADABLE_TOKENIZER_FILES)


def load_tokenizer(path: Any, *, missing_ok: bool = False):
    """Load a local HF tokenizer: a tokenizer folder, a model folder holding tokenizer files, or a
    ``tokenizer.json`` file (an already loaded tokenizer is returned as it is). Never downloads.

    Raises :class:`DataError` naming the path when it is unusable; with ``missing_ok`` a folder that holds
    no tokenizer files gives None instead (e.g. a model folder saved without one)."""
    if not isinstance(path, (str, os.PathLike)):
        if hasattr(path, "encode") and hasattr(path, "get_vocab"):
            return path  # already a tokenizer
        raise DataError(f"expected a tokenizer folder, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        hint = (
            (
                " (a hub name? mptkit only reads local folders: download it first, e.g. "
                "`huggingface-cli download NAME --local-dir DIR`)"
            )
            if "/" in str(path) and not str(path).startswith((".", "/"))
            else ""
        )
        raise DataError(f"tokenizer {path}: no such file or folder{hint}")
    try:
        if p.is_file():
            if p.name.endswith(".json"):
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast(tokenizer_file=str(p), clean_up_tokenization_spaces=False)
            raise DataError(f"tokenizer {p}: expected a folder or a tokenizer.json file")
        if not has_tokenizer_files(p):
            if missing_ok:
                return None
            raise DataError(f"tokenizer {p}: the folder holds none of {', '.join(LOADABLE_TOKENIZER_FILES)}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types (OSError, ValueError, KeyError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer {p}: cannot be loaded ({type(e).__name__}: {msg})") from None
    if not getattr(tok, "is_fast", False):
        log.info("tokenizer %s is a slow (Python) tokenizer; preparing data with it is slower", p)
    return tok


def copy_tokenizer_files(src: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`) of folder ``src`` into ``folder``; returns their
    names. A file that already is the destination is left alone."""
    src, folder = Path(src), Path(folder)
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file() and f.resolve() != (folder / name).resolve():
            shutil.copyfile(f, folder / name)
            copied.append(name)
    return copied


def set_model_max_length(folder: str | os.PathLike, n: int) -> bool:
    """Make ``tokenizer_config.json`` in ``folder`` (if there is one) say ``model_max_length: n`` — the model's
    ``max_seq_len`` in an exported folder, so harnesses that size their inputs by the tokenizer (lm-eval's ``hf``
    backend, ``truncation=True``) never send transformers' MPT more tokens than it accepts. True if changed."""
    import json

    from mptkit.utils.fs import atomic_write_json

    f = Path(folder) / "tokenizer_config.json"
    if not f.is_file():
        return False
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: not readable JSON ({e}); fix or remove the file") from None
    if not isinstance(d, dict) or d.get("model_max_length") == n:
        return False
    d["model_max_length"] = int(n)
    atomic_write_json(f, d)
    return True


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """Put ``tokenizer`` (a transformers tokenizer, or a folder whose tokenizer files are copied) in ``folder``;
    None does nothing."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        copy_tokenizer_files(tokenizer, folder)
    else:
        tokenizer.save_pretrained(str(folder))


def find_tokenizer_folder(
    model_folder: Path, src: Path | None = None, explicit: str | os.PathLike | None = None
) -> Path | None:
    """Where the tokenizer files of a model are: ``explicit``, else the model folder, else ``src`` and its
    parents up to two levels (a run folder keeps the tokenizer beside its checkpoints), else the model
    folder's parents up to three levels (a checkpoint's run); a ``tokenizer/`` subfolder of any of these
    counts too. None when there is none; an ``explicit`` folder without tokenizer files is a
    :class:`DataError`."""
    if explicit is not None:
        e = Path(explicit)
        if not has_tokenizer_files(e):
            raise DataError(
                f"--tokenizer {e}: not a folder with tokenizer files ({', '.join(LOADABLE_TOKENIZER_FILES)})"
            )
        return e
    cands = [model_folder]
    if src is not None:
        cands += [src, *list(src.parents)[:2]]
    cands += list(model_folder.parents)[:3]
    for c in cands:
        if has_tokenizer_files(c):
            return c
        if has_tokenizer_files(c / "tokenizer"):
            return c / "tokenizer"
    return None
