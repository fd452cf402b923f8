"""Trainer checkpoints, the write side: atomic folders with a checksum manifest, keep-last-N, recovery.

The layout (``ep{E}-ba{B}/`` holding ``model/``, ``trainer_state.pt``, ``run_config.json``, ``manifest.json``;
a sharded checkpoint's ``dcp/``), reading a manifest, verifying a checkpoint and the newest-valid lookup are
the read side, :mod:`mptkit.io.checkpoints`; its names are imported here, so the trainer finds both sides in
this module.

A checkpoint is written into a temporary folder beside the final name and renamed into place only when
complete (``mptkit.utils.fs.atomic_dir``); the manifest is written last inside it, so a crash (or SIGKILL)
mid-save can never replace a good checkpoint. For a sharded checkpoint every rank writes its shard into the
same temporary folder and hashes its own shard files; rank 0 renames the folder into place once all files
and the manifest are complete (see :func:`save_sharded_checkpoint`); the save folder must be on a file
system every rank sees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mptkit.errors import CheckpointError
from mptkit.io.checkpoints import (
    FORMAT,
    MANIFEST,
    MODEL_DIR,
    SHARDED_DIR,
    STATE_FILE,
    checkpoint_name,
    find_latest_checkpoint,
    is_sharded,
    list_checkpoints,
    load_trainer_state,
    read_manifest,
    scan_checkpoints,
    verify_checkpoint,
)
from mptkit.io.tokenizer_files import save_tokenizer
from mptkit.utils.fs import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

__all__ = [  # the writers, and the read side's names the trainer uses through this module
    "FORMAT", "MANIFEST", "MODEL_DIR", "SHARDED_DIR", "STATE_FILE", "checkpoint_name", "clean_stale_temp",
    "find_latest_checkpoint", "is_sharded", "list_checkpoints", "load_trainer_state", "move_aside",
    "no_valid_checkpoint_message", "prune_checkpoints", "read_manifest", "restore_interrupted",
    "save_checkpoint", "save_sharded_checkpoint", "scan_checkpoints", "verify_checkpoint",
]


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def save_checkpoint(
    save_folder: str | os.PathLike,
    *,
    model,
    trainer_state: dict,
    epoch: int,
    step: int,
    tokenizer: Any = None,
    run_config: dict | None = None,
    during_write: Callable[[], None] | None = None,
) -> Path:
    """Write one checkpoint atomically and return its final path. ``during_write()`` is called once the weights
    and trainer state are in the temporary folder, before the manifest (fault injection: train/faults.py)."""
    save_folder = Path(save_folder)
    final = save_folder / checkpoint_name(epoch, step)
    t0 = time.perf_counter()
    with atomic_dir(final) as tmp:
        from mptkit.model.lora import has_lora

        if has_lora(model):  # a LoRA run: only the adapter (peft's files) and the base's reference
            from mptkit.io.adapter import save_adapter

            save_adapter(model, tmp / MODEL_DIR, tokenizer=tokenizer)
        else:
            model.save_pretrained(tmp / MODEL_DIR, tokenizer=tokenizer)
        torch.save(trainer_state, tmp / STATE_FILE)
        if during_write is not None:
            during_write()
        if run_config is not None:
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
        _write_manifest(tmp, epoch=epoch, step=step)
    log.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
    return final


def _sync_and_hash(p: Path) -> dict:
    with open(p, "rb+") as f:
        os.fsync(f.fileno())
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def _write_manifest(tmp: Path, *, epoch: int, step: int, known: dict | None = None, **extra) -> None:
    """The manifest of ``tmp``: fsync + sha256 of every file, except those in ``known`` (already synced and
    hashed by the rank that wrote them)."""
    known = known or {}
    files = {}
    for p in _files_under(tmp):
        rel = p.relative_to(tmp).as_posix()
        files[rel] = known[rel] if rel in known else _sync_and_hash(p)
    manifest = {"format": FORMAT, "version": 1, "step": int(step), "epoch": int(epoch), "time": time.time(),
                **extra, "files": files}
    atomic_write_json(tmp / MANIFEST, manifest)


_FAILED = "mptkit-checkpoint-failed"


def _failure(e: BaseException) -> dict:
    """What rank 0 broadcasts instead of a path when it fails: every rank then raises the same error."""
    return {_FAILED: f"{type(e).__name__}: {e}"}


def _raise_if_failed(msg: Any, what: str) -> None:
    if isinstance(msg, dict) and _FAILED in msg:
        raise CheckpointError(f"{what}: {msg[_FAILED]}")


def _hash_own_shards(folder: Path, rank: int) -> dict:
    """fsync + sha256 of the shard files this rank wrote (DCP names them ``__{rank}_{n}.distcp``), keyed by
    their path in the checkpoint; an error becomes a failure marker (the caller must still take part in the
    gather that follows)."""
    try:
        return {f"{SHARDED_DIR}/{p.name}": _sync_and_hash(p)
                for p in sorted((folder / SHARDED_DIR).glob(f"__{rank}_*.distcp"))}
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it on every rank
        return _failure(e)


def save_sharded_checkpoint(
    save_folder: str | os.PathLike,
    *,
    write_shards: Callable[[Path], None],
    broadcast: Callable[[Any], Any],
    gather: Callable[[Any], list | None],
    rank: int,
    model_config,
    trainer_state: dict | None,
    epoch: int,
    step: int,
    tokenizer: Any = None,
    run_config: dict | None = None,
) -> Path | None:
    """Write one sharded checkpoint atomically; every rank calls it (collective).

    ``broadcast(obj)`` sends rank 0's ``obj`` to every rank (the others pass None and get it); ``gather(obj)``
    collects every rank's ``obj`` on rank 0 (a list by rank; None elsewhere). The steps, on every rank alike:

    1. rank 0 creates the temporary folder and broadcasts its path, or a failure marker if it could not
       (then every rank raises rank 0's error instead of waiting);
    2. ``write_shards(folder)`` writes every rank's shard into ``<tmp>/dcp`` (torch.distributed.checkpoint:
       collective, an error in it is raised on every rank);
    3. each rank fsyncs and hashes its own ``.distcp`` files; the digests are gathered to rank 0, so no rank
       waits while rank 0 reads every shard;
    4. rank 0 adds config, tokenizer, trainer state and the manifest (the gathered digests, plus its own
       hashes of the rest), renames the folder into place and broadcasts the final path, or a failure marker
       (every rank raises it).

    Returns the final path on rank 0, None elsewhere."""
    save_folder = Path(save_folder)
    final = save_folder / checkpoint_name(epoch, step)
    if rank != 0:
        got = broadcast(None)
        _raise_if_failed(got, f"checkpoint {final.name}: rank 0 could not create its folder")
        folder = Path(got)
        write_shards(folder / SHARDED_DIR)
        gather(_hash_own_shards(folder, rank))
        _raise_if_failed(broadcast(None), f"checkpoint {final.name} failed on rank 0")
        return None
    t0 = time.perf_counter()
    stage = "create"
    try:
        with atomic_dir(final) as tmp:
            broadcast(str(tmp))
            stage = "shards"  # collective: an error here is raised on every rank, nothing to broadcast
            write_shards(tmp / SHARDED_DIR)
            stage = "finish"
            parts = gather(_hash_own_shards(tmp, 0)) or []
            known: dict = {}
            for r, part in enumerate(parts):
                _raise_if_failed(part, f"rank {r} could not sync and hash its shard")
                known.update(part)
            _save_model_meta(tmp / MODEL_DIR, model_config, tokenizer)
            torch.save(trainer_state, tmp / STATE_FILE)
            if run_config is not None:
                (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
            _write_manifest(tmp, epoch=epoch, step=step, known=known, sharded=True)
    except Exception as e:
        if stage != "shards":
            broadcast(_failure(e))
        raise
    broadcast(str(final))
    log.info("saved sharded checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
    return final


def _save_model_meta(folder: Path, config, tokenizer: Any) -> None:
    """config.json and tokenizer files (no weights) of a sharded checkpoint's model/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)
    save_tokenizer(tokenizer, folder)


