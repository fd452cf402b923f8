"""`mptkit export gguf`: an MPT model folder -> one GGUF file in llama.cpp's ``mpt`` architecture.

Written with the ``gguf`` package's ``GGUFWriter`` (``pip install mptkit[gguf]``), tensors streamed one at a
time (a 7B checkpoint is never held in memory as a whole), into a temporary file renamed onto ``OUT`` only
when complete.

What llama.cpp's MPT graph computes (``src/models/mpt.cpp`` in llama.cpp), and so what can be exported:

* LayerNorm (optional bias) before attention and FFN, and at the end; one epsilon for all of them.
* Fused QKV (optional bias; MHA, MQA or GQA via ``head_count_kv``), clamped to ``±clamp_kqv`` before the
  split (MPT's ``clip_qkv``). llama.cpp's graph has a Q/K LayerNorm branch (MPT's ``qk_ln``), but it aborts
  on it (a reshape of a non-contiguous view), so qk_ln is refused.
* Scores ``q·k / sqrt(head_dim)`` plus ALiBi with ``max_alibi_bias`` (ggml's slopes equal MPT's for any head
  count); no ALiBi when it is 0. An MPT ``softmax_scale`` other than ``1/sqrt(head_dim)`` is folded into the
  Q rows of the fused QKV projection (exact); not possible together with ``clip_qkv`` (the clamp comes first).
* Optional learned positions (``position_embd``, ``context_length`` rows).
* FFN up -> GELU -> down (optional biases), any hidden size (``feed_forward_length``). ggml's GELU is the
  tanh approximation (MPT uses the exact erf form): logits differ slightly, see docs/export.md.
* Output head: ``output`` if present, else the token embedding (tied). An MPT ``logit_scale`` is folded into
  an explicit ``output`` tensor.

``--dtype q8_0|q4_0`` quantises the block Linears (QKV, attention output, FFN up and down) with mptkit's own
blocks (:mod:`mptkit.model.quant`: ggml's reference quantisers, byte for byte), so the file holds the very
weights ``mptkit ... --quant int8|q4`` runs: the tied head as its own ``output.weight`` in q8_0 (the policy of
mptkit's ``--quant``: a q8_0 copy of ``wte``), the embeddings (the lookup), norms and biases f32, and a matrix
whose rows are not whole blocks of 32 f32 too (named in the log). ``--dtype q4_k`` writes ggml's
Q4_K super-blocks of 256 (:func:`mptkit.model.quant.quantize_q4_k`, byte for byte ``quantize_row_q4_K_ref``) for
those matrices, q4_0 for one whose rows are not whole super-blocks (llama.cpp would take q5_0, which mptkit
does not write) and f32 below that, each fallback named in the log and the result's ``notes``; embeddings and
the tied output head stay f32 there (mptkit does not run q4_k weights: no head policy to match).

A quantised folder (``mptkit export quant``'s) is written in its own blocks, as they are: its ``weight_q`` /
``scales`` as the Q8_0 / Q4_0 tensors, its head copy (``quant_head``) as ``output.weight``, its fp32 tensors f32,
read one tensor at a time (no fp32 weights: a 7B int8 folder exports without its 26.6 GB source). The file is
the one its fp32 source exports with ``--dtype q8_0|q4_0``, byte for byte; ``dtype`` must be the folder's own.

Refused, naming the key: ``norm_type`` rmsnorm (llama.cpp's MPT uses LayerNorm), ``ffn_type: mptglu``,
``qk_ln``, ``softmax_scale`` together with ``clip_qkv`` (not foldable), a
tokenizer that is not byte-level BPE or has more tokens than ``vocab_size``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mptkit.errors import CheckpointError, ExportError
from mptkit.export.source import load_config, open_source, open_store
from mptkit.io.hf_folder import TensorStore, is_model_folder
from mptkit.io.quant_folder import quantized_shapes
from mptkit.io.source import expected_shapes
from mptkit.utils.fs import atomic_path, publish_permissions
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)

ARCH = "mpt"
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k")
HEAD_Q8_DTYPES = ("q8_0", "q4_0")  # the types mptkit runs (--quant int8|q4): their file's tied head is a q8_0 copy
QUANT_DTYPES = ("q8_0", "q4_0", "q4_k")  # written with mptkit's own blocks (mptkit.model.quant), byte for byte ggml's
# per block type: (weights per block, bytes per block) — ggml's block_q8_0 / block_q4_0 / block_q4_K
_BLOCKS = {"q8_0": (32, 2 + 32), "q4_0": (32, 2 + 16), "q4_k": (256, 144)}
# what a --dtype falls back to, in order, for a matrix whose rows are not whole blocks of its type (llama.cpp's
# llama-quantize takes q5_0 for a Q4_K tensor that does not fit; mptkit has no q5_0, so q4_0 — the same bits
# per weight as q4_k within 0.5 — then f32)
_FALLBACK = {"q4_k": ("q4_0",), "q8_0": (), "q4_0": ()}
# the tensors a quantised file quantises: the block Linears, as mptkit's --quant does (embeddings, the output
# head, norms and biases stay f32; a matrix whose rows are not whole blocks too)
_QUANTISED_TENSORS = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the 'gguf' package: pip install 'mptkit[gguf]' (or pip install gguf)") from None
    return gguf


# ------------------------------------------------------------------------------------ compatibility


def llama_cpp_incompatibilities(cfg) -> list[str]:
    """Settings of ``cfg`` that llama.cpp's ``mpt`` graph cannot compute; empty when it can export."""
    out = []
    a = cfg.attn_config
    if cfg.norm_type not in ("layernorm", "low_precision_layernorm"):
        out.append(f"norm_type={cfg.norm_type} (llama.cpp's mpt graph uses LayerNorm only)")
    if cfg.ffn_config.get("ffn_type", "mptmlp") != "mptmlp":
        out.append(f"ffn_config.ffn_type={cfg.ffn_config['ffn_type']} (llama.cpp's mpt graph has a plain "
                   "up -> GELU -> down FFN, no gate)")
    if a["qk_ln"]:
        out.append("attn_config.qk_ln=true (llama.cpp's mpt graph has a Q/K LayerNorm path, but it aborts on it: "
                   "GGML_ASSERT(ggml_is_contiguous(a)) when reshaping the Q view of the fused QKV, seen with the "
                   "llama.cpp of llama-cpp-python 0.3.36; it also sizes the K norm by d_model, wrong for GQA)")
    if _softmax_fold(cfg) != 1.0 and a["clip_qkv"] is not None:
        out.append(f"attn_config.softmax_scale={a['softmax_scale']} together with attn_config.clip_qkv="
                   f"{a['clip_qkv']} (llama.cpp scales by 1/sqrt(head_dim) and the scale cannot be folded into "
                   "the Q projection before the clamp)")
    return out


