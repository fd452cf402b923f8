"""Trainer checkpoints on disk, the read side: their layout, manifest verification, newest-valid lookup.

A checkpoint is a folder ``<save_folder>/ep{E}-ba{B}/``::

    model/              a complete HF-layout model folder (config.json, model.safetensors, tokenizer files)
    trainer_state.pt    optimizer, step counters, data position, RNG states, grad scaler (torch.save;
                        read back only with torch.load(weights_only=True))
    run_config.json     the validated run configuration
    manifest.json       {"format": "mptkit-checkpoint", "step", "epoch", "files": {path: {sha256, bytes}}}

A *sharded* checkpoint (FSDP with ``fsdp_config.state_dict_type: sharded``) has the same files except that
``model/`` holds only config.json and the tokenizer, the weights and the optimizer state are in ``dcp/``
(``torch.distributed.checkpoint``; :mod:`mptkit.io.dcp` reads it in one process), ``trainer_state.pt`` has
no optimizer and the manifest says ``"sharded": true``.

A checkpoint whose manifest is missing or whose files do not match their checksums is *invalid* and skipped
by :func:`find_latest_checkpoint`. Writing them (atomically, manifest last), pruning and the recovery of
interrupted saves are the trainer's: :mod:`mptkit.train.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from mptkit.errors import CheckpointError
from mptkit.utils.fs import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
SHARDED_DIR = "dcp"
FORMAT = "mptkit-checkpoint"
NAME_RE = re.compile(r"^ep(\d+)-ba(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ep{epoch}-ba{step}"


def read_manifest(ckpt: str | os.PathLike) -> dict | None:
    """The manifest of checkpoint ``ckpt``, or None when it has no readable mptkit manifest."""
    p = Path(ckpt) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        return None
    return m


def is_sharded(ckpt: str | os.PathLike) -> bool:
    """True for a sharded (torch.distributed.checkpoint) checkpoint."""
    m = read_manifest(ckpt)
    return bool(m and m.get("sharded"))


def verify_checkpoint(ckpt: str | os.PathLike, *, checksums: bool = True) -> str | None:
    """None if ``ckpt`` is a complete, uncorrupted checkpoint; else the reason it is not."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    if m is None:
        return "no valid manifest.json (incomplete write?)"
    for rel, info in m["files"].items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info.get("bytes"):
            return f"{rel} has {p.stat().st_size} bytes, manifest says {info.get('bytes')} (truncated?)"
        if checksums and sha256_file(p) != info.get("sha256"):
            return f"{rel} checksum mismatch (corrupted)"
    # model/: a model folder, or a LoRA run's adapter (peft's adapter_config.json, mptkit.io.adapter)
    has_model = f"{MODEL_DIR}/config.json" in m["files"] or f"{MODEL_DIR}/adapter_config.json" in m["files"]
    if STATE_FILE not in m["files"] or not has_model:
        return "manifest lacks trainer_state.pt or model/config.json"
    return None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint folders (named ep{E}-ba{B}) under ``folder`` or ``folder/checkpoints``, newest step first."""
    folder = Path(folder)
    found: list[tuple[int, int, Path]] = []
    for base in (folder, folder / "checkpoints"):
        if not base.is_dir():
            continue
        for p in base.iterdir():
            m = NAME_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(2)), int(m.group(1)), p))
    found.sort(key=lambda x: (x[0], x[1]), reverse=True)
    return [p for _, _, p in found]


def scan_checkpoints(
    folder: str | os.PathLike, *, checksums: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest valid checkpoint under ``folder`` or None, [(checkpoint, why it is invalid), ...] for every
    invalid one newer than it: all of them when none is valid)."""
    bad: list[tuple[Path, str]] = []
    for c in list_checkpoints(folder):
        reason = verify_checkpoint(c, checksums=checksums)
        if reason is None:
            return c, bad
        bad.append((c, reason))
    return None, bad


def find_latest_checkpoint(run_or_save_folder: str | os.PathLike, *, checksums: bool = True) -> Path | None:
    """The newest *valid* checkpoint in a run folder, a save folder, or the checkpoint itself; else None.

    Invalid ones (no manifest, truncated or corrupted files) are skipped with a warning."""
    p = Path(run_or_save_folder)
    if (p / MANIFEST).exists():
        reason = verify_checkpoint(p, checksums=checksums)
        if reason is None:
            return p
        log.warning("checkpoint %s is invalid: %s", p, reason)
        return None
    c, bad = scan_checkpoints(p, checksums=checksums)
    for b, reason in bad:
        log.warning("skipping invalid checkpoint %s: %s", b, reason)
    return c


def load_trainer_state(ckpt: str | os.PathLike, *, mmap: bool = False) -> dict:
    """The trainer state of a checkpoint (``torch.load(weights_only=True)``: tensors and plain data only).

    ``mmap=True`` maps the file instead of reading it: tensors are paged in when touched, and ranks of one
    node reading the same checkpoint share the page cache (FSDP resuming a full checkpoint keeps only its
    shard of each optimizer tensor)."""
    p = Path(ckpt) / STATE_FILE
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {STATE_FILE}") from None
    except Exception as e:  # noqa: BLE001 - corrupted pickles raise many types
        raise CheckpointError(f"{p}: unreadable trainer state ({type(e).__name__}: {e})") from None
