"""One way to open whatever a user points at as a model: :func:`open_model_source`.

A *model source* is one of

* a **model folder** (HF layout: config.json + weights, :mod:`mptkit.io.hf_folder`);
* a **training run** or **save folder**: its newest valid trainer checkpoint is used
  (:func:`mptkit.io.checkpoints.find_latest_checkpoint`; invalid ones are skipped with a warning);
* a **checkpoint folder** (``ep{E}-ba{B}/`` with a manifest): its ``model/`` folder;
* a **sharded checkpoint** (FSDP, ``state_dict_type: sharded``), or a run whose newest valid checkpoint is
  one: consolidated into a temporary HF folder in this process (:mod:`mptkit.io.dcp`), removed when the
  source is closed;
* a **LoRA adapter** (an adapter folder, or a LoRA run / checkpoint, whose ``model/`` is one): the base model
  folder it names (``mptkit_adapter.json``) with the adapter on top (``adapter``), or any model source with
  ``adapter=`` an adapter folder / LoRA run. ``load_model`` applies it unmerged (``mptkit.io.adapter``; its
  base fingerprint checked).

Its tokenizer is looked for beside the weights, then in the run (:func:`find_tokenizer_folder`). generate,
chat, serve, eval and the exporters all open their model this way, so each accepts the same paths.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import CheckpointError
from mptkit.io.checkpoints import (
    MANIFEST,
    MODEL_DIR,
    SHARDED_DIR,
    find_latest_checkpoint,
    is_sharded,
    list_checkpoints,
    verify_checkpoint,
)
from mptkit.io.hf_folder import checkpoint_files, is_model_folder
from mptkit.io.tokenizer_files import find_tokenizer_folder, load_tokenizer

log = logging.getLogger(__name__)

EXPECTED = "a model folder with config.json + *.safetensors, a training run or a checkpoint"


@dataclass
class ModelSource:
    """An opened model source. ``folder`` is the HF model folder to read (for a sharded checkpoint a
    temporary one, which lives until :meth:`close`, or the end of the ``with`` block); ``kind`` is
    ``"model"``, ``"checkpoint"`` or ``"sharded"``; ``checkpoint`` the trainer checkpoint used (None for a
    model folder); ``tokenizer_folder`` where the tokenizer files are (None: there are none)."""

    path: Path
    folder: Path
    kind: str
    checkpoint: Path | None = None
    tokenizer_folder: Path | None = None
    adapter: Path | None = None  # a LoRA adapter folder applied on top of ``folder`` by load_model
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def load_config(self):
        """The model's :class:`~mptkit.model.config.MPTConfig` (its config.json)."""
        from mptkit.model.config import MPTConfig

        return MPTConfig.from_json_file(self.folder / "config.json")

    def load_model(self, **kw: Any):
        """``MPTForCausalLM.from_pretrained(self.folder, **kw)`` (dtype, device, attn_impl, config overrides),
        with the source's LoRA adapter applied (unmerged) when it has one."""
        from mptkit.model.model import MPTForCausalLM

        if self.adapter is not None and kw.get("quant"):
            raise CheckpointError(f"{self.adapter}: a LoRA adapter on a quantised base is not supported; merge it "
                                  "first (mptkit export hf RUN OUT --merge), then quantise the merged folder")
        if self.adapter is not None:
            # the settings the LoRA run trained the model at (the recipe's max_seq_len, attn_config overrides: no
            # weight depends on them) come with its adapter, as a full finetune's exported config.json carries them
            from mptkit.io.adapter import read_adapter_meta

            trained = read_adapter_meta(self.adapter).get("model_config") or {}
            for key in ("max_seq_len", "attn_config"):
                if key in trained and key not in kw:
                    kw[key] = trained[key]
        model = MPTForCausalLM.from_pretrained(self.folder, **kw)
        if self.adapter is not None:
            from mptkit.io.adapter import load_adapter

            load_adapter(model, self.adapter)
            log.info("applied the LoRA adapter %s (unmerged) to %s", self.adapter, self.folder)
        return model

    def load_tokenizer(self):
        """The tokenizer found for this source, or None when there is none."""
        return load_tokenizer(self.tokenizer_folder) if self.tokenizer_folder is not None else None

    def close(self) -> None:
        """Remove the temporary folder of a consolidated sharded checkpoint (nothing to do otherwise)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ModelSource:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model_source(
    path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, consolidate: bool = True,
    adapter: str | os.PathLike | None = None,
) -> ModelSource:
    """Open ``path`` (a model folder, a training run / save folder, a checkpoint, a sharded checkpoint) as a
    :class:`ModelSource`; use it in a ``with`` block (or call ``close()``) so that a consolidated sharded
    checkpoint's temporary folder is removed.

    ``tokenizer``: a folder with tokenizer files to use instead of the one found beside the weights or in
    the run (one without tokenizer files is a :class:`~mptkit.errors.DataError`). ``consolidate=False``
    refuses a sharded checkpoint instead of writing a temporary HF folder from it. Anything else that is no
    usable model is a :class:`CheckpointError` saying what was found and what was expected. ``adapter``: a LoRA
    adapter folder (or a LoRA run / checkpoint) to apply on top of ``path``'s model."""
    if adapter is not None:
        ad = resolve_adapter(adapter)
        src = open_model_source(path, tokenizer=tokenizer, consolidate=consolidate)
        if src.adapter is not None:
            src.close()
            raise CheckpointError(f"{path} already is a LoRA adapter ({src.adapter}); give its base model as MODEL "
                                  "and the adapter as --adapter")
        src.adapter = ad
        if tokenizer is None and src.tokenizer_folder is None:
            src.tokenizer_folder = find_tokenizer_folder(ad, ad, None)
        return src
    p = Path(path)
    from mptkit.io.adapter import is_adapter_folder

    if is_adapter_folder(p):
        return _adapter_source(p, p, None, tokenizer)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder (expected {EXPECTED})")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder (expected {EXPECTED})")
    if is_model_folder(p):
        return ModelSource(
            path=p, folder=p, kind="model", tokenizer_folder=find_tokenizer_folder(p, p, tokenizer)
        )
    if (p / "config.json").is_file() and not (p / MANIFEST).exists() and not _has_checkpoints(p):
        checkpoint_files(p)  # config.json without weights: raises naming the weight files looked for
    if (p / MANIFEST).exists():  # a checkpoint itself
        reason = verify_checkpoint(p)
        if reason is not None:
            raise CheckpointError(f"{p}: an invalid checkpoint: {reason}")
        ck = p
    else:
        ck = find_latest_checkpoint(p)
    if ck is None:
        raise CheckpointError(f"{p}: not a model folder, and no usable checkpoint in it: {_why_none(p)}")
    if ck != p:
        log.info("%s: using the newest valid checkpoint, %s", p, ck)
    if not is_sharded(ck):
        folder = ck / MODEL_DIR
        from mptkit.io.adapter import is_adapter_folder

        if is_adapter_folder(folder):  # a LoRA run: its base model with the adapter on top
            return _adapter_source(p, folder, ck, tokenizer)
        return ModelSource(
            path=p,
            folder=folder,
            kind="checkpoint",
            checkpoint=ck,
            tokenizer_folder=find_tokenizer_folder(folder, p, tokenizer),
        )
    if not consolidate:
        raise CheckpointError(
            f"{ck} is a sharded checkpoint (fsdp_config.state_dict_type: sharded): its weights are in "
            f"{SHARDED_DIR}/; write an HF folder from it with `mptkit export hf RUN OUT` (or "
            "mptkit.io.dcp.consolidate_sharded_checkpoint(ckpt, out)), or train with state_dict_type: full"
        )
    tok_folder = find_tokenizer_folder(ck / MODEL_DIR, p, tokenizer)  # before the work: a bad --tokenizer
    from mptkit.io.dcp import consolidate_sharded_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="mptkit-consolidated-")
    log.info("%s: consolidating the sharded checkpoint %s", p, ck)
    try:
        folder = consolidate_sharded_checkpoint(ck, Path(tmp.name) / "model")
    except CheckpointError as e:
        tmp.cleanup()
        raise CheckpointError(f"{p}: the sharded checkpoint {ck} cannot be read: {e}") from None
    except BaseException:
        tmp.cleanup()
        raise
    return ModelSource(
        path=p, folder=folder, kind="sharded", checkpoint=ck, tokenizer_folder=tok_folder, _tmp=tmp
    )


