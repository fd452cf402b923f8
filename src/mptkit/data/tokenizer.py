"""Tokenizers: train a GPT-NeoX-style byte-level BPE, fingerprint one, encode batches (loading tokenizer
files is :func:`mptkit.io.tokenizer_files.load_tokenizer`).

The trained tokenizer follows GPT-NeoX-20B (the one MPT uses): NFC normalizer, byte-level
pre-tokenizer without a prefix space, byte-level BPE without unknown token, byte-level decoder. Special
tokens: ``<|endoftext|>`` (id 0; bos, eos and unk as in GPT-NeoX), ``<|padding|>`` (id 1, pad) and the
ChatML markers ``<|im_start|>`` / ``<|im_end|>`` (ids 2, 3) reserved for chat finetuning. The requested
vocabulary size is rounded up to a multiple of 64 (MPT's embedding holds 50432 rows, a multiple of 64,
for GPT-NeoX's 50277 tokens). The folder it writes loads with ``transformers.AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mptkit.errors import DataError
from mptkit.io.tokenizer_files import load_tokenizer

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def round_up(n: int, multiple: int = 64) -> int:
    return ((int(n) + multiple - 1) // multiple) * multiple


def padded_vocab_size(tok_or_size, multiple: int = 64) -> int:
    """The smallest model vocabulary for a tokenizer: its size rounded up to a multiple of 64 (50277 -> 50304;
    MPT-7B itself uses 50432)."""
    n = tok_or_size if isinstance(tok_or_size, int) else len(tok_or_size)
    return round_up(n, multiple)


def _build_bpe():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return tok


def train_tokenizer(inputs: list[str] | None, vocab_size: int, out_dir, *, min_frequency: int = 2,
                    text_field: str = "text", max_files: int | None = None, max_bytes: int | None = None,
                    hf_split: str | None = None, strict: bool = False, show_progress: bool = False) -> Path:
    """Train a GPT-NeoX-style byte-level BPE on ``inputs`` (``None`` = the default stdlib corpus).

    ``vocab_size`` is rounded up to a multiple of 64 (it counts the 256 byte symbols and the 4 special
    tokens). The result is written atomically to ``out_dir`` as an HF tokenizer folder and its path is
    returned. Inputs are read like :func:`mptkit.data.prepare.prepare_dataset` reads them (same bad-input
    handling: skipped and counted, or ``strict``).
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mptkit.data.corpus import Issues, iter_documents, resolve_inputs
    from mptkit.utils.fs import atomic_dir, atomic_write_json
    from mptkit.utils.outputs import check_output, write_errors

    if int(vocab_size) < 256 + len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + merges)")
    target = round_up(vocab_size)
    if target != vocab_size:
        log.info("vocab size %d rounded up to %d (a multiple of 64)", vocab_size, target)
    out_dir = Path(out_dir)
    # the shared output check (as the exporters' and data prepare's), before any work: an earlier tokenizer
    # folder is replaced (training is deterministic), nothing else; never an input folder or one holding one
    check_output(out_dir, kind="folder", flag="--out", inputs=[p for p in inputs or [] if Path(p).exists()],
                 replaceable=lambda p: (p / "tokenizer.json").exists(), earlier="a tokenizer folder (tokenizer.json)",
                 overwrite=None, error=DataError)
    files = resolve_inputs(inputs, max_files=max_files, max_bytes=max_bytes, hf_split=hf_split, exclude=[out_dir])
    issues = Issues(strict=strict)
    stats = {"documents": 0, "chars": 0}

    def docs() -> Iterable[str]:
        for f in files:
            for _, text in iter_documents(f, text_field=text_field, issues=issues):
                stats["documents"] += 1
                stats["chars"] += len(text)
                yield text

    tok = _build_bpe()
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    log.info("training a %d-token byte-level BPE on %d files", target, len(files))
    tok.train_from_iterator(docs(), trainer)
    if stats["documents"] == 0:
        raise DataError(f"no usable documents in the inputs ({len(files)} files; "
                        f"{issues.total} bad inputs: {issues.counts})")
    got = tok.get_vocab_size()
    if got < target:
        log.warning("the corpus only supports %d tokens (asked for %d); the model vocabulary will be %d",
                    got, target, round_up(got))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False, model_max_length=2048)
    fast.chat_template = CHATML_TEMPLATE
    with write_errors(out_dir, DataError), atomic_dir(out_dir) as tmp:  # a full disk: one line naming --out
        fast.save_pretrained(str(tmp))
        atomic_write_json(tmp / "mptkit_tokenizer.json", {
            "kind": "byte-level BPE (GPT-NeoX style)",
            "requested_vocab_size": int(vocab_size),
            "vocab_size": got,
            "padded_vocab_size": round_up(got),
            "min_frequency": min_frequency,
            "special_tokens": SPECIAL_TOKENS,
            "corpus": {"files": len(files), "documents": stats["documents"], "chars": stats["chars"],
                       "default_stdlib": not inputs},
            "bad_inputs": issues.as_dict(),
            "fingerprint": tokenizer_fingerprint(tok),
        })
    log.info("tokenizer with %d tokens written to %s (%d documents, %d chars, %d bad inputs skipped)",
             got, out_dir, stats["documents"], stats["chars"], issues.total)
    return out_dir


