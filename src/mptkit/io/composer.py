"""Composer / llm-foundry checkpoints (``*.pt``) read without running their pickles.

A Composer checkpoint is ``torch.save`` of ``{"state": {"model": {name: tensor}, "optimizers": ...,
"timestamp": ..., "integrations": {"huggingface": {"model": {"config": {"content": {...}}}, "tokenizer":
{file: {"file_extension", "content"}}}}, ...}, "rng": [...]}``; an llm-foundry MPT's tensor names are
``model.transformer.*`` (and ``model.lm_head.weight`` when untied).

A pickle can name any importable function and have it called while it loads (``os.system``, ``eval``...), so
this module unpickles through an allow-list (:class:`_AllowListUnpickler`):

* the tensors' own machinery (``torch._utils._rebuild_tensor_v2`` and its siblings, storages, dtypes,
  ``torch.Size``, ``torch.device``), plain containers (``collections.OrderedDict`` / ``deque`` /
  ``defaultdict``, ``set``, ``frozenset``, ``slice``, ``complex``), ``datetime`` values and numpy arrays,
  dtypes and scalars (Composer's RNG states);
* objects of Composer's, llm-foundry's, torchmetrics', transformers' and OmegaConf's own classes (a
  ``Timestamp``, a metric's state, an enum) become inert :class:`InertObject` records: the class name and the
  arguments and state they were pickled with, kept as data — none of their code is imported or run;
* anything else is refused: a :class:`~mptkit.errors.CheckpointError` naming the global, before it is called.

An FSDP run with ``fsdp_config.state_dict_type: sharded`` saves a folder instead (``ep0-ba100/``): a
``torch.distributed.checkpoint`` (DCP) checkpoint of the same dict, flattened (``state.model.model.transformer.*``),
with a ``.metadata`` pickle and one ``__<rank>_0.distcp`` file per rank. :func:`load_composer_sharded` reads it in
one process without a process group through :mod:`mptkit.io.dcp`'s allow-listed metadata reader: only the
model's tensors and the HF metadata's plain values (``torch.load(weights_only=True)``) are read; the other
pickled items (timestamps, RNG states, optimizer state) are never unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from mptkit.errors import CheckpointError

log = logging.getLogger(__name__)

# globals a Composer checkpoint's pickle may name, by module: the exact names allowed
_ALLOWED: dict[str, set[str]] = {
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_qtensor",
                     "_rebuild_device_tensor_from_numpy", "_rebuild_wrapper_subclass"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "torch": {"Size", "device", "Tensor", "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
              "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
              "UntypedStorage", "TypedStorage"},
    "torch.storage": {"UntypedStorage", "TypedStorage", "_load_from_bytes"},
    "collections": {"OrderedDict", "deque", "defaultdict", "Counter"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray", "range", "dict", "list", "tuple", "int",
                 "float", "str", "bytes", "bool"},
    "datetime": {"datetime", "timedelta", "date", "time", "timezone"},
    "_codecs": {"encode"},  # how protocol-2 pickles spell bytes (numpy arrays' data): text -> bytes only
    "numpy": {"ndarray", "dtype", "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "float16", "float32", "float64"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
}
_NUMPY_DTYPES_MODULE = "numpy.dtypes"  # numpy 2 pickles dtypes as numpy.dtypes.Float64DType etc.
# packages whose classes become inert records (their objects hold training state, never tensors we need)
_INERT_PACKAGES = ("composer", "llmfoundry", "torchmetrics", "transformers", "omegaconf", "streaming")


class InertObject:
    """What an object of an allowed package's class becomes: its ``origin`` (``module.Name``), the ``args``
    it was constructed with and the ``state`` it was pickled with; nothing of the class runs."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # pickle's SETITEMS on a dict subclass
        self.items.append((key, value))

    def append(self, value):  # APPENDS on a list subclass
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


_INERT_TYPES: dict[str, type] = {}


def _inert(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _INERT_TYPES:
        _INERT_TYPES[key] = type(name, (InertObject,), {"origin": key, "__module__": __name__})
    return _INERT_TYPES[key]


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle named a global that is not on the allow-list."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _NUMPY_DTYPES_MODULE and name.endswith("DType"):
            return super().find_class(module, name)
        if module.split(".")[0] in _INERT_PACKAGES:
            return _inert(module, name)
        raise RefusedGlobal(f"{module}.{name}")


class _AllowListPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and ``load``."""

    Unpickler = _AllowListUnpickler
    __name__ = "mptkit_allow_list_pickle"

    @staticmethod
    def load(f, **kw):
        return _AllowListUnpickler(f, **kw).load()


def load_composer_checkpoint(path: str | os.PathLike) -> dict:
    """The whole checkpoint dict of a Composer ``.pt`` file, unpickled through the allow-list (tensors on
    CPU). A :class:`CheckpointError` for a missing or unreadable file, one that is no Composer checkpoint,
    or one whose pickle names anything outside the allow-list (nothing it names is called)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file (expected a Composer/llm-foundry .pt file)")
    try:
        obj = torch.load(p, map_location="cpu", pickle_module=_AllowListPickleModule, weights_only=False)
    except RefusedGlobal as e:
        raise CheckpointError(
            f"{p}: refused: its pickle names {e}, which is not on mptkit's allow-list (tensors, containers, "
            "numpy arrays, Composer/llm-foundry/torchmetrics state as inert data); a pickle can run arbitrary "
            "code, so nothing of it was loaded") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign pickle raises many types
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict) or not isinstance(
            obj["state"].get("model"), dict):
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p}: not a Composer checkpoint (expected {{'state': {{'model': {{...}}}}}}; "
                              f"found {keys})")
    return obj