def no_valid_checkpoint_message(folder: str | os.PathLike, bad: list[tuple[Path, str]]) -> str:
    """Why autoresume refuses a save folder whose checkpoints are all invalid, and the ways out."""
    lines = "\n".join(f"  {c.name}: {why}" for c, why in bad)
    return (f"autoresume: none of the {len(bad)} checkpoint(s) in {folder} is valid, so the run cannot continue "
            f"from them, and starting from scratch would overwrite them under the same names:\n{lines}\n"
            "Nothing was changed. Restore a good copy of one of them (each is checked against its manifest.json), "
            f"or move them out of {folder} to start from scratch, or set autoresume=false save_overwrite=true to "
            "delete them and start over, or choose a new save_folder.")


def move_aside(ckpt: str | os.PathLike, suffix: str = "invalid") -> Path:
    """Rename an invalid checkpoint to ``<name>.invalid`` (``.invalid-2``, ... when taken; ``suffix`` for another
    reason, e.g. a rollback's ``rolledback``): kept as it is for inspection, and never resumed from, overwritten
    or pruned (the name is no checkpoint name)."""
    ckpt = Path(ckpt)
    dest = ckpt.with_name(f"{ckpt.name}.{suffix}")
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"{ckpt.name}.{suffix}-{n}")
    os.replace(ckpt, dest)
    return dest


def prune_checkpoints(save_folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0: keep all). Returns what was deleted.

    Invalid checkpoints never count toward ``keep``: the newest ``keep`` *valid* ones always survive."""
    if keep is None or keep <= 0:
        return []
    all_ck = list_checkpoints(save_folder)
    kept = 0
    removed = []
    for c in all_ck:
        if kept < keep and verify_checkpoint(c, checksums=False) is None:
            kept += 1
            continue
        if kept < keep:
            continue  # an invalid one newer than the kept ones: leave it for inspection
        shutil.rmtree(c, ignore_errors=True)
        removed.append(c)
    if removed:
        log.info("removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed


_OLD_RE = re.compile(r"^\.(ep\d+-ba\d+)\.old-\d+$")


def restore_interrupted(save_folder: str | os.PathLike) -> list[Path]:
    """Put back checkpoints whose replacement was interrupted. A save under an existing name moves the old
    checkpoint to ``.NAME.old-PID`` before renaming the new one in (``atomic_dir``); killed between the two
    renames, that folder is the only copy. Returns the restored checkpoints."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        m = _OLD_RE.match(p.name)
        if m and p.is_dir() and not (folder / m.group(1)).exists():
            os.replace(p, folder / m.group(1))
            log.warning("restored checkpoint %s from %s (its replacement was interrupted)", m.group(1), p.name)
            out.append(folder / m.group(1))
    return out


def clean_stale_temp(save_folder: str | os.PathLike) -> None:
    """Remove temporary folders left by a save that was killed (``.ep*-ba*.*.tmp``), and the moved-aside old
    copies of checkpoints that were replaced (call :func:`restore_interrupted` first)."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".ep") and (p.name.endswith(".tmp") or ".old-" in p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