def resolve_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: an adapter folder itself, or a LoRA run / checkpoint (its newest valid
    checkpoint's ``model/``)."""
    from mptkit.io.adapter import ADAPTER_CONFIG, is_adapter_folder

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"--adapter {p}: no such folder (expected a LoRA adapter folder with {ADAPTER_CONFIG}, "
                              "or a LoRA training run)")
    if is_adapter_folder(p):
        return p
    ck = p if (p / MANIFEST).exists() else find_latest_checkpoint(p)
    if ck is not None and is_adapter_folder(ck / MODEL_DIR):
        return ck / MODEL_DIR
    raise CheckpointError(f"--adapter {p}: not a LoRA adapter (no {ADAPTER_CONFIG} with adapter_model.safetensors "
                          "in it, nor in the newest checkpoint of a run there)")


def _adapter_source(p: Path, adapter: Path, ck: Path | None, tokenizer) -> ModelSource:
    from mptkit.io.adapter import base_folder_of

    base = base_folder_of(adapter)
    if base is None or not is_model_folder(base):
        what = f"names {base}, which is not a model folder there" if base is not None else "names no base model"
        raise CheckpointError(f"{p}: a LoRA adapter whose record {what}; give the base model and the adapter: "
                              f"mptkit generate BASE --adapter {p} (export: merge it onto BASE with mptkit.io.adapter)")
    return ModelSource(path=p, folder=base, kind="checkpoint" if ck is not None else "model", checkpoint=ck,
                       tokenizer_folder=find_tokenizer_folder(adapter, p, tokenizer) or find_tokenizer_folder(
                           base, base, None), adapter=adapter)


def _has_checkpoints(p: Path) -> bool:
    return bool(list_checkpoints(p))


def _why_none(p: Path) -> str:
    """Why run or save folder ``p`` gave no checkpoint (find_latest_checkpoint logged each invalid one's reason)."""
    n = len(list_checkpoints(p))
    skipped = f"; {n} invalid one(s) skipped, see the warnings above" if n else ""
    return (
        f"no valid checkpoint found (looked for ep*-ba* folders with a manifest.json in {p} "
        f"and {p / 'checkpoints'}{skipped})"
    )


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a model folder holds for the model ``cfg`` describes (the model built
    on the meta device: no memory; a tied LM head is not stored)."""
    from mptkit.model.model import MPTForCausalLM

    m = MPTForCausalLM(cfg, init=False, device="meta")
    out = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
