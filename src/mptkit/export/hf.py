"""`mptkit export hf`: a model folder, training run or checkpoint -> a self-contained HF folder.

The output is config.json (MPT's keys; transformers' ``MptForCausalLM`` layout by default, or MosaicML's
``MPTForCausalLM`` layout), safetensors weights (sharded above ``max_shard_size``) and the tokenizer files.
It is written into a temporary folder beside ``OUT`` and moved into place only when complete, so ``OUT`` is
never a half-written folder. What transformers' native MPT cannot express (it hard-codes ALiBi with bias
max 8, MHA, a 4x GELU MLP, …) is logged as a warning, one line per item: such a folder still loads in
mptkit, but transformers would compute a different model from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mptkit.errors import ConfigError, ExportError, MPTKitError
from mptkit.export.source import load_config, open_source
from mptkit.io.hf_folder import is_model_folder
from mptkit.utils.dtypes import ALIASES, DTYPES, torch_name
from mptkit.utils.fs import atomic_dir, publish_permissions
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)

HF_DTYPES = {s: getattr(torch, t) for s, t in DTYPES.items()}  # fp32, bf16, fp16
LAYOUTS = ("transformers", "mosaicml")


@dataclass
class HFExportResult:
    folder: Path
    source: Path
    dtype: str
    layout: str
    files: list[str] = field(default_factory=list)
    tokenizer_from: Path | None = None
    incompatibilities: list[str] = field(default_factory=list)


def _check_out(src: Path, model_folder: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse outputs that would destroy the source or an unrelated folder, or that cannot be written: OUT may
    lie inside a run folder, never inside (or be, or hold) the model folder it is read from."""
    check_output(out, kind="folder", sources=[model_folder] if model_folder is not None else [], inputs=[src],
                 replaceable=lambda p: (p / "config.json").exists(), earlier="an earlier export (config.json)",
                 overwrite=overwrite, error=ExportError)


