"""Artefacts on disk, below train / infer / eval / export (docs/architecture.md):

- :mod:`mptkit.io.hf_folder`: HF-layout model folders (weights discovery, shards + index, ``.bin`` only with
  ``weights_only=True``, name and shape checks, writing safetensors);
- :mod:`mptkit.io.tokenizer_files`: the one list of tokenizer file names, the one ``load_tokenizer``;
- :mod:`mptkit.io.checkpoints`: the read side of trainer checkpoints (layout, manifest, newest valid);
- :mod:`mptkit.io.dcp`: sharded (torch.distributed.checkpoint) folders read safely, also in one process;
- :mod:`mptkit.io.source`: ``open_model_source(path)``, whatever a user points at -> model + tokenizer.

The names below are imported on first use (``import mptkit.io`` loads nothing else).
"""

from __future__ import annotations

_NAMES = {
    "ModelSource": "mptkit.io.source",
    "open_model_source": "mptkit.io.source",
    "load_tokenizer": "mptkit.io.tokenizer_files",
    "find_latest_checkpoint": "mptkit.io.checkpoints",
}

__all__ = ["ModelSource", "find_latest_checkpoint", "load_tokenizer", "open_model_source"]


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'mptkit.io' has no attribute {name!r}")
