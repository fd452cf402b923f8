"""`mptkit export quant`: a model folder, training run or checkpoint -> a quantised model folder.

The model is read tensor by tensor and each block Linear's weight quantised as it streams by
(``MPTForCausalLM.from_pretrained(folder, quant=...)``, :mod:`mptkit.io.quant_folder`), so the peak memory is
about the quantised model plus one fp32 tensor; the folder (config.json with its ``quantization`` entry,
safetensors with the int8 blocks and fp16 scales, the tokenizer files) is written into a temporary folder
beside ``OUT`` and moved into place only when complete. ``mptkit generate/chat/serve/eval OUT`` load it
quantised; the format and the policy: docs/inference.md ("Quantised inference").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mptkit.errors import ConfigError, ExportError, MPTKitError
from mptkit.export.source import load_config, open_source
from mptkit.io.hf_folder import is_model_folder
from mptkit.utils.fs import atomic_dir, publish_permissions
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)


@dataclass
class QuantExportResult:
    folder: Path
    source: Path
    quant: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    n_bytes: int = 0


def _check_out(src: Path, model_folder: Path | None, out: Path, overwrite: bool) -> None:
    check_output(
        out,
        kind="folder",
        sources=[model_folder] if model_folder is not None else [],
        inputs=[src],
        replaceable=lambda p: (p / "config.json").exists(),
        earlier="an earlier export (config.json)",
        overwrite=overwrite,
        error=ExportError,
    )


def export_quant(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quant: str = "int8",
    max_shard_size: int | str = "5GB",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> QuantExportResult:
    """Write ``src``'s model quantised (``quant``: ``int8`` = q8_0 blocks, ``q4`` = q4_0 blocks) as a model
    folder at ``out``."""
    from mptkit.io.hf_folder import parse_size, save_pretrained
    from mptkit.model.model import MPTForCausalLM
    from mptkit.model.quant import check_quant_type

    try:  # the arguments first: a sharded source is consolidated below
        quant = check_quant_type(quant)
        parse_size(max_shard_size)
    except ConfigError as e:
        raise ExportError(f"--quant / --max-shard-size: {e}") from None
    src, out = Path(src), Path(out)
    _check_out(src, src if is_model_folder(src) else None, out, overwrite)
    with open_source(src, tokenizer) as source:
        folder = source.folder
        _check_out(src, folder, out, overwrite)
        load_config(folder)  # a quantised source is refused, named
        try:
            model = MPTForCausalLM.from_pretrained(folder, quant=quant)
        except MPTKitError as e:
            raise ExportError(f"cannot export {folder}: {e}") from None
        entry = model.config.extra["quantization"]
        tok_folder = source.tokenizer_folder
        if tok_folder is None:
            log.warning(
                "%s: no tokenizer files found beside the model or the run; the export has none "
                "(pass --tokenizer DIR to include one)",
                src,
            )
        log.info(
            "exporting %s -> %s (%s: %d Linears quantised, %d kept fp32)",
            folder,
            out,
            quant,
            len(entry["quantized"]),
            len(entry["kept"]),
        )
        with write_errors(out, ExportError), atomic_dir(out) as tmp:
            save_pretrained(model, tmp, max_shard_size=max_shard_size, tokenizer=tok_folder)  # + its tokenizer
            files = sorted(p.name for p in tmp.iterdir())
            n_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
            publish_permissions(tmp)
        log.info("wrote %s: %s", out, ", ".join(files))
        return QuantExportResult(
            folder=out,
            source=folder,
            quant=quant,
            quantized=list(entry["quantized"]),
            kept=dict(entry["kept"]),
            files=files,
            n_bytes=n_bytes,
        )


__all__ = ["QuantExportResult", "export_quant"]
