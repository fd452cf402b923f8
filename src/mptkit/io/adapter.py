"""LoRA adapter folders, peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensors carry peft's names for a causal LM (``base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight``;
mptkit's module names are transformers' ``MptForCausalLM`` names), so ``peft.PeftModel.from_pretrained(
MptForCausalLM.from_pretrained(base), folder)`` loads an adapter mptkit trained, and an adapter peft saved for
transformers' MPT loads here. Beside them mptkit writes ``mptkit_adapter.json`` (peft ignores it): the base
model folder the adapter was trained on and its fingerprint (:func:`mptkit.model.lora.base_fingerprint`), so
an adapter applied to another base is refused instead of silently computing something else.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mptkit.errors import CheckpointError, ConfigError
from mptkit.model.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    base_fingerprint,
    load_adapter_state_dict,
)
from mptkit.utils.fs import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_META = "mptkit_adapter.json"


def is_adapter_folder(p: str | os.PathLike) -> bool:
    p = Path(p)
    return (p / ADAPTER_CONFIG).is_file() and ((p / ADAPTER_WEIGHTS).is_file() or (p / ADAPTER_WEIGHTS_BIN).is_file())


def save_adapter(model, folder: str | os.PathLike, *, base_folder: str | os.PathLike | None = None,
                 fingerprint: str | None = None, tokenizer: Any = None) -> Path:
    """Write ``model``'s adapter (peft's files) into ``folder`` (the caller makes it atomic), with the base's
    reference (``model._lora_base`` when not given) and, given ``tokenizer``, its files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings: LoraSettings = model.peft_config
    ref = dict(getattr(model, "_lora_base", None) or {})
    if base_folder is not None:
        ref["base_folder"] = str(base_folder)
    if fingerprint is not None:
        ref["base_fingerprint"] = fingerprint
    base_name = ref.get("base_folder")
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:  # fsynced, renamed into place, an ordinary file's mode
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, settings.to_peft_config(base_name))
    meta = {"format": "mptkit-lora/1", "base_folder": ref.get("base_folder"),
            "base_fingerprint": ref.get("base_fingerprint"),
            "base_dtype": settings.base_dtype, "model_config": model.config.to_dict()}
    atomic_write_text(folder / ADAPTER_META, json.dumps(meta, indent=2, default=str) + "\n")
    if tokenizer is not None:
        from mptkit.io.tokenizer_files import save_tokenizer

        save_tokenizer(tokenizer, folder)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> LoraSettings:
    p = Path(folder) / ADAPTER_CONFIG
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read the adapter config ({e})") from None
    meta = read_adapter_meta(folder)
    if meta.get("base_dtype") and "base_dtype" not in d:
        d["base_dtype"] = meta["base_dtype"]
    try:
        return LoraSettings.from_dict(d, where=str(p), peft_file=True)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_adapter_meta(folder: str | os.PathLike) -> dict:
    """mptkit's ``mptkit_adapter.json`` (base folder, fingerprint), or {} for an adapter peft wrote."""
    p = Path(folder) / ADAPTER_META
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read it ({e})") from None


def read_adapter_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / ADAPTER_WEIGHTS))
    return torch.load(folder / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)


def base_folder_of(folder: str | os.PathLike) -> Path | None:
    """The base model folder an mptkit adapter names (relative paths as the run wrote them), or None."""
    b = read_adapter_meta(folder).get("base_folder")
    return Path(b) if b else None


def check_base(folder: str | os.PathLike, model, *, fingerprint: str | None = None) -> None:
    """Refuse applying the adapter at ``folder`` to a base other than the one it was trained on (its
    fingerprint differs); an adapter without one (made by peft) is applied with a log line."""
    want = read_adapter_meta(folder).get("base_fingerprint")
    if not want:
        log.info("%s: no base fingerprint recorded (not written by mptkit): applied without checking the base", folder)
        return
    got = fingerprint or base_fingerprint(model)
    if got != want:
        raise CheckpointError(
            f"{folder}: this adapter was trained on another base model (base fingerprint {want[:19]}..., this "
            f"base {got[:19]}...; it named {read_adapter_meta(folder).get('base_folder')}): pass the base "
            "model it was trained on")


def load_adapter(model, folder: str | os.PathLike, *, check: bool = True):
    """Apply the adapter at ``folder`` to ``model`` (a plain MPT model, in place, unmerged) and return it."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise CheckpointError(f"{folder}: not an adapter folder (expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    settings = read_adapter_config(folder)
    fp = base_fingerprint(model) if check else None
    if check:
        check_base(folder, model, fingerprint=fp)
    try:
        apply_lora(model, settings, where=str(folder / ADAPTER_CONFIG))
        load_adapter_state_dict(model, read_adapter_tensors(folder), where=str(folder))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model._lora_base = {"base_folder": str(base_folder_of(folder) or ""), "base_fingerprint": fp}
    return model


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_META", "ADAPTER_WEIGHTS", "base_folder_of", "check_base", "is_adapter_folder",
    "load_adapter", "read_adapter_config", "read_adapter_meta", "read_adapter_tensors", "save_adapter",
]
