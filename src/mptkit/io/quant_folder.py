"""Quantised model folders on disk, and quantising a model while it is read.

A quantised folder is an HF-layout folder (:mod:`mptkit.io.hf_folder`) whose config.json has a
``quantization`` entry (written from the model's config by ``save_pretrained``)::

    "quantization": {"format": "mptkit-weight-only", "version": 1, "type": "int8", "block": "q8_0",  # or q4 / q4_0
                     "block_size": 32, "quantized": ["transformer.blocks.0.attn.Wqkv", ...],
                     "kept": {"<module>": "<why it stayed fp32>"}}

and, in its safetensors, for each quantised Linear ``<module>.weight_q`` ((out, in) int8 for q8_0, (out, in/2)
uint8 packed nibbles for q4_0) and ``<module>.scales`` (out, in/32) fp16 instead of ``<module>.weight`` (the
block formats: :mod:`mptkit.model.quant`). Every other
tensor is as in an fp32 folder. It is mptkit's own format: transformers does not read it (export from the
fp32 source for other runtimes).

:func:`prepare_for_loading` is called by ``load_pretrained`` on the meta-device model before the tensors are
assigned: for a quantised folder it checks the entry (an unknown format or version is a
:class:`~mptkit.errors.CheckpointError` saying what to do) and swaps the listed Linears for empty
``QuantLinear`` s; asked for ``quant="int8"`` on an fp32 folder it does the same from the quantisation plan and
quantises each weight as it is read, so the fp32 weights are never all in memory at once (peak: the quantised
model plus one fp32 tensor).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from mptkit.errors import CheckpointError, ConfigError
from mptkit.model.quant import (
    BLOCK_SIZE,
    CONFIG_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEAD_BLOCK,
    HEAD_MODULE,
    QUANT_TYPES,
    READ_VERSIONS,
    QuantLinear,
    check_quant_type,
    plan_quantization,
    quant_buffer_names,
    quantize_weight,
    replace_module,
    set_quantization_entry,
)

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors_unmapped(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file, each read into memory of its own (``readinto``, not a memory
    map), in file order, and the file's pages dropped from the page cache once read where the OS allows.

    Quantising while loading reads every fp32 weight once and keeps only its int8 form: through a memory map
    the touched pages of the whole file would count in the process's resident size (and stay mapped while
    any zero-copy tensor of the file lives); read this way, the peak is the tensors kept plus the one being
    quantised."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
            base = 8 + n
            items = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"),
                key=lambda kv: kv[1]["data_offsets"][0],
            )
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors header ({e})") from None
        for name, info in items:
            try:
                dt = _ST_DTYPES[info["dtype"]]
                a, b = (int(o) for o in info["data_offsets"])
                t = torch.empty([int(d) for d in info["shape"]], dtype=dt)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{f}: tensor {name}: unreadable entry {info!r} ({e})") from None
            nbytes = t.numel() * t.element_size()
            if b - a != nbytes or base + b > size:
                raise CheckpointError(
                    f"{f}: tensor {name}: {b - a} bytes at {a} for {tuple(t.shape)} {dt} "
                    "(corrupt or truncated file)"
                )
            if nbytes:
                fh.seek(base + a)
                got = fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if got != nbytes:
                    raise CheckpointError(f"{f}: tensor {name}: truncated ({got} of {nbytes} bytes)")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fh.fileno(), base + a, nbytes, os.POSIX_FADV_DONTNEED)
            yield name, t


def _unmapped_tensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]]):
    """The folder's tensors read without memory maps (safetensors), else ``tensors`` as given (.bin files)."""
    from mptkit.io.hf_folder import checkpoint_files

    files, kind = checkpoint_files(folder)
    if kind != "safe":
        yield from tensors
        return
    close = getattr(tensors, "close", None)
    if close is not None:  # the mapped reader was never started: nothing to undo
        close()
    for f in files:
        yield from read_safetensors_unmapped(f)


def quantization_entry(cfg) -> dict | None:
    """The config's ``quantization`` entry, or None for an unquantised model."""
    return cfg.extra.get(CONFIG_KEY) if hasattr(cfg, "extra") else None


