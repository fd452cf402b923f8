"""What an export reads, with the exporters' errors: the model source (:func:`mptkit.io.open_model_source`:
a model folder, a run, a checkpoint, a sharded checkpoint consolidated for the duration), its config, and
its tensors one at a time (:class:`mptkit.io.hf_folder.TensorStore`, so a 7B checkpoint is never held in
memory twice). A source that cannot be read is an :class:`ExportError` with the reader's message."""

from __future__ import annotations

import os
from pathlib import Path

from mptkit.errors import CheckpointError, ConfigError, DataError, ExportError
from mptkit.io.hf_folder import TensorStore
from mptkit.io.source import ModelSource, expected_shapes, open_model_source


def open_source(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                adapter_ok: bool = False) -> ModelSource:
    """:func:`open_model_source` (use it in a ``with`` block); its errors as :class:`ExportError`. A LoRA source (an
    adapter, a LoRA run) is refused unless ``adapter_ok`` (only ``export hf --merge / --adapter-only`` reads one):
    exporting its base alone would silently drop the adapter."""
    try:
        source = open_model_source(src, tokenizer=tokenizer)
    except (CheckpointError, DataError) as e:
        raise ExportError(str(e)) from None
    if source.adapter is not None and not adapter_ok:
        source.close()
        raise ExportError(f"{src} is a LoRA adapter ({source.adapter}) on {source.folder}: fold it in first with "
                          f"`mptkit export hf {src} OUT --merge`, then export OUT")
    return source


def load_config(folder: Path, *, allow_quantized: bool = False):
    """The folder's config; a quantised folder (``mptkit export quant``'s) is refused unless
    ``allow_quantized``: its int8 blocks are mptkit's own format, the fp32 model it came from is the source."""
    from mptkit.model.config import MPTConfig

    try:
        cfg = MPTConfig.from_json_file(folder / "config.json")
    except ConfigError as e:
        raise ExportError(f"cannot export: {e}") from None
    q = cfg.extra.get("quantization")
    if q is not None and not allow_quantized:
        kind = q.get("type") if isinstance(q, dict) else q
        raise ExportError(
            f"cannot export {folder}: it is a quantised folder ({kind}, mptkit's own format); export the fp32 "
            "model it was quantised from"
        )
    return cfg


def open_store(folder: Path, cfg, shapes: dict[str, tuple[int, ...]] | None = None) -> TensorStore:
    """The folder's tensors, checked against ``shapes`` (default: what ``cfg`` describes for an fp32 folder;
    missing or mis-shaped ones are refused, named)."""
    try:
        store = TensorStore(folder)
        store.check_against(expected_shapes(cfg) if shapes is None else shapes)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return store
