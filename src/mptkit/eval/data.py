"""Evaluation data as one token stream: text/code/JSONL files or folders, or a prepared token folder.

* **Text** (anything ``mptkit data prepare`` reads: text and code files, folders of them, JSONL/JSON/CSV with a
  ``text`` field, Parquet): each document is tokenized with the model's tokenizer (no special tokens added)
  and the stream is ``[eos] doc1 [eos] doc2 ... [eos] docN``. The leading EOS is context only, so every
  token of every document is scored. The stream is read as one sequence, so a window's context runs back
  across document boundaries into the previous documents (lm-eval-harness's rolling log-likelihood instead
  scores each document on its own, from an empty context). The separating EOS tokens are scored too
  (predicting a document's end) and count in the token-level loss; ``separators`` records their positions
  so that bits per byte can leave them out: ``n_bytes`` counts the UTF-8 bytes of the documents only.
* **Prepared folder** (``manifest.json`` + shards from ``mptkit data prepare``): the rows of a split
  (``val`` by default), concatenated in order. With ``prepare``'s default ``wrap`` packing this restores the
  split's token stream (minus the dropped tail); no byte count (the text is not at hand).

``max_tokens`` stops reading once the stream is that long (a document is cut where the budget ends; its
bytes are those of the decoded kept ids).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mptkit.data.tokenizer import encode_batch
from mptkit.errors import DataError, EvalError

log = logging.getLogger(__name__)

_ENCODE_BATCH = 64  # documents tokenized per call


@dataclass
class TokenStream:
    """Token ids to evaluate on, and where they came from.

    ``ids``: int64 array. ``n_bytes``: UTF-8 bytes of the documents' text (the document tokens; None when
    unknown, e.g. prepared shards). ``documents``: documents read. ``source``: a description for reports.
    ``separators``: positions in ``ids`` of the EOS tokens inserted between documents (not the leading,
    unscored one; empty when there are none or they are unknown): scored tokens that are not document text."""

    ids: np.ndarray
    n_bytes: int | None = None
    documents: int = 0
    source: str = "tokens"
    separators: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)


def is_prepared_folder(path) -> bool:
    """True for a folder of tokenized samples: written by ``mptkit data prepare`` (an mptkit token
    ``manifest.json``) or an MDS folder (llm-foundry's ``--concat_tokens``: ``index.json``, in the folder or in
    its split subfolders)."""
    from mptkit.data.corpus import is_prepared_dir
    from mptkit.data.mds import is_mds_folder

    p = Path(path)
    return p.is_dir() and (is_prepared_dir(p) or is_mds_folder(p))


def _decoded_bytes(tokenizer, ids: list[int]) -> int:
    return len(tokenizer.decode(ids).encode("utf-8")) if ids else 0


def encode_texts(texts, tokenizer, *, max_tokens: int | None = None, source: str = "texts") -> TokenStream:
    """Tokenize documents into one stream ``[eos] d1 [eos] d2 ... dN`` (see the module docstring).

    ``texts``: a string (one document) or an iterable of strings. Without an EOS token in the tokenizer the
    documents are simply concatenated (and the first token has no context, so it is not scored, while its
    bytes still count in ``n_bytes``: bits per byte is then slightly low)."""
    if tokenizer is None:
        raise EvalError(f"{source}: text needs a tokenizer (the model folder has none; pass --tokenizer)")
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        log.warning("the tokenizer has no EOS token: documents are concatenated without a separator")
    ids: list[int] = [eos] if eos is not None else []
    seps: list[int] = []
    n_bytes = docs = 0
    budget = None if max_tokens is None else int(max_tokens)
    batch: list[str] = []

    def flush() -> bool:  # True when the budget is reached
        nonlocal n_bytes, docs
        if not batch:
            return False
        for text, d in zip(batch, encode_batch(tokenizer, batch)):
            if docs and eos is not None:
                if budget is not None and len(ids) >= budget:
                    return True
                seps.append(len(ids))
                ids.append(eos)
            docs += 1
            if budget is not None and len(ids) + len(d) > budget:
                keep = d[: max(0, budget - len(ids))]
                ids.extend(keep)
                n_bytes += _decoded_bytes(tokenizer, keep)
                return True
            ids.extend(d)
            n_bytes += len(text.encode("utf-8"))
        batch.clear()
        return False

    for t in texts:
        if not isinstance(t, str):
            raise EvalError(f"{source}: expected text documents (str), got {type(t).__name__}")
        if not t:
            continue
        batch.append(t)
        if len(batch) >= _ENCODE_BATCH and flush():
            break
    else:
        flush()
    return TokenStream(np.asarray(ids, dtype=np.int64), n_bytes=n_bytes, documents=docs, source=source,
                       separators=np.asarray(seps, dtype=np.int64))


def read_documents(path, *, text_field: str = "text"):
    """Yield the documents of a file or folder (the readers of ``mptkit data prepare``; bad records are
    skipped with a warning). Raises :class:`EvalError` for a missing path."""
    from mptkit.data.corpus import Issues, iter_documents, resolve_inputs

    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"--data {path}: no such file or folder")
    try:
        files = resolve_inputs([str(p)])
    except DataError as e:
        raise EvalError(f"--data {path}: {e}") from None
    issues = Issues()
    for f in files:
        for _, text in iter_documents(f, text_field=text_field, issues=issues):
            yield text
    if issues.total:
        log.warning("%s: %d bad inputs skipped (%s)", path, issues.total, issues.counts)


def load_prepared(folder, *, split: str = "val", max_tokens: int | None = None, tokenizer=None,
                  vocab_size: int | None = None) -> TokenStream:
    """The rows of a prepared folder's ``split``, concatenated (at most ``max_tokens``). With ``tokenizer``
    and/or ``vocab_size`` the folder is checked against the model first (same tokenizer fingerprint, ids
    that fit the embedding)."""
    from mptkit.data.mds import open_token_dataset
    from mptkit.data.shards import TokenDataset, check_compatible

    try:
        ds = open_token_dataset(folder, split)
        if isinstance(ds, TokenDataset) and (tokenizer is not None or vocab_size is not None):
            check_compatible(ds.manifest, tokenizer=tokenizer, vocab_size=vocab_size, where=str(folder))
    except DataError as e:
        raise EvalError(f"--data {folder}: {e}") from None
    if not isinstance(ds, TokenDataset):  # an MDS folder: rows of any length, in order
        ds.split, ds.max_seq_len = ds.manifest.get("split") or split, None
    n = len(ds)
    if n == 0:
        raise EvalError(f"--data {folder}: the {ds.split!r} split has no samples (choose another --split, or "
                        "prepare the data with a larger --val-fraction)")
    if isinstance(ds, TokenDataset):
        rows = n if max_tokens is None else min(n, -(-int(max_tokens) // ds.max_seq_len))
        parts = [ds.row(i).astype(np.int64) for i in range(rows)]
    else:
        parts, have = [], 0
        for i in range(n):
            if max_tokens is not None and have >= int(max_tokens):
                break
            parts.append(ds[i]["input_ids"].numpy())
            have += len(parts[-1])
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    return TokenStream(ids, n_bytes=None, documents=0, source=f"{folder} ({ds.split}: {n} samples)")


def load_token_stream(path, tokenizer=None, *, split: str = "val", max_tokens: int | None = None,
                      text_field: str = "text", vocab_size: int | None = None) -> TokenStream:
    """A :class:`TokenStream` from ``path``: a prepared folder (its ``split``) or text files / folders
    (tokenized with ``tokenizer``). Empty data is an :class:`EvalError`."""
    if max_tokens is not None and int(max_tokens) < 2:
        raise EvalError(f"--max-tokens {max_tokens}: need at least 2 tokens")
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"--data {path}: no such file or folder")
    if p.is_dir() and is_prepared_folder(p):
        stream = load_prepared(p, split=split, max_tokens=max_tokens, tokenizer=tokenizer, vocab_size=vocab_size)
    else:
        stream = encode_texts(read_documents(p, text_field=text_field), tokenizer, max_tokens=max_tokens,
                              source=str(path))
    real = len(stream) - (1 if stream.n_bytes is not None and getattr(tokenizer, "eos_token_id", None)
                          is not None else 0)
    if real <= 0:
        raise EvalError(f"--data {path}: no tokens to evaluate (no usable documents"
                        + (f" with a {text_field!r} field" if p.suffix.lower() in (".jsonl", ".json", ".csv")
                           else "") + ")")
    if vocab_size is not None:
        from mptkit.eval.scoring import check_token_ids

        check_token_ids(stream.ids, vocab_size, f"--data {path}")
    return stream