def export_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    layout: str = "transformers",
    max_shard_size: int | str = "5GB",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    merge: bool = False,
    adapter_only: bool = False,
    adapter: str | os.PathLike | None = None,
) -> HFExportResult:
    """Write ``src``'s model (a model folder, a run or a checkpoint — a sharded FSDP one is consolidated first)
    as a HF folder at ``out``.

    ``dtype``: fp32 | bf16 | fp16 (floating tensors are cast; config.json records it).
    ``layout``: transformers (``MptForCausalLM``, loads without trust_remote_code) | mosaicml.
    ``tokenizer``: a folder with tokenizer files, when neither the model folder nor the run has one.
    ``overwrite``: replace an earlier export at ``out`` (never an unrelated folder).
    A LoRA source (a LoRA run or checkpoint, an adapter folder, or ``adapter`` on top of ``src``) needs one of
    ``merge`` (the adapter folded into the base's weights: a plain HF folder) or ``adapter_only`` (the adapter
    folder alone, peft's files, with the tokenizer).
    """
    from mptkit.io.hf_folder import parse_size, save_pretrained
    from mptkit.model.config import MPTConfig, transformers_incompatibilities
    from mptkit.model.model import MPTForCausalLM

    dtype = ALIASES.get(dtype, dtype)  # the arguments first: a sharded source is consolidated below
    if dtype not in HF_DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(HF_DTYPES)}")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    try:
        parse_size(max_shard_size)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if merge and adapter_only:
        raise ExportError("--merge and --adapter-only: give one (merged weights, or the adapter alone)")
    src, out = Path(src), Path(out)
    _check_out(src, src if is_model_folder(src) else None, out, overwrite)  # before a sharded source is consolidated
    if adapter is not None:
        from mptkit.io.source import open_model_source

        try:
            source_cm = open_model_source(src, tokenizer=tokenizer, adapter=adapter)
        except MPTKitError as e:
            raise ExportError(str(e)) from None
    else:
        source_cm = open_source(src, tokenizer, adapter_ok=True)
    with source_cm as source:
        folder = source.folder
        _check_out(src, folder, out, overwrite)
        if source.adapter is None and (merge or adapter_only):
            raise ExportError(f"{src}: {'--merge' if merge else '--adapter-only'} needs a LoRA source (a LoRA run, an "
                              "adapter folder, or --adapter ADAPTER); this is a plain model")
        if source.adapter is not None and not (merge or adapter_only):
            raise ExportError(f"{src} is a LoRA adapter ({source.adapter}) on {folder}: pass --merge (one HF folder "
                              "with the adapter folded in) or --adapter-only (the adapter's peft files)")
        if adapter_only:
            return _export_adapter(src, source, out)
        cfg = load_config(folder)
        incompat = transformers_incompatibilities(cfg) if layout == "transformers" else []
        if incompat:
            log.warning("transformers' MptForCausalLM cannot express %d setting(s) of this model; the folder loads "
                        "in mptkit, but transformers would compute a different model:", len(incompat))
            for item in incompat:
                log.warning("  - %s", item)
        tok_folder = source.tokenizer_folder
        if tok_folder is None:
            log.warning("%s: no tokenizer files found beside the model or the run; the export has none "
                        "(pass --tokenizer DIR to include one)", src)

        torch_dtype = HF_DTYPES[dtype]
        try:
            if source.adapter is not None:  # merged in fp32, then cast
                from mptkit.model.lora import merge_lora

                model = merge_lora(source.load_model(dtype=torch.float32)).to(torch_dtype)
                log.info("merged the LoRA adapter %s into %s", source.adapter, folder)
            else:
                model = MPTForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        except ConfigError as e:
            raise ExportError(f"cannot export {folder}: {e}") from None
        except Exception as e:
            if isinstance(e, MPTKitError):
                raise ExportError(f"cannot export {folder}: {e}") from None
            raise
        # config.json records the dtype (transformers >= 5 reads "dtype", older versions "torch_dtype").
        name = torch_name(torch_dtype)
        file_cfg = model.config.to_dict()
        file_cfg.pop("dtype", None)
        file_cfg.update(torch_dtype=name, init_device="cpu")
        file_cfg = MPTConfig.from_dict(file_cfg, where=str(folder / "config.json"))

        log.info("exporting %s -> %s (%s, %s layout)", folder, out, dtype, layout)
        with write_errors(out, ExportError), atomic_dir(out) as tmp:  # a full disk: one line naming OUT
            # the tokenizer files are copied and their limit set to the model's max_seq_len (save_pretrained)
            save_pretrained(model, tmp, max_shard_size=max_shard_size, layout=layout, dtype=torch_dtype,
                            config=file_cfg, tokenizer=tok_folder)
            files = sorted(p.name for p in tmp.iterdir())
            publish_permissions(tmp)
        log.info("wrote %s: %s", out, ", ".join(files))
        return HFExportResult(folder=out, source=folder, dtype=dtype, layout=layout, files=files,
                              tokenizer_from=tok_folder, incompatibilities=incompat)


def _export_adapter(src: Path, source, out: Path) -> HFExportResult:
    """The adapter folder alone (peft's adapter_config.json + adapter_model.safetensors, mptkit's base record) with
    the tokenizer, written atomically."""
    import shutil

    from mptkit.io.adapter import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS
    from mptkit.io.tokenizer_files import save_tokenizer

    with write_errors(out, ExportError), atomic_dir(out) as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META):
            if (source.adapter / name).is_file():
                shutil.copy2(source.adapter / name, tmp / name)
        if source.tokenizer_folder is not None:
            save_tokenizer(source.tokenizer_folder, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        publish_permissions(tmp)
    log.info("wrote the adapter %s -> %s: %s", source.adapter, out, ", ".join(files))
    return HFExportResult(folder=out, source=source.adapter, dtype="fp32", layout="peft", files=files,
                          tokenizer_from=source.tokenizer_folder)


__all__ = ["HF_DTYPES", "LAYOUTS", "HFExportResult", "export_hf", "is_model_folder"]