def _backend(tok):
    """The ``tokenizers.Tokenizer`` behind ``tok`` (a PreTrainedTokenizerFast or a Tokenizer), or None."""
    from tokenizers import Tokenizer

    if isinstance(tok, Tokenizer):
        return tok
    return getattr(tok, "backend_tokenizer", None)


def encode_batch(tokenizer, texts: list[str], *, parse_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text in ``texts``, no special tokens added (no BOS/EOS).

    ``tokenizer``: a ``transformers`` fast tokenizer (its Rust backend encodes the whole batch at once, outside
    the GIL: the same ids as ``tokenizer(texts, add_special_tokens=False)``, without transformers' warning
    about texts longer than ``model_max_length``, which means nothing for tokenizing data), a raw
    ``tokenizers.Tokenizer``, or a slow (Python) ``transformers`` tokenizer (encoded one text at a time).

    ``parse_special_tokens`` (default, the tokenizers' own behaviour): a special token spelled in the text
    (``<|endoftext|>``, ``<|im_start|>``) becomes its control id. False: the text is only text — a special
    token's spelling is tokenized like any other characters (user-supplied content: chat messages, a
    server's completion prompts)."""
    texts = list(texts)
    if not texts:
        return []
    backend = _backend(tokenizer)
    if backend is not None:
        if not parse_special_tokens:
            backend = _text_only_backend(backend)
        return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    if parse_special_tokens:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    try:  # a slow transformers tokenizer splits special tokens' spellings on request
        return [list(tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True)) for t in texts]
    except TypeError:
        raise DataError(f"{type(tokenizer).__name__} cannot encode text with its special tokens not parsed "
                        "(no split_special_tokens); use a transformers or tokenizers tokenizer") from None


_TEXT_ONLY: dict[int, tuple[Any, int, Any]] = {}  # id(backend) -> (backend, its size, the text-only copy)
_TEXT_ONLY_LOCK = threading.Lock()


def _text_only_backend(backend):
    """A copy of ``backend`` that does not match special tokens in the text (``encode_special_tokens``),
    made once per backend. A copy rather than flipping the flag on the shared one: transformers sets that
    flag on its backend at every call (``split_special_tokens``), and the server encodes from several
    threads at once. At most 8 are kept (the entry holds the backend, so its id is not reused meanwhile)."""
    from tokenizers import Tokenizer

    size = backend.get_vocab_size(with_added_tokens=True)
    with _TEXT_ONLY_LOCK:
        hit = _TEXT_ONLY.get(id(backend))
        if hit is not None and hit[0] is backend and hit[1] == size:
            return hit[2]
        if not any(t.special for t in backend.get_added_tokens_decoder().values()):
            copy = backend  # nothing to split; the flag is irrelevant
        else:
            copy = Tokenizer.from_str(backend.to_str())
            copy.encode_special_tokens = True
        if len(_TEXT_ONLY) >= 8:
            _TEXT_ONLY.pop(next(iter(_TEXT_ONLY)))
        _TEXT_ONLY[id(backend)] = (backend, size, copy)
        return copy


def _norm_merges(merges: list) -> list:
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def tokenizer_fingerprint(tok_or_path) -> str:
    """A stable hash (``sha256:`` + 16 hex) of the vocabulary, merges, special/added tokens, normalizer
    and pre-tokenizer: equal for the same tokenizer however it was saved or loaded."""
    tok = load_tokenizer(tok_or_path) if isinstance(tok_or_path, (str, os.PathLike)) else tok_or_path
    backend = _backend(tok)
    payload: dict[str, Any]
    if backend is not None:
        d = json.loads(backend.to_str())
        model = d.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            vocab = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
        payload = {
            "type": model.get("type"),
            "vocab": vocab,
            "merges": _norm_merges(model.get("merges") or []),
            "byte_fallback": model.get("byte_fallback"),
            "added": sorted((a["id"], a["content"], bool(a.get("special"))) for a in d.get("added_tokens") or []),
            "normalizer": d.get("normalizer"),
            "pre_tokenizer": d.get("pre_tokenizer"),
        }
    else:  # a slow tokenizer: vocabulary and special tokens only
        payload = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
                   "special": sorted(getattr(tok, "all_special_tokens", []))}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def special_token_id(tok, text: str | None) -> int | None:
    """The id of ``text`` if it is one token of ``tok`` (e.g. ``<|endoftext|>``), else None."""
    if not text:
        return None
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