def check_entry(entry, source: str) -> dict:
    """``entry`` if this mptkit reads it, else a CheckpointError naming the mismatch and the way out."""
    t = entry.get("type") if isinstance(entry, dict) else None
    fix = f"re-quantise it from the fp32 model with `mptkit export quant SRC OUT --quant {t if t in QUANT_TYPES else 'int8'}`"
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{source}: config.json 'quantization' must be a mapping, got {type(entry).__name__}"
        )
    if entry.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{source}: config.json 'quantization' has format {entry.get('format')!r}; this mptkit reads "
            f"{FORMAT_NAME!r} only ({fix})"
        )
    v = entry.get("version")
    if v not in READ_VERSIONS:
        raise CheckpointError(
            f"{source}: quantised with format version {v!r}, this mptkit reads versions "
            f"{', '.join(map(str, READ_VERSIONS))} "
            f"({'a newer mptkit wrote it: upgrade mptkit, or ' if isinstance(v, int) and v > FORMAT_VERSION else ''}"
            f"{fix})"
        )
    t = entry.get("type")
    if t not in QUANT_TYPES or entry.get("block") != QUANT_TYPES[t] or entry.get("block_size") != BLOCK_SIZE:
        raise CheckpointError(
            f"{source}: quantisation type {t!r} / block {entry.get('block')!r} / block_size "
            f"{entry.get('block_size')!r} is not one this mptkit reads (int8 = q8_0, q4 = q4_0 blocks of "
            f"{BLOCK_SIZE}; {fix})"
        )
    if entry.get("head") not in (None, HEAD_BLOCK):
        raise CheckpointError(
            f"{source}: config.json 'quantization.head' is {entry.get('head')!r}; this mptkit reads {HEAD_BLOCK!r} "
            f"or null (the tied LM head kept fp32) ({fix})"
        )
    names = entry.get("quantized")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(
            f"{source}: config.json 'quantization.quantized' must be a list of module names"
        )
    return entry


def _swap_in(model: nn.Module, names: Iterable[str], source: str, block: str) -> list[str]:
    """Replace each named Linear of the (meta) model by an empty QuantLinear of its shape and ``block``."""
    done = []
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{source}: config.json 'quantization' names {name}, which this model does not have"
            ) from None
        if type(m) is QuantLinear and m.block == block:
            done.append(name)
            continue
        if type(m) is not nn.Linear or m.in_features % BLOCK_SIZE:
            raise CheckpointError(
                f"{source}: config.json 'quantization' names {name}, which cannot be {block} blocks"
            )
        q = QuantLinear(
            m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, block=block
        )
        replace_module(model, name, q)
        done.append(name)
    return done


def _swap_in_head(model: nn.Module, head: str | None) -> None:
    """An empty ``head``-block copy of the tied LM head (``quant_head``) on the (meta) model, when ``head``."""
    if head is None:
        return
    w = model.transformer.wte.weight
    setattr(model, HEAD_MODULE, QuantLinear(w.shape[1], w.shape[0], bias=False, device=w.device, block=head))


def _quantizing(
    tensors: Iterable[tuple[str, torch.Tensor]], weights: set[str], normalise, block: str, head: str | None = None
) -> Iterator:
    """The folder's tensors, each ``<module>.weight`` of ``weights`` turned into its ``weight_q`` and
    ``scales`` as it is read (the fp32 tensor is dropped at once); ``head``: the tied embedding is also
    quantised into ``quant_head`` (the fp32 embedding kept for the lookup)."""
    for k, t in tensors:
        name = normalise(k)
        if head is not None and name == "transformer.wte.weight":
            q, s = quantize_weight(t, head)
            yield f"{HEAD_MODULE}.weight_q", q
            yield f"{HEAD_MODULE}.scales", s
        if name in weights:
            mod = name[: -len(".weight")]
            if t.dim() != 2 or t.shape[1] % BLOCK_SIZE:
                raise CheckpointError(f"{mod}.weight: shape {tuple(t.shape)} cannot be {block} blocks")
            q, s = quantize_weight(t, block)
            del t
            yield f"{mod}.weight_q", q
            yield f"{mod}.scales", s
        else:
            yield k, t


