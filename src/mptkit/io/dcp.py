"""Sharded (``torch.distributed.checkpoint``, DCP) checkpoint folders, read safely — also in one process.

torch's own reader unpickles a user-given ``.metadata`` with plain ``pickle.load`` and the non-tensor items
(optimizer hyper-parameters) with ``weights_only=False``. Here the metadata pickle goes through an
allow-list of DCP's metadata types and the items through ``torch.load(weights_only=True)``: a folder that
references anything else is a :class:`CheckpointError` before any of it is unpickled.

:func:`read_dcp` fills a state dict from a DCP folder: with a process group initialised every rank reads its
part (the trainer's resume, :func:`mptkit.train.fsdp.dcp_load`); without one a single process reads every
shard (DCP reshards on load). :func:`consolidate_sharded_checkpoint` turns a sharded trainer checkpoint into
an HF folder. Writing DCP folders, and the collectives, are the trainer's (:mod:`mptkit.train.fsdp`).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptkit.errors import CheckpointError
from mptkit.io.checkpoints import MODEL_DIR, SHARDED_DIR

log = logging.getLogger(__name__)

# What a DCP ``.metadata`` pickle (torch 2.13, FileSystemWriter) legitimately references: DCP's metadata
# dataclasses, torch.Size, dtypes and layouts, the checkpoint path. Anything else is refused.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


def _metadata_unpickler(f, where: str):
    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            ):
                return super().find_class(module, name)
            raise CheckpointError(
                f"{where}: refusing to load this sharded checkpoint: its metadata pickle "
                f"references {module}.{name}, which is not a torch.distributed.checkpoint "
                "metadata type (a tampered file, or written by an incompatible torch)"
            )

        def persistent_load(self, pid):
            raise CheckpointError(
                f"{where}: refusing to load this sharded checkpoint: its metadata pickle holds "
                "a persistent reference"
            )

    return _Restricted(f)


def safe_reader(folder: Path):
    """A DCP ``FileSystemReader`` whose ``read_metadata`` unpickles through an allow-list (torch's own uses
    plain ``pickle.load`` on the user-given ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import Metadata

            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(path, "rb") as f:
                    md = _metadata_unpickler(f, str(path)).load()
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle raises many types
                raise CheckpointError(
                    f"{path}: unreadable sharded checkpoint metadata ({type(e).__name__}: {e})"
                ) from None
            if not isinstance(md, Metadata):
                raise CheckpointError(
                    f"{path}: not torch.distributed.checkpoint metadata ({type(md).__name__})"
                )
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(str(folder))


def safe_planner():
    """DCP's default load planner, except that non-tensor items (optimizer hyper-parameters) are read with
    ``torch.load(weights_only=True)``; torch's own planner uses ``weights_only=False`` on the shard bytes."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises UnpicklingError and more
                raise CheckpointError(
                    f"refusing a non-tensor item of the sharded checkpoint "
                    f"({read_item.dest_index.fqn}): {str(e).splitlines()[0][:300]}"
                ) from None
            buf = io.BytesIO()  # plain data only now: hand it on in the form the parent planner reads
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return SafeLoadPlanner()


def read_dcp_metadata(folder: Path):
    """The DCP folder's metadata, through the allow-list (a refused file raises here, before any collective)."""
    return safe_reader(folder).read_metadata()


def read_dcp(state: dict, folder: Path) -> None:
    """Fill ``state`` (DCP's nested state dict, e.g. ``{"model": ...}``) in place from DCP folder ``folder``:
    every rank its part under a process group, else this one process all of it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    no_dist = not (dist.is_available() and dist.is_initialized())  # one process reads every shard
    read_dcp_metadata(folder)
    with warnings.catch_warnings():  # DCP warns that no_dist means a single process: it does
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            dcp.load(
                state,
                checkpoint_id=str(folder),
                storage_reader=safe_reader(folder),
                planner=safe_planner(),
                no_dist=no_dist,
            )
        except CheckpointException as e:  # a BaseException: name the first rank's error
            errs = [pair[0] for pair in e.failures.values()]
            own = next((x for x in errs if isinstance(x, CheckpointError)), None)
            if own is not None:
                raise own from None
            first = errs[0] if errs else e
            raise CheckpointError(
                f"{folder}: unreadable sharded checkpoint (a shard file truncated or corrupt?): "
                f"{type(first).__name__}: {(str(first).splitlines() or ['no message'])[0][:300]}"
            ) from None


def load_dcp_model_state(model: nn.Module, folder: Path) -> None:
    """Read the model part of DCP folder ``folder`` into ``model`` (sharded or not; any world size)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    read_dcp_metadata(folder)  # a refused file raises here, before the model's state is taken
    state = {"model": get_model_state_dict(model)}
    read_dcp(state, folder)
    set_model_state_dict(model, state["model"])


def consolidate_sharded_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a sharded trainer checkpoint's weights into an HF folder (config.json + safetensors + tokenizer)
    in one process, e.g. for ``mptkit export`` or ``transformers``."""
    from mptkit.model import MPTForCausalLM, load_model_config
    from mptkit.utils.fs import atomic_dir

    ckpt = Path(ckpt)
    model = MPTForCausalLM(load_model_config(ckpt / MODEL_DIR), init=False, device="cpu")
    load_dcp_model_state(model, ckpt / SHARDED_DIR)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, tokenizer=ckpt / MODEL_DIR)
    return out