_SHARDED_MODEL = "state.model."
_SHARDED_HF = "state.integrations.huggingface."


def load_composer_sharded(folder: str | os.PathLike) -> dict:
    """A Composer / llm-foundry sharded (DCP) checkpoint folder as the dict :func:`load_composer_checkpoint`
    returns, holding only what conversion needs: ``state.model``'s tensors (every shard read and assembled,
    in this one process) and ``state.integrations.huggingface`` (the model config and tokenizer files) when
    the run saved it. A :class:`CheckpointError` for a folder without ``.metadata``, metadata that names
    anything outside DCP's own types, one with no ``state.model.*`` tensors, or unreadable shard files."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    from mptkit.io.dcp import read_dcp, read_dcp_metadata

    p = Path(folder)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such sharded checkpoint folder")
    if not (p / ".metadata").is_file():
        found = sorted(x.name for x in p.iterdir())[:6]
        raise CheckpointError(f"{p}: not a sharded (torch.distributed.checkpoint) checkpoint: it has no .metadata "
                              f"file (found {found or 'nothing'}); pass the folder Composer saved (e.g. ep0-ba100/) "
                              "or a .pt file")
    md = read_dcp_metadata(p)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, object] = {}
    for fqn, item in md.state_dict_metadata.items():
        if fqn.startswith(_SHARDED_MODEL) and isinstance(item, TensorStorageMetadata):
            tensors[fqn] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        elif fqn.startswith(_SHARDED_HF) and isinstance(item, BytesStorageMetadata):
            plain[fqn] = None
    if not tensors:
        some = sorted(md.state_dict_metadata)[:6]
        raise CheckpointError(f"{p}: not a Composer checkpoint: no {_SHARDED_MODEL}* tensors in its .metadata "
                              f"(found {some or 'no keys'})")
    state = {**tensors, **plain}
    read_dcp(state, p)  # refused metadata, unreadable or truncated shards -> CheckpointError naming the folder
    model = {fqn[len(_SHARDED_MODEL):]: state[fqn] for fqn in tensors}
    integrations: dict = {}
    paths = getattr(md, "planner_data", None) or {}
    for fqn in plain:
        path = paths.get(fqn)  # the nested keys Composer's dict had (DCP's flattening mapping)
        if not isinstance(path, (tuple, list)) or len(path) < 3 or tuple(path[:2]) != ("state", "integrations"):
            path = ("state", "integrations", *fqn[len("state.integrations."):].split("."))
        node = integrations
        for key in path[2:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = state[fqn]
    log.info("%s: read %d model tensors from %d shard files", p, len(model), len(list(p.glob("*.distcp"))))
    return {"state": {"model": model, "integrations": _relist(integrations)}}


def _relist(node):
    """DCP flattens the lists that hold dicts by index (``added_tokens.0.id``): a dict keyed 0..n-1 by ints is
    the list it was."""
    if not isinstance(node, dict):
        return node
    node = {k: _relist(v) for k, v in node.items()}
    if node and all(type(k) is int for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _strip_wrappers(name: str) -> str:
    """A tensor name without FSDP / activation-checkpointing / torch.compile wrapper segments."""
    for seg in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(seg, "")
    return name


def composer_model_tensors(ckpt: dict, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state.model``'s tensors under MPT's own names (``model.transformer.*`` -> ``transformer.*``)."""
    from mptkit.io.hf_folder import normalise_key

    out: dict[str, torch.Tensor] = {}
    for k, v in ckpt["state"]["model"].items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: state.model[{k!r}] is {type(v).__name__}, expected a tensor")
        out[normalise_key(_strip_wrappers(str(k)))] = v
    return out


def composer_hf_config(ckpt: dict) -> dict | None:
    """The model's config.json dict saved in the checkpoint's HF metadata (llm-foundry models are Composer
    ``HuggingFaceModel``s), or None."""
    try:
        content = ckpt["state"]["integrations"]["huggingface"]["model"]["config"]["content"]
    except (KeyError, TypeError):
        return None
    return dict(content) if isinstance(content, dict) else None


def write_composer_tokenizer(ckpt: dict, folder: str | os.PathLike) -> list[str]:
    """Write the tokenizer files saved in the checkpoint's HF metadata into ``folder``; returns their names
    (empty when it has none). JSON and text files are written; other kinds are skipped with a warning."""
    import json

    try:
        files = ckpt["state"]["integrations"]["huggingface"]["tokenizer"]
    except (KeyError, TypeError):
        return []
    if not isinstance(files, dict):
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, saved in files.items():
        if not isinstance(saved, dict) or "/" in str(stem) or str(stem).startswith("."):
            continue
        ext, content = saved.get("file_extension"), saved.get("content")
        name = f"{stem}{ext}"
        if ext == ".json":
            (folder / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        elif ext == ".txt" and isinstance(content, (list, str)):
            text = content if isinstance(content, str) else "".join(
                x if x.endswith("\n") else x + "\n" for x in content)
            (folder / name).write_text(text, encoding="utf-8")
        else:
            log.warning("the checkpoint's tokenizer file %s (%s) is not written (only .json and .txt files are)",
                        name, ext)
            continue
        written.append(name)
    return written


__all__ = ["InertObject", "composer_hf_config", "composer_model_tensors", "load_composer_checkpoint",
           "load_composer_sharded",
           "write_composer_tokenizer"]