def _softmax_fold(cfg) -> float:
    """Factor to multiply Q by so that llama.cpp's fixed 1/sqrt(head_dim) equals MPT's softmax_scale."""
    s = cfg.attn_config.get("softmax_scale")
    if s is None:
        return 1.0
    r = float(s) * math.sqrt(cfg.head_dim)
    return 1.0 if abs(r - 1.0) < 1e-12 else r


# ------------------------------------------------------------------------------------ tensors


def tensor_name_map(cfg) -> dict[str, str]:
    """mptkit (HF) tensor name -> GGUF tensor name, for every tensor the model has."""
    m = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.norm_f.weight": "output_norm.weight",
        "transformer.norm_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
    }
    per_block = {
        "norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output",
        "attn.q_ln": "attn_q_norm", "attn.k_ln": "attn_k_norm",
        "norm_2": "ffn_norm", "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down",
    }
    for i in range(cfg.n_layers):
        for src, dst in per_block.items():
            for kind in ("weight", "bias"):
                m[f"transformer.blocks.{i}.{src}.{kind}"] = f"blk.{i}.{dst}.{kind}"
    return m


def _ordered_names(cfg, store: TensorStore) -> list[str]:
    """The source tensors to write, in llama.cpp's usual order (embeddings, blocks, output)."""
    want = list(expected_shapes(cfg))
    head = [n for n in want if not n.startswith("transformer.blocks.")]
    blocks = [n for n in want if n.startswith("transformer.blocks.")]
    first = [n for n in head if n.startswith(("transformer.wte", "transformer.wpe"))]
    last = [n for n in head if n not in first]
    return first + blocks + last


@dataclass(frozen=True)
class _QuantFolder:
    """What a quantised source folder (``mptkit export quant``'s) holds: its modules' block format, the modules
    quantised, those it kept fp32 (name -> why) and its tied head's block (None: the head is ``wte`` itself)."""

    block: str
    modules: frozenset[str]
    kept: dict
    head: str | None
    shapes: dict  # the tensors it holds: name -> shape (mptkit.io.quant_folder.quantized_shapes)


