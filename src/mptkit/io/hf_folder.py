"""HF-layout model folders on disk: config.json + safetensors (sharded with an index above a size).

Read: ``model.safetensors``, ``model.safetensors.index.json`` (shards), any ``*.safetensors``, and — only
with ``torch.load(weights_only=True)`` — ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``; one
discovery (:func:`checkpoint_files`) for loading a model and for the exporters' lazy :class:`TensorStore`.
Tensor names are MPT's (Composer / DDP prefixes are stripped); a folder with missing, unexpected or
mis-shaped tensors is refused with their names. Writes are atomic per file, and the index (or single file)
is written last.

This module knows the model only through an instance (its ``state_dict``, ``config``) or a class handed in:
it never imports ``mptkit.model.model``, whose ``from_pretrained`` / ``save_pretrained`` call into it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mptkit.errors import CheckpointError, ConfigError
from mptkit.io.tokenizer_files import save_tokenizer, set_model_max_length
from mptkit.model.config import MPTConfig
from mptkit.utils.fs import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# what makes a folder a model folder (beside config.json)
WEIGHT_PATTERNS = (
    SAFE_SINGLE,
    SAFE_INDEX,
    "model-*-of-*.safetensors",
    BIN_SINGLE,
    BIN_INDEX,
    "*.safetensors",
)


def parse_size(s: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / int -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size: cannot read size '{s}' (use e.g. 5GB, 500MB)")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(num * base**power)


# ------------------------------------------------------------------------------------ saving


def _state_for_saving(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_pretrained(
    model,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    layout: str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    config: MPTConfig | None = None,
) -> Path:
    """Write config.json and safetensors weights (one file, or shards + index above ``max_shard_size``).

    ``dtype`` casts floating tensors on the way out (e.g. torch.bfloat16 for a smaller export).
    ``config``: the config.json to write instead of ``model.config`` (same shapes; e.g. other file metadata).
    ``tokenizer``: a transformers tokenizer (or a folder holding tokenizer files) saved alongside.
    """
    from safetensors.torch import save_file

    from mptkit.model.lora import has_lora

    if has_lora(model):  # its state dict holds base_layer / lora_A / lora_B names no reader of model folders knows
        raise CheckpointError("this model carries LoRA adapters: save the adapter (mptkit.io.adapter.save_adapter) "
                              "or fold it in first (mptkit.model.lora.merge_lora) to write a model folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = _state_for_saving(model)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    # Remove weights of an earlier save in a different shard layout only after the new ones are in place.
    old = set(_weight_files(folder))
    written: set[Path] = set()
    if len(shards) == 1:
        target = folder / SAFE_SINGLE
        with atomic_path(target) as tmp:
            save_file(shards[0], str(tmp), metadata=meta)
        written.add(target)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            with atomic_path(folder / name) as tmp:
                save_file(shard, str(tmp), metadata=meta)
            written.add(folder / name)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        atomic_write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(folder / SAFE_INDEX)
    cfg = config or model.config
    cfg.save(folder, layout=layout)
    for p in old - written:
        p.unlink(missing_ok=True)
    save_tokenizer(tokenizer, folder)
    if tokenizer is not None:  # the folder's tokenizer limits inputs to what its model accepts
        set_model_max_length(folder, cfg.max_seq_len)
    return folder


def _weight_files(folder: Path) -> list[Path]:
    pats = ("model.safetensors", "model-*-of-*.safetensors", SAFE_INDEX)
    out: list[Path] = []
    for p in pats:
        out.extend(folder.glob(p))
    return out


# ------------------------------------------------------------------------------------ loading


def _read_index(path: Path) -> dict[str, str]:
    try:
        idx = json.loads(path.read_text(encoding="utf-8"))
        wm = idx["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError("weight_map is not a mapping")
        return wm
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({e})") from None


def checkpoint_files(folder: str | os.PathLike) -> tuple[list[Path], str]:
    """The weight files of a model folder and their kind ("safe" or "bin"): a shard index's files, the single
    file, or any ``*.safetensors``; a :class:`CheckpointError` when there are none or one listed is missing."""
    folder = Path(folder)
    files: list[Path]
    if (folder / SAFE_INDEX).exists():
        files = sorted({folder / f for f in _read_index(folder / SAFE_INDEX).values()})
        kind = "safe"
    elif (folder / SAFE_SINGLE).exists():
        files, kind = [folder / SAFE_SINGLE], "safe"
    elif (folder / BIN_INDEX).exists():
        files = sorted({folder / f for f in _read_index(folder / BIN_INDEX).values()})
        kind = "bin"
    elif (folder / BIN_SINGLE).exists():
        files, kind = [folder / BIN_SINGLE], "bin"
    else:
        singles = sorted(folder.glob("*.safetensors"))
        if not singles:
            raise CheckpointError(
                f"{folder}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
            )
        files, kind = singles, "safe"
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed in the shard index but missing")
    return files, kind


def iter_checkpoint_tensors(folder: str | os.PathLike) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's weights, file by file (CPU, lazily per file)."""
    files, kind = checkpoint_files(folder)
    for f in files:
        if kind == "safe":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    for k in sf.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                        yield k, sf.get_tensor(k)
            except SafetensorError as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{f}: cannot read ({e})") from None
        else:
            yield from load_bin_state_dict(f).items()


