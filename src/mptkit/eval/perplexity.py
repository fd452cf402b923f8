"""Token-level perplexity with sliding windows (the "perplexity of fixed-length models" method).

A stream of N tokens is read in windows of ``max_seq_len`` tokens whose starts are ``stride`` apart. Each
token is scored exactly once, by the first window that holds it past the part the previous window already
scored: window ``[begin, end)`` scores the tokens ``[prev_end, end)``, where ``prev_end`` is the end of the
previous window. Every scored token therefore sees at least ``max_seq_len - stride`` tokens of context
(except in the first window, where token ``t`` sees ``t``), and up to ``max_seq_len - 1``. Token 0 has no
context and is not scored (text streams start with an EOS for that reason: see :mod:`mptkit.eval.data`).

``stride == max_seq_len`` gives (almost) non-overlapping windows: each starts at the last token of the
previous one, which is context only, so every token is still scored (cheapest; many tokens with little
context, like the training eval loss); smaller strides cost ``max_seq_len / stride`` times more compute and give a lower, tighter
figure. The loss is the exact mean negative log-likelihood over **all** scored tokens (sums of per-token
losses, not a mean of window means), the EOS separators between documents included. Bits per byte covers
the document text only: the NLL of the document tokens (all scored tokens minus the EOS separators) / ln 2
/ UTF-8 bytes of the documents. Context crosses document boundaries (the stream is one sequence), so these
figures are not lm-eval-harness's rolling log-likelihood, which scores each document on its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mptkit.errors import EvalError
from mptkit.eval.data import TokenStream, encode_texts
from mptkit.eval.scoring import check_token_ids, model_device, next_token_logprobs

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Figures of one run, and the tokens each covers.

    ``tokens``: every scored token (all but the first of the stream), EOS separators between documents
    included; ``total_nll``: their summed NLL (nats); ``loss`` = total_nll / tokens; ``perplexity`` =
    exp(loss). ``separators``: how many of the scored tokens are EOS separators; ``document_nll``: the NLL
    of the other scored tokens, the document text (None when the stream has no byte count, e.g. token ids or
    a prepared folder). ``bits_per_byte`` = document_nll / ln 2 / ``n_bytes`` (the documents' UTF-8 bytes):
    separators are no text, so they count in neither."""

    loss: float
    perplexity: float
    tokens: int
    windows: int
    max_seq_len: int
    stride: int
    total_nll: float
    n_bytes: int | None = None
    bits_per_byte: float | None = None
    source: str = ""
    separators: int = 0
    document_nll: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n: int, max_seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window over ``n`` tokens: the window is ``ids[begin:end]`` and
    it scores the tokens ``[first_scored, end)`` (the first window scores from token 1)."""
    if not 1 <= stride <= max_seq_len:
        raise EvalError(f"--stride {stride}: must be between 1 and the window length {max_seq_len}")
    out, prev_end, begin = [], 0, 0
    while prev_end < n:
        begin = min(begin, max(prev_end - 1, 0))  # stride == max_seq_len: the previous last token is context
        end = min(begin + max_seq_len, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def check_window_length(model, length: int, what: str = "--max-seq-len") -> None:
    """Refuse windows past ``max_seq_len`` for a model with learned position embeddings (ALiBi has no limit)."""
    cfg = model.config
    if int(length) < 2:
        raise EvalError(f"{what} {length}: a window needs at least 2 tokens")
    if cfg.use_learned_pos_emb and int(length) > cfg.max_seq_len:
        raise EvalError(f"{what} {length}: this model uses learned position embeddings, which have no entry past "
                        f"max_seq_len={cfg.max_seq_len}; use lengths <= {cfg.max_seq_len} (ALiBi models can "
                        "read longer windows)")


def as_token_stream(data, tokenizer=None, *, max_tokens: int | None = None) -> TokenStream:
    """``data`` as a :class:`TokenStream`: a TokenStream, a string or list of strings (tokenized with
    ``tokenizer``), or token ids (a list of ints, a 1-D numpy array or tensor)."""
    if isinstance(data, TokenStream):
        ids = data.ids if max_tokens is None else data.ids[: int(max_tokens)]
        if len(ids) == len(data.ids):
            return data
        return TokenStream(ids, None, data.documents, data.source, data.separators[data.separators < len(ids)])
    if isinstance(data, str) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], str)):
        return encode_texts(data, tokenizer, max_tokens=max_tokens)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise EvalError(f"expected text, a list of texts or a 1-D sequence of token ids; got an array of shape "
                        f"{arr.shape} and dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    return TokenStream(arr if max_tokens is None else arr[: int(max_tokens)], None, 0, "token ids")


@torch.inference_mode()
def perplexity(model, data, tokenizer=None, *, max_seq_len: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, allow_short: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` with sliding windows (see the module docstring).

    ``data``: text, a list of texts (tokenized with ``tokenizer``, documents joined with EOS), token ids or
    a :class:`~mptkit.eval.data.TokenStream`. ``max_seq_len``: window length (default the model's; ALiBi
    models may go past it). ``stride``: distance between window starts (default ``max_seq_len // 2``).
    ``max_tokens``: use only the first tokens of the stream. ``batch_size``: windows per forward pass.
    Data shorter than one window is refused unless ``allow_short`` (then one short window is scored).
    """
    stream = as_token_stream(data, tokenizer, max_tokens=max_tokens)
    L = int(max_seq_len or model.config.max_seq_len)
    check_window_length(model, L)
    S = int(stride) if stride is not None else max(1, L // 2)
    if int(batch_size) < 1:
        raise EvalError(f"--batch-size {batch_size}: must be >= 1")
    n = len(stream)
    if n < 2:
        raise EvalError(f"{stream.source}: {n} token(s); perplexity needs at least 2")
    if n < L and not allow_short:
        raise EvalError(f"{stream.source}: {n} tokens, shorter than one window of {L}; give more data or a "
                        f"smaller --max-seq-len (<= {n})")
    check_token_ids(stream.ids, model.config.vocab_size, stream.source)
    windows = sliding_windows(n, L, S)
    dev = model_device(model)
    ids = torch.from_numpy(stream.ids)
    is_sep = torch.zeros(n, dtype=torch.bool)
    is_sep[torch.from_numpy(np.asarray(stream.separators, dtype=np.int64))] = True
    total, sep_total, count = 0.0, 0.0, 0
    # Windows of equal length batch together (all but the last one or two have length L).
    for i in range(0, len(windows), int(batch_size)):
        group = windows[i : i + int(batch_size)]
        width = max(e - b for b, e, _ in group)
        x = torch.zeros((len(group), width), dtype=torch.long)
        sel = torch.zeros((len(group), width - 1), dtype=torch.bool)
        sep = torch.zeros((len(group), width - 1), dtype=torch.bool)
        for r, (b, e, first) in enumerate(group):
            x[r, : e - b] = ids[b:e]
            sel[r, first - b - 1 : e - b - 1] = True  # target grid index t scores token t + 1
            sep[r, first - b - 1 : e - b - 1] = is_sep[first:e]
        logp, _ = next_token_logprobs(model, x.to(dev), sel)
        logp = logp.double().cpu()
        total -= float(logp.sum())
        sep_total -= float(logp[sep[sel]].sum())  # logp holds the selected entries in row-major order
        count += int(sel.sum())
        if (i // int(batch_size)) % 50 == 49:
            log.info("perplexity: %d/%d windows, loss so far %.4f", i + len(group), len(windows), total / count)
    if count != n - 1:  # every token but the first is scored exactly once (sliding_windows guarantees it)
        raise EvalError(f"internal error: the windows scored {count} tokens of a {n}-token stream, expected "
                        f"{n - 1} (max_seq_len={L}, stride={S}); please report this")
    loss = total / count
    doc_nll = bpb = None
    if stream.n_bytes is not None:
        doc_nll = total - sep_total
        if stream.n_bytes > 0:
            bpb = doc_nll / math.log(2) / stream.n_bytes
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count, windows=len(windows),
                            max_seq_len=L, stride=S, total_nll=total, n_bytes=stream.n_bytes,
                            bits_per_byte=bpb, source=stream.source, separators=int(is_sep[1:].sum()),
                            document_nll=doc_nll)
