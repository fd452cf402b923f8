"""The long-context curve (MPT-7B-StoryWriter style): how the loss depends on where a token sits in a window.

For each window length ``T`` the token stream is cut into non-overlapping windows of ``T`` tokens (from the
start of the stream, at most ``max_tokens`` tokens per length, so every length reads the same prefix of the
data). Each window is one forward pass; the token at position ``p`` (``1 <= p < T``) is scored with the ``p``
tokens before it as context. ``position_loss[p - 1]`` is the mean NLL at position ``p`` over the windows.
The positions ``1 .. T-1`` are split into ``buckets`` equal ranges; a model that uses its context shows a
loss falling with position, and one that breaks past its training length (learned positions, or ALiBi
pushed too far) shows the last buckets rising. Lengths past the model's ``max_seq_len`` are allowed for
ALiBi models (that is the point of the curve) and refused for learned position embeddings.

Memory is O(T): the forward returns only hidden states (``return_logits=False``), the LM head is applied in
row chunks (:func:`mptkit.eval.scoring.next_token_logprobs`), and on CPU ``attn_impl: auto`` (mptkit's
default; ``mptkit eval --attn-impl auto`` for a folder whose config.json names another backend) runs plain
causal windows on the fused O(T) kernel. ``torch`` (eager) attention holds a T x T score matrix per head.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mptkit.errors import EvalError
from mptkit.eval.perplexity import as_token_stream, check_window_length
from mptkit.eval.scoring import check_token_ids, model_device, next_token_logprobs

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1 << 16  # tokens per length (each length reads the same prefix of the data)
DEFAULT_BATCH_TOKENS = 1 << 14  # tokens per forward pass (windows of one length are batched up to this)


@dataclass
class LengthResult:
    """The curve at one window length. ``loss``: mean NLL over all scored positions of all windows;
    ``bucket_edges``: ``buckets + 1`` position boundaries (bucket ``i`` = positions ``[edges[i],
    edges[i+1])``); ``bucket_loss``: mean NLL per bucket; ``position_loss``: mean NLL per position 1..T-1."""

    length: int
    windows: int
    tokens: int
    loss: float
    bucket_edges: list[int]
    bucket_loss: list[float]
    past_max_seq_len: bool = False
    position_loss: np.ndarray | None = field(default=None, repr=False)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def last_bucket_loss(self) -> float:
        return self.bucket_loss[-1]

    def to_dict(self, *, positions: bool = False) -> dict:
        d = {"length": self.length, "windows": self.windows, "tokens": self.tokens, "loss": self.loss,
             "perplexity": self.perplexity, "last_bucket_loss": self.last_bucket_loss,
             "past_max_seq_len": self.past_max_seq_len,
             "buckets": [{"start": a, "end": b, "loss": v} for (a, b), v in
                         zip(itertools.pairwise(self.bucket_edges), self.bucket_loss)]}
        if positions and self.position_loss is not None:
            d["position_loss"] = [float(x) for x in self.position_loss]
        return d


def parse_lengths(spec) -> list[int]:
    """``"256,512,1024"`` (or a list) -> sorted unique ints >= 2; anything else is an :class:`EvalError`."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise EvalError(f"--lengths: {s!r} is not an integer (give window lengths in tokens, e.g. "
                            "--lengths 256,512,1024)") from None
        if v < 2:
            raise EvalError(f"--lengths: {v} is too short (a window needs at least 2 tokens)")
        out.append(v)
    if not out:
        raise EvalError("--lengths: no lengths given (e.g. --lengths 256,512,1024)")
    return sorted(set(out))


def bucket_edges(length: int, buckets: int) -> list[int]:
    """``buckets + 1`` integer boundaries splitting positions ``1 .. length-1`` into near-equal ranges
    (fewer buckets when there are fewer positions)."""
    k = max(1, min(int(buckets), length - 1))
    return [int(x) for x in np.linspace(1, length, k + 1).round().astype(int)]


@torch.inference_mode()
def loss_by_position(model, ids: np.ndarray, length: int, *, batch_tokens: int = DEFAULT_BATCH_TOKENS):
    """``(sum_nll, windows)``: per-position NLL summed over the non-overlapping windows of ``length`` tokens
    of ``ids`` (positions 1..length-1, float64 array)."""
    nw = len(ids) // length
    dev = model_device(model)
    total = np.zeros(length - 1, dtype=np.float64)
    per_pass = max(1, int(batch_tokens) // length)
    x_all = torch.from_numpy(np.ascontiguousarray(ids[: nw * length])).view(nw, length)
    for s in range(0, nw, per_pass):
        x = x_all[s : s + per_pass].to(dev)
        logp, _ = next_token_logprobs(model, x)
        total -= logp.view(x.shape[0], length - 1).double().sum(0).cpu().numpy()
    return total, nw


def long_context_curve(model, data, lengths, tokenizer=None, *, buckets: int = 8,
                       max_tokens: int | None = DEFAULT_MAX_TOKENS,
                       batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[LengthResult]:
    """Mean loss per position bucket for windows of each length (see the module docstring).

    ``data``: text, texts (with ``tokenizer``), token ids or a TokenStream. ``lengths``: ints or
    ``"256,512"``. ``max_tokens``: tokens read per length (None: all). Every length must fit at least one
    window in the data; a length past ``max_seq_len`` needs an ALiBi model."""
    lens = parse_lengths(lengths)
    if int(buckets) < 1:
        raise EvalError(f"--buckets {buckets}: must be >= 1")
    for t in lens:
        check_window_length(model, t, "--lengths")
    stream = as_token_stream(data, tokenizer)
    check_token_ids(stream.ids, model.config.vocab_size, stream.source)
    budget = len(stream) if max_tokens is None else min(len(stream), int(max_tokens))
    short = [t for t in lens if t > budget]
    if short:
        have = f"{len(stream)} tokens" + (f", {budget} used (--max-tokens)" if budget < len(stream) else "")
        raise EvalError(f"{stream.source}: {have}: not one window of length {', '.join(map(str, short))}; "
                        "give more data (or a larger --max-tokens) or drop those lengths")
    out = []
    for t in lens:
        total, nw = loss_by_position(model, stream.ids[:budget], t, batch_tokens=batch_tokens)
        pos = total / nw
        edges = bucket_edges(t, buckets)
        bl = [float(pos[a - 1 : b - 1].mean()) for a, b in itertools.pairwise(edges)]
        res = LengthResult(length=t, windows=nw, tokens=nw * (t - 1), loss=float(total.sum() / (nw * (t - 1))),
                           bucket_edges=edges, bucket_loss=bl, past_max_seq_len=t > model.config.max_seq_len,
                           position_loss=pos)
        log.info("length %d: %d windows, loss %.4f, last bucket %.4f", t, nw, res.loss, res.last_bucket_loss)
        out.append(res)
    return out