def prepare_for_loading(
    model: nn.Module,
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    quant: str | None,
    source: str,
    normalise,
) -> Iterable[tuple[str, torch.Tensor]]:
    """Make the meta-device ``model`` match what will be loaded into it; returns the tensors to load.

    A quantised folder (its config has the entry): the entry is checked and its modules become QuantLinears;
    ``quant`` may then only be None or the folder's own type. An fp32 folder with ``quant``: the plan's
    Linears become QuantLinears and their weights are quantised as they stream by, read from ``folder``
    without memory maps (:func:`read_safetensors_unmapped`). Neither: unchanged."""
    if quant is not None:
        quant = check_quant_type(quant)
    entry = quantization_entry(model.config)
    if entry is not None:
        entry = check_entry(entry, source)
        if quant is not None and quant != entry["type"]:
            raise ConfigError(
                f"{source} is already quantised ({entry['type']}); --quant {quant} cannot re-quantise it"
            )
        _swap_in(model, entry["quantized"], source, entry["block"])
        _swap_in_head(model, entry.get("head"))
        return tensors
    if quant is None:
        return tensors
    rep = plan_quantization(model, quant)
    _swap_in(model, rep.quantized, source, QUANT_TYPES[quant])
    _swap_in_head(model, rep.head)
    for name, why in rep.kept.items():
        log.info("quantisation: %s stays fp32 (%s)", name, why)
    set_quantization_entry(model, rep.config_entry())
    return _quantizing(
        _unmapped_tensors(Path(folder), tensors),
        {f"{n}.weight" for n in rep.quantized},
        normalise,
        QUANT_TYPES[quant],
        rep.head,
    )


def quantized_shapes(cfg, source: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a quantised folder of ``cfg`` holds (its ``quantization`` entry checked,
    :func:`check_entry`): each quantised module's ``weight_q`` / ``scales`` instead of its ``weight``, the
    head's copy (``quant_head.*``) when the entry has one, every other tensor as in an fp32 folder. Built on the
    meta device: no memory."""
    from mptkit.model.model import MPTForCausalLM

    entry = check_entry(quantization_entry(cfg), source)
    model = MPTForCausalLM(cfg, init=False, device="meta")
    _swap_in(model, entry["quantized"], source, entry["block"])
    _swap_in_head(model, entry.get("head"))
    out = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_quantized(model: nn.Module, out, *, tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
    """Write a quantised ``model`` (``quantize_model`` or loaded with ``quant=``) as a quantised folder."""
    entry = quantization_entry(model.config)
    if entry is None or not any(type(m) is QuantLinear for m in model.modules()):
        raise ConfigError("save_quantized: the model is not quantised (quantize_model(model, 'int8') first)")
    from mptkit.io.hf_folder import save_pretrained

    return save_pretrained(model, out, tokenizer=tokenizer, max_shard_size=max_shard_size)


def random_quantized_model(cfg, quant: str = "int8", *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """A random-init ``MPTForCausalLM`` of ``cfg`` (an ``MPTConfig``) with its block Linears quantised, built
    on the meta device and materialised tensor by tensor: each weight is drawn in fp32 (N(0, ``std``); norms'
    weights 1, biases 0), quantised at once if it is a block Linear's, and dropped — the path
    ``from_pretrained(..., quant=)`` streams a folder through, without a folder. Peak memory: the quantised
    model plus one fp32 tensor, so a 7B shape (26.6 GB in fp32) is built in about 8 GB. For benchmarks of
    shapes no trained checkpoint is at hand for (decode speed does not depend on the values)."""
    from mptkit.io.hf_folder import load_state_into
    from mptkit.io.source import expected_shapes
    from mptkit.model.model import MPTForCausalLM

    quant = check_quant_type(quant)
    model = MPTForCausalLM(cfg, init=False, device="meta")
    rep = plan_quantization(model, quant)
    _swap_in(model, rep.quantized, "random init", QUANT_TYPES[quant])
    _swap_in_head(model, rep.head)
    set_quantization_entry(model, rep.config_entry())
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)

    def drawn():
        for name, shape in shapes.items():
            if name.endswith(".bias"):
                t = torch.zeros(shape)
            elif len(shape) == 1:  # norm weights
                t = torch.ones(shape)
            else:
                t = torch.empty(shape).normal_(0.0, std, generator=g)
            yield name, t

    weights = {f"{n}.weight" for n in rep.quantized}
    load_state_into(
        model,
        _quantizing(drawn(), weights, lambda k: k, QUANT_TYPES[quant], rep.head),
        source="random init",
        dtype=torch.float32,
        device="cpu",
        keep_dtype=quant_buffer_names(model),
    )
    model.reset_buffers()
    return model.eval()


__all__ = [
    "FORMAT_NAME",
    "check_entry",
    "prepare_for_loading",
    "quantization_entry",
    "quantized_shapes",
    "random_quantized_model",
    "save_quantized",
]