def load_bin_state_dict(f: Path) -> dict:
    """A ``pytorch_model*.bin`` file's tensors, memory-mapped, through ``torch.load(weights_only=True)`` only
    (no arbitrary pickles from a user's path). A legacy (pre-1.6, non-zip) torch file is refused with how to
    convert it; so is a file that is no torch file at all."""
    try:
        with open(f, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        from mptkit.utils.outputs import describe_os_error

        raise CheckpointError(describe_os_error(e, f, "cannot read")) from None
    if magic != b"PK\x03\x04":  # torch >= 1.6 writes a zip archive
        if magic[:1] == b"\x80":  # a bare pickle stream: torch's legacy format
            raise CheckpointError(
                f"{f}: a legacy (pre-1.6, non-zip) torch file, which mptkit will not unpickle. Convert it once, "
                "in an environment you trust: load it yourself (torch.load) and save the weights as safetensors "
                "(the model's save_pretrained, or safetensors.torch.save_file(state_dict, 'model.safetensors')), "
                "or re-save it with torch.save (zip format); then remove the .bin"
            )
        raise CheckpointError(f"{f}: not a torch checkpoint (no zip archive; it starts with {magic!r})")
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, non-tensor payloads refused by weights_only
        raise CheckpointError(f"{f}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def normalise_key(k: str) -> str:
    """MPT's own tensor name for a key saved by Composer (``model.transformer.*``) or a DDP wrapper."""
    for prefix in ("model.transformer.", "module.transformer."):  # Composer / DDP-wrapped names
        if k.startswith(prefix):
            return k[len(prefix) - len("transformer.") :]
    if k.startswith("model.lm_head."):
        return k[len("model.") :]
    return k


def load_state_into(
    model, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str, dtype, device, keep_dtype=frozenset()
) -> None:
    """Check names and shapes against the model, then assign the tensors (no second copy in memory).
    ``keep_dtype``: names whose stored dtype is part of the format (q8_0 scales), never cast to ``dtype``."""
    expected = {k: v for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    got: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, t in tensors:
        k = normalise_key(k)
        if k == "lm_head.weight" and tied:
            continue  # transformers may store the tied head; it is wte
        if k.endswith(("attn.masked_bias", "attn.bias")) and k not in expected:
            continue  # legacy buffers some exporters wrote
        if k not in expected:
            unexpected.append(k)
            continue
        got[k] = t
    missing = [k for k in expected if k not in got]
    shape_bad = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in got
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"missing tensors ({len(missing)}): {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
            + (" …" if len(unexpected) > 8 else "")
        )
    if shape_bad:
        problems.append(f"mis-shaped tensors ({len(shape_bad)}): " + "; ".join(shape_bad[:8]))
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match config.json — "
            + " | ".join(problems)
            + " (check d_model / n_heads / n_layers / vocab_size / attn_config / tie_word_embeddings)"
        )
    final = {}
    for k, t in got.items():
        cast = dtype is not None and t.is_floating_point() and k not in keep_dtype
        want_dtype = dtype if cast else t.dtype
        final[k] = t.to(device=device, dtype=want_dtype)
    model.load_state_dict(final, strict=True, assign=True)


def load_pretrained(
    model_cls,
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_impl: str | None = None,
    quant: str | None = None,
    **config_overrides: Any,
):
    """Build a ``model_cls`` (``MPTForCausalLM``: its ``from_pretrained`` calls this) from a HF-layout folder
    without allocating it twice (built on the meta device, then the file's tensors assigned). A quantised
    folder loads as such; ``quant`` (``"int8"``) quantises an fp32 folder tensor by tensor as it is read
    (:mod:`mptkit.io.quant_folder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a folder. mptkit loads local HF-layout folders (config.json + *.safetensors); "
            "download a hub model first (e.g. `huggingface-cli download mosaicml/mpt-7b --local-dir DIR`)"
        )
    cfg = MPTConfig.from_json_file(folder / "config.json")
    if attn_impl is not None:
        config_overrides.setdefault("attn_config", {})["attn_impl"] = attn_impl
    changes = dict(config_overrides)  # the caller's overrides, which alone are named in the errors' label
    if cfg.init_device == "meta":  # where a recipe built it; the loaded model has its weights (no override)
        changes.setdefault("init_device", "cpu")
    if changes:  # before the model is built: every module is made from the final config
        try:
            cfg = cfg.replace(**changes)
        except ConfigError as e:
            raise ConfigError(f"{folder}: overriding {', '.join(sorted(changes))}: {e}") from None
    model = model_cls(cfg, init=False, device="meta")
    source = (
        str(folder)
        if not config_overrides
        else f"{folder} (with overrides of {', '.join(sorted(config_overrides))})"
    )
    from mptkit.io.quant_folder import prepare_for_loading
    from mptkit.model.quant import quant_buffer_names

    tensors = prepare_for_loading(
        model, folder, iter_checkpoint_tensors(folder), quant=quant, source=str(folder), normalise=normalise_key
    )
    load_state_into(
        model, tensors, source=source, dtype=dtype, device=device, keep_dtype=quant_buffer_names(model)
    )
    model.reset_buffers()
    model.eval()
    return model


# ------------------------------------------------------------------------------------ lazy access


def is_model_folder(p: str | os.PathLike) -> bool:
    """True for a folder holding config.json and weight files (no trainer checkpoint, no run folder)."""
    p = Path(p)
    return p.is_dir() and (p / "config.json").is_file() and any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS)


class TensorStore:
    """Lazy access by name to the tensors of a model folder's weights (safetensors handles kept open, torch
    .bin memory-mapped), found as :func:`checkpoint_files` finds them; names are MPT's (:func:`normalise_key`).
    The exporters read a 7B model through it one tensor at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles: list = []
        files, kind = checkpoint_files(self.folder)
        for f in files:
            if kind == "safe":
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
                self._getters[name] = lambda h=h, k=k: h.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({e})") from None

    def _add_bin(self, f: Path) -> None:
        for k, v in load_bin_state_dict(f).items():
            name = normalise_key(k)
            self._shapes[name] = tuple(v.shape)
            self._getters[name] = lambda v=v: v

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
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing") from None

    def check_against(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Refuse weights that lack a tensor of ``expected`` (name -> shape: what config.json describes, as
        :func:`mptkit.io.source.expected_shapes` gives) or hold one of another shape, naming them."""
        missing = [k for k in expected if k not in self._getters]
        bad = [
            f"{k}: file {self._shapes[k]} vs config {tuple(expected[k])}"
            for k in expected
            if k in self._shapes and self._shapes[k] != tuple(expected[k])
        ]
        problems = []
        if missing:
            problems.append(
                f"missing tensors ({len(missing)}): "
                + ", ".join(missing[:8])
                + (" …" if len(missing) > 8 else "")
            )
        if bad:
            problems.append(f"mis-shaped tensors ({len(bad)}): " + "; ".join(bad[:8]))
        if problems:
            raise CheckpointError(
                f"{self.folder}: weights do not match config.json — " + " | ".join(problems)
            )
