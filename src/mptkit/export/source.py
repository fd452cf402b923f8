"""What an export reads: the model folder behind a user's path, its tensors (one at a time), its tokenizer.

``SRC`` may be a model folder (config.json + weights), or a trainer run / save / checkpoint folder, which
the trainer's ``mptkit.train.checkpoint.model_folder`` resolves to the model folder inside the newest valid
checkpoint. Tensors are read lazily, one at a time, so exporting a 7B checkpoint does not hold it in memory
twice (the GGUF writer streams them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mptkit.errors import CheckpointError, ConfigError, ExportError
from mptkit.model.checkpoint_io import load_bin_state_dict, normalise_key

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                   "pytorch_model.bin", "pytorch_model.bin.index.json", "*.safetensors")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Files a transformers tokenizer may consist of (copied verbatim into an export).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "mptkit_tokenizer.json",
)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def publish_permissions(path: Path) -> None:
    """Give a finished export the permissions an ordinary write would (temp files are created 0600/0700)."""
    m = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~m)
        for f in path.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~m)
    elif path.is_file():
        os.chmod(path, 0o666 & ~m)


def is_model_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS)


def resolve_model_folder(src: str | os.PathLike) -> Path:
    """The HF-layout model folder behind ``src`` (itself, or the newest valid checkpoint's model folder)."""
    p = Path(src)
    if not p.exists():
        raise ExportError(f"{p}: no such file or folder (expected a model folder, a training run or a checkpoint)")
    if not p.is_dir():
        raise ExportError(f"{p}: not a folder (expected a model folder with config.json + *.safetensors, "
                          "a training run or a checkpoint)")
    if is_model_folder(p):
        return p
    from mptkit.train.checkpoint import model_folder

    try:
        folder = Path(model_folder(p))
    except CheckpointError as e:
        raise ExportError(f"{p}: not a model folder, and no usable checkpoint in it: {e}") from None
    log.info("%s: using the newest valid checkpoint, %s", p, folder)
    return folder


@contextlib.contextmanager
def model_source(src: str | os.PathLike) -> Iterator[Path]:
    """:func:`resolve_model_folder`, and for a run or checkpoint whose newest checkpoint is sharded (FSDP,
    ``state_dict_type: sharded``) an HF folder consolidated from it in a temporary folder, removed on exit."""
    p = Path(src)
    try:
        from mptkit.train.checkpoint import find_latest_checkpoint, is_sharded
    except ImportError:
        yield resolve_model_folder(src)
        return
    ck = None
    if p.is_dir() and not is_model_folder(p):
        # the newest checkpoint, unverified: only a sharded one is verified here (resolve_model_folder verifies
        # the others, so a full checkpoint's checksums are not computed twice)
        ck = p if is_sharded(p) else find_latest_checkpoint(p, checksums=False)
        if ck is not None and is_sharded(ck) and ck != p:
            ck = find_latest_checkpoint(p)
    if ck is None or not is_sharded(ck):
        yield resolve_model_folder(src)
        return
    from mptkit.train.fsdp import consolidate_sharded_checkpoint

    with tempfile.TemporaryDirectory(prefix="mptkit-consolidated-") as work:
        log.info("%s: consolidating the sharded checkpoint %s", p, ck)
        try:
            folder = consolidate_sharded_checkpoint(ck, Path(work) / "model")
        except CheckpointError as e:
            raise ExportError(f"{p}: the sharded checkpoint {ck} cannot be read: {e}") from None
        yield folder


@contextlib.contextmanager
def model_folders(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None
                  ) -> Iterator[tuple[Path, Path | None]]:
    """For loading a model from whatever a user points at — a model folder, a training run, a checkpoint
    (a sharded one consolidated for the duration): (model folder, tokenizer folder or None)."""
    with model_source(src) as folder:
        yield folder, find_tokenizer_folder(folder, Path(src), tokenizer)


def find_tokenizer_folder(model_folder: Path, src: Path | None = None, explicit: str | os.PathLike | None = None
                          ) -> Path | None:
    """Where the tokenizer files are: ``explicit``, else the model folder, else ``src`` and its parents up to
    two levels (a run folder keeps the tokenizer beside its checkpoints), else None."""
    if explicit is not None:
        e = Path(explicit)
        if not (e.is_dir() and any((e / m).exists() for m in TOKENIZER_MARKERS)):
            raise ExportError(f"--tokenizer {e}: not a folder with tokenizer files ({', '.join(TOKENIZER_MARKERS)})")
        return e
    cands = [model_folder]
    if src is not None:
        cands += [src, *list(src.parents)[:2]]
    cands += list(model_folder.parents)[:3]
    for c in cands:
        if c.is_dir() and any((c / m).exists() for m in TOKENIZER_MARKERS):
            return c
        if (c / "tokenizer").is_dir() and any((c / "tokenizer" / m).exists() for m in TOKENIZER_MARKERS):
            return c / "tokenizer"
    return None


def load_config(folder: Path):
    from mptkit.model.config import MPTConfig

    try:
        return MPTConfig.from_json_file(folder / "config.json")
    except ConfigError as e:
        raise ExportError(f"cannot export: {e}") from None


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model ``cfg`` describes (built on the meta device: no memory)."""
    from mptkit.model.model import MPTForCausalLM

    m = MPTForCausalLM(cfg, init=False, device="meta")
    out = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


class TensorStore:
    """Lazy access by name to the tensors of a model folder's weights (safetensors, or torch .bin via mmap)."""

    def __init__(self, folder: Path):
        import json

        self.folder = folder
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles: list = []
        files: list[Path]
        idx = None
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (folder / name).exists():
                idx = folder / name
                break
        if idx is not None:
            try:
                wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({folder / f for f in wm.values()})
            except (ValueError, KeyError, TypeError) as e:
                raise ExportError(f"{idx}: not a valid shard index ({e})") from None
        elif (folder / "model.safetensors").exists():
            files = [folder / "model.safetensors"]
        elif (folder / "pytorch_model.bin").exists():
            files = [folder / "pytorch_model.bin"]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{folder}: no weights found (expected model.safetensors or shards with an index)")
        for f in files:
            if not f.exists():
                raise ExportError(f"{f}: listed in the shard index but missing")
            if f.suffix == ".safetensors":
                self._add_safetensors(f)
            else:
                self._add_bin(f)

    def _add_safetensors(self, f: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles.append(h)
            for k in h.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                name = normalise_key(k)
                self._shapes[name] = tuple(h.get_slice(k).get_shape())
                self._getters[name] = (lambda h=h, k=k: h.get_tensor(k))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{f}: corrupt or unreadable safetensors file ({e})") from None

    def _add_bin(self, f: Path) -> None:
        for k, v in load_bin_state_dict(f).items():
            name = normalise_key(k)
            self._shapes[name] = tuple(v.shape)
            self._getters[name] = (lambda v=v: v)

    def names(self) -> list[str]:
        return list(self._getters)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._getters

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._getters[name]()
        except KeyError:
            raise ExportError(f"{self.folder}: tensor '{name}' is missing") from None

    def check_against(self, cfg) -> None:
        """Refuse weights that do not match config.json (missing or mis-shaped tensors), naming them."""
        want = expected_shapes(cfg)
        missing = [k for k in want if k not in self._getters]
        bad = [f"{k}: file {self._shapes[k]} vs config {want[k]}" for k in want
               if k in self._shapes and self._shapes[k] != want[k]]
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
        if bad:
            problems.append(f"mis-shaped tensors ({len(bad)}): " + "; ".join(bad[:8]))
        if problems:
            raise ExportError(f"{self.folder}: weights do not match config.json — " + " | ".join(problems))