class _Planned(NamedTuple):
    """One tensor to write."""

    gname: str  # its GGUF name
    src: str  # the source tensor (a quantised module's logical ``<module>.weight``)
    shape: tuple[int, ...]  # (out, in) for a matrix
    block: str | None  # its block format, or None for f32 / f16


def _module_of(src: str) -> str:
    return src[: -len(".weight")]


def _tensor_plan(cfg, store: TensorStore, dtype: str = "f32", qf: _QuantFolder | None = None) -> list[_Planned]:
    """Every tensor written, in order, without reading any data. ``qf``: the source is a quantised folder, whose
    modules are written in its own blocks (and its head's copy as ``output.weight``)."""
    names = tensor_name_map(cfg)
    shapes = expected_shapes(cfg)  # the logical (fp32) shapes; an fp32 store has been checked against them
    plan = []

    def block_of(gname: str, src: str, shape) -> str | None:
        if qf is None:
            return _tensor_dtype(cfg, gname, dtype, shape)
        if gname == "output.weight":
            return qf.head if cfg.logit_scale_value is None else None  # a scaled head is written f32
        return qf.block if src.endswith(".weight") and _module_of(src) in qf.modules else None

    for src in _ordered_names(cfg, store):
        if cfg.logit_scale_value is not None and src == "lm_head.weight":
            continue  # replaced by the scaled output below
        plan.append(_Planned(names[src], src, tuple(shapes[src]), block_of(names[src], src, shapes[src])))
    wte = "transformer.wte.weight"
    if cfg.logit_scale_value is not None:
        src = wte if cfg.tie_word_embeddings else "lm_head.weight"
        plan.append(_Planned("output.weight", src, tuple(shapes[src]), None))
    elif (qf.head is not None if qf is not None else
          dtype in HEAD_Q8_DTYPES and cfg.tie_word_embeddings and cfg.d_model % 32 == 0):
        # mptkit's --quant head policy (model/quant.py): the tied head as a q8_0 copy, the embedding kept f32
        plan.append(_Planned("output.weight", wte, tuple(shapes[wte]), block_of("output.weight", wte, shapes[wte])))
    return plan


def _tensor_dtype(cfg, gguf_name: str, dtype: str, shape) -> str | None:
    """The block format a tensor is written in (None: f32 / f16 as ``dtype`` says): the block Linears in
    ``dtype``'s blocks, and a quantised file's tied output head in q8_0 (mptkit's ``--quant`` head policy)."""
    block = _tensor_type(gguf_name, dtype, shape)
    if block is not None:
        return block
    from mptkit.model.quant import BLOCK_SIZE, HEAD_BLOCK

    if (gguf_name == "output.weight" and dtype in HEAD_Q8_DTYPES and cfg.tie_word_embeddings
            and cfg.logit_scale_value is None and len(shape) == 2 and shape[1] % BLOCK_SIZE == 0):
        return HEAD_BLOCK  # model/quant.py's head block: the file holds what --quant runs
    return None


def _prepare(cfg, store: TensorStore, p: _Planned, dtype: str, qf: _QuantFolder | None = None) -> np.ndarray:
    """The data of the planned tensor ``p``, as the writer takes it."""
    if qf is not None:
        return _prepare_quantised(cfg, store, p, qf)
    t = store.get(p.src).to(torch.float32)
    r = _softmax_fold(cfg)
    if r != 1.0 and ".attn.Wqkv." in p.src:  # weight rows and bias entries of Q
        t = t.clone()
        t[: cfg.d_model] *= r
    if p.gname == "output.weight" and cfg.logit_scale_value is not None:
        t = t * cfg.logit_scale_value
    if p.block is not None:
        return _ggml_blocks(t, p.block)
    a = t.contiguous().numpy()
    # llama.cpp keeps 1-D tensors (norms, biases) in f32; matrices take the requested type.
    if dtype == "f16" and a.ndim >= 2:
        with np.errstate(over="ignore"):
            a = a.astype(np.float16)
        if not np.isfinite(a).all() and np.isfinite(t.numpy()).all():
            raise ExportError(f"{p.src}: values beyond f16's range (max |x| = {float(t.abs().max()):.4g} > 65504); "
                              "export with --dtype f32")
    return a


