"""`mptkit convert composer CKPT.pt OUT`: an llm-foundry / Composer MPT checkpoint -> an HF folder.

``ckpt`` is a ``.pt`` file or a sharded (DCP) checkpoint folder (``fsdp_config.state_dict_type: sharded``,
read in this one process by :func:`mptkit.io.composer.load_composer_sharded`). The checkpoint is read through
:mod:`mptkit.io.composer`'s allow-list unpickler (no code from the pickle runs); ``state.model``'s ``model.transformer.*`` tensors are checked against the model's config (from the
checkpoint's HF metadata, or ``config=``) and written with the tokenizer the checkpoint carries (or
``tokenizer=``) as the same HF folder ``mptkit export hf`` writes, atomically: ``OUT`` appears complete or
not at all.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from mptkit.errors import CheckpointError, ExportError, MPTKitError
from mptkit.utils.dtypes import ALIASES, DTYPES
from mptkit.utils.fs import atomic_dir, publish_permissions
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)


def convert_composer(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "fp32",
    layout: str = "transformers",
    overwrite: bool = False,
) -> Path:
    """Write the MPT model of Composer checkpoint ``ckpt`` as an HF folder ``out``; returns ``out``.

    ``config``: a config.json, model folder or model YAML, when the checkpoint has no HF metadata (or to
    override it). ``tokenizer``: a tokenizer folder, instead of the files the checkpoint carries."""
    from mptkit.io.composer import (
        composer_hf_config,
        composer_model_tensors,
        load_composer_checkpoint,
        load_composer_sharded,
        write_composer_tokenizer,
    )
    from mptkit.io.hf_folder import load_state_into, save_pretrained
    from mptkit.model import MPTForCausalLM, load_model_config
    from mptkit.model.config import MPTConfig

    dtype = ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if layout not in ("transformers", "mosaicml"):
        raise ExportError(f"--layout {layout}: expected transformers or mosaicml")
    ckpt, out = Path(ckpt), Path(out)
    check_output(out, kind="folder", inputs=[] if ckpt.is_dir() else [ckpt], sources=[ckpt] if ckpt.is_dir() else [], replaceable=lambda p: (p / "config.json").exists(),
                 earlier="an earlier export (config.json)", overwrite=overwrite, error=ExportError)
    try:
        state = load_composer_sharded(ckpt) if ckpt.is_dir() else load_composer_checkpoint(ckpt)
        tensors = composer_model_tensors(state, str(ckpt))
        if config is not None:
            cfg = load_model_config(str(config))
            cfg = cfg.replace(init_device="cpu") if cfg.init_device == "meta" else cfg
        else:
            content = composer_hf_config(state)
            if content is None:
                raise ExportError(f"{ckpt}: the checkpoint carries no model config (state.integrations.huggingface."
                                  "model.config); pass --config CONFIG.json / MODEL_FOLDER / MODEL.yaml")
            content.pop("init_device", None)
            cfg = MPTConfig.from_dict(content, where=f"{ckpt}: state.integrations.huggingface.model.config")
        model = MPTForCausalLM(cfg, init=False, device="meta")
        load_state_into(model, tensors.items(), source=str(ckpt), dtype=torch.float32, device="cpu")
        model.reset_buffers()
    except (ExportError, CheckpointError):
        raise  # they name the checkpoint and the reason (a refused pickle global, mismatched tensors)
    except MPTKitError as e:
        raise ExportError(f"cannot convert {ckpt}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="mptkit-composer-tok-") as tok_tmp:
        tok_folder = Path(tokenizer) if tokenizer is not None else None
        if tok_folder is None and write_composer_tokenizer(state, tok_tmp):
            tok_folder = Path(tok_tmp)
            if ckpt.is_dir() and not _tokenizer_loads(tok_folder):
                log.warning("%s: the tokenizer saved in this sharded checkpoint does not load back (DCP's "
                            "flattening drops empty containers of its tokenizer.json); the folder has none "
                            "(pass --tokenizer DIR)", ckpt)
                tok_folder = None
        if tok_folder is None:
            log.warning("%s: the checkpoint carries no tokenizer; the folder has none (pass --tokenizer DIR)", ckpt)
        torch_dtype = getattr(torch, DTYPES[dtype])
        with write_errors(out, ExportError), atomic_dir(out) as tmp:
            save_pretrained(model, tmp, layout=layout, dtype=torch_dtype, tokenizer=tok_folder)
            publish_permissions(tmp)
    log.info("converted %s (%d tensors) -> %s (%s, %s layout)", ckpt, len(tensors), out, dtype, layout)
    return out


def _tokenizer_loads(folder: Path) -> bool:
    """Whether ``folder``'s tokenizer.json (if any) is one the tokenizers library reads."""
    if not (folder / "tokenizer.json").is_file():
        return True
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - the Rust parser raises plain Exception
        return False
    return True


__all__ = ["convert_composer"]