def _prepare_quantised(cfg, store: TensorStore, p: _Planned, qf: _QuantFolder) -> np.ndarray:
    """A quantised folder's tensor: a quantised module's (or the head copy's) stored blocks as they are, the
    rest f32 as stored; a scaled head (``logit_scale``) as its dequantised copy times the scale."""
    from mptkit.model.quant import HEAD_MODULE, dequantize_weight

    mod = HEAD_MODULE if p.gname == "output.weight" and qf.head is not None else _module_of(p.src)
    if p.block is not None:
        return _stored_blocks(store.get(f"{mod}.weight_q"), store.get(f"{mod}.scales"), p.block,
                              f"{store.folder}: {mod}")
    if p.gname == "output.weight" and cfg.logit_scale_value is not None:
        if qf.head is not None:  # what mptkit computes: the q8_0 copy's logits times the scale
            w = dequantize_weight(store.get(f"{mod}.weight_q"), store.get(f"{mod}.scales"), qf.head)
        else:
            w = store.get(p.src).to(torch.float32)
        return (w * cfg.logit_scale_value).contiguous().numpy()
    return store.get(p.src).to(torch.float32).contiguous().numpy()


def _tensor_type(gguf_name: str, dtype: str, shape) -> str | None:
    """The block type this tensor is written as (a block Linear: ``dtype`` when its rows are whole blocks of
    it, else the first of ``dtype``'s fallbacks they fit), or None for a float tensor (f32 / f16)."""
    if dtype not in QUANT_DTYPES or not gguf_name.endswith(_QUANTISED_TENSORS) or len(shape) != 2:
        return None
    for block in (dtype, *_FALLBACK[dtype]):
        if shape[1] % _BLOCKS[block][0] == 0:
            return block
    return None


def _ggml_blocks(t: torch.Tensor, dtype: str) -> np.ndarray:
    """``t`` (N, K) as ggml's block array: per row K/32 blocks of (fp16 scale, then 32 int8 values for q8_0 or
    16 packed bytes for q4_0), as uint8 (N, K/32 * bytes per block): ``block_q8_0`` / ``block_q4_0``; for
    q4_k, K/256 ``block_q4_K`` s of 144 bytes."""
    from mptkit.model.quant import quantize_q4_k, quantize_weight

    if dtype == "q4_k":
        return quantize_q4_k(t).numpy()
    q, sc = quantize_weight(t, dtype)
    return _stored_blocks(q, sc, dtype)


def _stored_blocks(q: torch.Tensor, sc: torch.Tensor, block: str, name: str = "") -> np.ndarray:
    """A QuantLinear's ``weight_q`` / ``scales`` (:mod:`mptkit.model.quant`'s layout) as ggml's block array:
    the same bytes, each block's fp16 scale put in front of its values."""
    want = {"q8_0": torch.int8, "q4_0": torch.uint8}[block]
    if q.dtype != want or sc.dtype != torch.float16 or q.dim() != 2 or sc.shape[0] != q.shape[0]:
        raise ExportError(f"{name or 'a matrix'}: {block} blocks: expected weight_q {want} and scales float16 of one row each, got "
                          f"{q.dtype} {tuple(q.shape)} / {sc.dtype} {tuple(sc.shape)}")
    n, nb = sc.shape
    qb = q.contiguous().view(torch.uint8).numpy().reshape(n, nb, -1)
    sb = sc.contiguous().numpy().view(np.uint8).reshape(n, nb, 2)
    return np.concatenate([sb, qb], axis=-1).reshape(n, -1)


def _row_bytes(block: str, n_cols: int) -> int:
    per, nbytes = _BLOCKS[block]
    return n_cols // per * nbytes


# ------------------------------------------------------------------------------------ tokenizer


@dataclass
class GGUFTokenizer:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    padded: int = 0
    notes: list[str] = field(default_factory=list)


def _special(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _byte_level_pre(pre: dict | None) -> tuple[bool, str]:
    """Is this HF pre-tokenizer GPT-2's byte-level one (what llama.cpp's gpt2/mpt pre-tokenizer does)?"""
    if pre is None:
        return False, "no pre_tokenizer"
    t = pre.get("type")
    if t == "Sequence":
        subs = pre.get("pretokenizers") or []
        if len(subs) == 1:
            return _byte_level_pre(subs[0])
        return False, f"a Sequence pre_tokenizer ({', '.join(str(s.get('type')) for s in subs)})"
    if t != "ByteLevel":
        return False, f"pre_tokenizer {t}"
    if pre.get("add_prefix_space"):
        return False, "ByteLevel pre_tokenizer with add_prefix_space=true"
    if pre.get("use_regex") is False:
        return False, "ByteLevel pre_tokenizer with use_regex=false"
    return True, ""


def read_tokenizer(folder: Path, vocab_size: int) -> GGUFTokenizer:
    """The BPE tokenizer in ``folder`` as llama.cpp's ``gpt2`` tokenizer, padded to ``vocab_size`` tokens."""
    gguf = _gguf()
    tj = folder / "tokenizer.json"
    notes: list[str] = []
    if tj.exists():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{tj}: unreadable ({e})") from None
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ExportError(f"{tj}: tokenizer model is {model.get('type')!r}; the GGUF export supports byte-level "
                              "BPE tokenizers (GPT-NeoX / GPT-2 style) only")
        ok, why = _byte_level_pre(data.get("pre_tokenizer"))
        if not ok:
            raise ExportError(f"{tj}: {why}; llama.cpp's gpt2/mpt tokenizer splits text like GPT-2's byte-level "
                              "pre-tokenizer only, so it would tokenize differently")
        norm = data.get("normalizer")
        pre_name = "gpt-2"
        if norm is not None:
            if norm.get("type") == "NFC":
                pre_name = "mpt"  # GPT-NeoX-20B's tokenizer (MPT's): NFC + byte-level BPE
                notes.append("the tokenizer NFC-normalises text; llama.cpp does not (same result for NFC text)")
            else:
                raise ExportError(f"{tj}: normalizer {norm.get('type')} is not supported by llama.cpp's gpt2 tokenizer")
        vocab: dict[str, int] = dict(model.get("vocab") or {})
        raw_merges = model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
        added = data.get("added_tokens") or []
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = [ln for ln in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if ln and not ln.startswith("#version")]
        added = []
        pre_name = "gpt-2"
    else:
        raise ExportError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt) to embed in the GGUF file")

    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    smap_path = folder / "special_tokens_map.json"
    smap = json.loads(smap_path.read_text(encoding="utf-8")) if smap_path.exists() else {}
    for k, v in (tcfg.get("added_tokens_decoder") or {}).items():
        added.append({"id": int(k), "content": v.get("content"), "special": v.get("special", True)})

    by_id: dict[int, tuple[str, int]] = {}
    for tok, i in vocab.items():
        by_id[int(i)] = (tok, int(gguf.TokenType.NORMAL))
    for a in added:
        i, content = int(a["id"]), a.get("content")
        ttype = gguf.TokenType.CONTROL if a.get("special", True) else gguf.TokenType.USER_DEFINED
        by_id[i] = (content, int(ttype))
    n = max(by_id) + 1 if by_id else 0
    if n > vocab_size:
        raise ExportError(f"{folder}: the tokenizer has ids up to {n - 1}, but the model's vocab_size is {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    padded = 0
    for i in range(vocab_size):
        if i in by_id:
            tok, tt = by_id[i]
        else:  # embedding rows past the tokenizer (vocab padded to a multiple of 64) and any holes
            tok, tt = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
            padded += 1
        tokens.append(tok)
        types.append(tt)

    def tid(key: str) -> int | None:
        s = _special(tcfg.get(key)) or _special(smap.get(key))
        if s is None:
            return None
        for i, (tok, _) in by_id.items():
            if tok == s:
                return i
        notes.append(f"{key} '{s}' is not in the vocabulary; not recorded")
        return None

    bos, eos, pad, unk = tid("bos_token"), tid("eos_token"), tid("pad_token"), tid("unk_token")
    if bos is None and eos is not None:
        bos = eos  # GPT-NeoX / MPT: <|endoftext|> serves as both
    tmpl = tcfg.get("chat_template")
    if tmpl is None and (folder / "chat_template.jinja").exists():
        tmpl = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return GGUFTokenizer(
        tokens=tokens, token_types=types, merges=merges, pre=pre_name, bos_id=bos, eos_id=eos, pad_id=pad,
        unk_id=unk, add_bos=bool(tcfg.get("add_bos_token", False)), add_eos=bool(tcfg.get("add_eos_token", False)),
        chat_template=tmpl if isinstance(tmpl, str) else None, padded=padded, notes=notes,
    )


# ------------------------------------------------------------------------------------ writing


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _check_out(src: Path, model_folder: Path | None, out: Path, overwrite: bool) -> None:
    """The shared output check (:func:`mptkit.utils.outputs.check_output`): never in (or the) model folder,
    an existing file only when it is a GGUF file and with ``overwrite``, a folder that can be written."""
    check_output(out, kind="file", sources=[model_folder] if model_folder is not None else [], inputs=[src],
                 replaceable=_is_gguf, earlier="a GGUF file", overwrite=overwrite, error=ExportError)


def _quant_folder(cfg, folder: Path, dtype: str | None) -> _QuantFolder | None:
    """What a quantised source folder holds (None for an fp32 one), refusing what cannot be written from it:
    another type than its own, and a ``softmax_scale`` fold (its Q rows are blocks already; scaling their
    fp16 scales would change the weights)."""
    from mptkit.io.quant_folder import check_entry, quantization_entry

    entry = quantization_entry(cfg)
    if entry is None:
        return None
    try:
        entry = check_entry(entry, str(folder))
        shapes = quantized_shapes(cfg, str(folder))
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    block, kind = entry["block"], entry["type"]
    if dtype is not None and dtype != block:
        raise ExportError(
            f"--dtype {dtype}: {folder} is a quantised folder ({kind}: {block} blocks), written in its own blocks "
            f"only: use --dtype {block} (or leave --dtype out); for another type export the fp32 model it was "
            "quantised from"
        )
    if _softmax_fold(cfg) != 1.0:
        raise ExportError(
            f"{folder}: attn_config.softmax_scale={cfg.attn_config['softmax_scale']} must be folded into the Q rows "
            f"of the fused QKV projection for llama.cpp, which are {block} blocks in this quantised folder (the fold "
            "would change its weights); export the fp32 model it was quantised from"
        )
    return _QuantFolder(block=block, modules=frozenset(entry["quantized"]), kept=dict(entry.get("kept") or {}),
                        head=entry.get("head"), shapes=shapes)


@dataclass
class GGUFExportResult:
    path: Path
    source: Path
    dtype: str
    n_tensors: int
    n_bytes: int
    tokenizer_from: Path
    folded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_gguf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFExportResult:
    """Write ``src`` (a model folder, run or checkpoint — a sharded FSDP one is consolidated first) as a GGUF
    file for llama.cpp at ``out``. An existing ``out`` is replaced only when it is a GGUF file and
    ``overwrite`` is set; an ``out`` inside the model folder is refused.

    ``dtype`` (None: f32, or a quantised folder's own type): the type of the weight matrices. A quantised
    folder (``mptkit export quant``'s) is written in its own blocks, byte for byte, read one tensor at a time
    (no fp32 copy of the model: a 7B int8 folder exports in about its own size of memory-mapped reads); it
    takes only its own type (int8: ``q8_0``, q4: ``q4_0``)."""
    if dtype is not None and dtype not in GGUF_DTYPES:  # the arguments first: a sharded source is consolidated below
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(GGUF_DTYPES)}")
    gguf = _gguf()
    src, out = Path(src), Path(out)
    _check_out(src, src if is_model_folder(src) else None, out, overwrite)
    with open_source(src, tokenizer) as source:
        folder = source.folder
        _check_out(src, folder, out, overwrite)
        cfg = load_config(folder, allow_quantized=True)
        problems = llama_cpp_incompatibilities(cfg)
        if problems:
            raise ExportError(
                f"{folder}: llama.cpp's mpt architecture cannot express " + "; ".join(problems)
            )
        qf = _quant_folder(cfg, folder, dtype)
        if dtype is None:
            dtype = qf.block if qf is not None else "f32"
        tok_folder = source.tokenizer_folder
        if tok_folder is None:
            raise ExportError(f"{src}: no tokenizer files found beside the model or the run; a GGUF file embeds the "
                              "tokenizer: pass --tokenizer DIR")
        tok = read_tokenizer(tok_folder, cfg.vocab_size)
        store = open_store(folder, cfg, qf.shapes if qf is not None else None)
        plan = _tensor_plan(cfg, store, dtype, qf)

        folded = []
        if _softmax_fold(cfg) != 1.0:
            folded.append(f"attn_config.softmax_scale={cfg.attn_config['softmax_scale']} folded into the Q projection")
        if cfg.logit_scale_value is not None:
            folded.append(f"logit_scale={cfg.logit_scale} folded into an explicit output tensor")
        for f in folded:
            log.info("%s", f)
        for nt in tok.notes:
            log.warning("tokenizer: %s", nt)
        if cfg.use_learned_pos_emb:
            log.warning("learned positions: llama.cpp has %d position rows (max_seq_len); do not run it with a "
                        "longer context", cfg.max_seq_len)

        n_bytes = 0
        notes = list(tok.notes)
        with write_errors(out, ExportError), atomic_path(out) as tmp:  # a full disk: one line naming OUT
            w = gguf.GGUFWriter(str(tmp), ARCH)
            try:
                w.add_name(name or src.resolve().name)
                w.add_context_length(int(cfg.max_seq_len))
                w.add_embedding_length(int(cfg.d_model))
                w.add_block_count(int(cfg.n_layers))
                w.add_feed_forward_length(int(cfg.ffn_hidden_size))
                w.add_head_count(int(cfg.n_heads))
                w.add_head_count_kv(int(cfg.kv_n_heads))
                w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
                w.add_max_alibi_bias(float(cfg.attn_config["alibi_bias_max"]) if cfg.alibi else 0.0)
                if cfg.attn_config["clip_qkv"] is not None:
                    w.add_clamp_kqv(float(cfg.attn_config["clip_qkv"]))
                w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                                 # the closest of llama.cpp's names (its mixes differ; the file's tensors say)
                                 "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}.get(dtype, gguf.LlamaFileType.ALL_F32))
                w.add_tokenizer_model("gpt2")
                w.add_tokenizer_pre(tok.pre)
                w.add_token_list(tok.tokens)
                w.add_token_types(tok.token_types)
                w.add_token_merges(tok.merges)
                for setter, v in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                                  (w.add_pad_token_id, tok.pad_id), (w.add_unk_token_id, tok.unk_id)):
                    if v is not None:
                        setter(int(v))
                w.add_add_bos_token(tok.add_bos)
                w.add_add_eos_token(tok.add_eos)
                if tok.chat_template:
                    w.add_chat_template(tok.chat_template)
                # Tensor infos first (shapes only), then the data, one tensor at a time.
                for gname, src_name, shape, block in plan:
                    if block is not None and block != dtype and gname != "output.weight":
                        note = (f"{gname} is {block} ({shape[1]} columns is not a multiple of {dtype}'s "
                                f"{_BLOCKS[dtype][0]})")
                        log.info("%s", note)
                        notes.append(note)
                    if block is not None:  # the byte shape; the writer turns it into elements
                        row = _row_bytes(block, shape[1])
                        w.add_tensor_info(gname, (shape[0], row), np.dtype(np.uint8), shape[0] * row,
                                          raw_dtype=gguf.GGMLQuantizationType[block.upper()])
                        n_bytes += shape[0] * row
                        continue
                    if qf is not None and gname.endswith(_QUANTISED_TENSORS):
                        mod = _module_of(src_name)
                        note = f"{gname} stays f32 (the quantised folder keeps {mod} fp32: {qf.kept.get(mod, 'not quantised')})"
                        log.info("%s", note)
                        notes.append(note)
                    elif dtype in QUANT_DTYPES and gname.endswith(_QUANTISED_TENSORS):
                        note = (f"{gname} stays f32 ({shape[1]} columns is not a multiple of the block size "
                                f"{min(_BLOCKS[b][0] for b in (dtype, *_FALLBACK[dtype]))})")
                        log.info("%s", note)
                        notes.append(note)
                    is_f16 = dtype == "f16" and len(shape) >= 2
                    np_dtype = np.dtype(np.float16 if is_f16 else np.float32)
                    nbytes = int(np.prod(shape)) * np_dtype.itemsize
                    w.add_tensor_info(gname, shape, np_dtype, nbytes)
                    n_bytes += nbytes
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for p in plan:
                    w.write_tensor_data(_prepare(cfg, store, p, dtype, qf))
            finally:
                w.close()
            publish_permissions(tmp)
        log.info("wrote %s: %d tensors, %.1f MB of %s weights, %d tokens (%d padding)", out, len(plan), n_bytes / 1e6,
                 dtype, len(tok.tokens), tok.padded)
        return GGUFExportResult(path=out, source=folder, dtype=dtype, n_tensors=len(plan), n_bytes=n_bytes,
                                tokenizer_from=tok_folder, folded=folded, notes=notes)


__all__ = ["GGUFExportResult", "export_gguf", "llama_cpp_incompatibilities", "read_tokenizer", "tensor_name_map"]
