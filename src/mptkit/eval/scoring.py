"""Per-token scoring shared by every evaluation: next-token log-probabilities without the (B, T, V) logits.

:func:`next_token_logprobs` runs the model once with ``return_logits=False`` (only the final hidden states
come back), then applies the LM head to ``chunk_elems / vocab`` rows at a time: each chunk's logits are
turned into ``log p(target)`` (``logit[target] - logsumexp(logits)``, in fp32) and, when asked, the greedy
(argmax) token, and dropped. Memory is the hidden states plus one chunk of logits, so a 32K-token window of
a 50K-vocabulary model does not need a 6.5 GB fp32 logits tensor. Only the positions a caller selects are
scored (ICL scores the answer tokens only).

Right padding needs no attention mask: attention is causal, so a real token never sees the padding after it,
and ALiBi / learned positions count from the sequence start either way.
"""

from __future__ import annotations

import logging
import os

import torch

from mptkit.errors import EvalError
from mptkit.infer.quant_kernels import decode_arithmetic
from mptkit.utils.dtypes import WEIGHT_DTYPES, torch_dtype

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMS = 1 << 24  # logits per chunk (64 MB in fp32)
DTYPES = WEIGHT_DTYPES  # the --dtype choices (names of torch dtypes)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EvalError(f"--device {device!r}: not a device ({e}); use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_model(folder, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype = "fp32",
               attn_impl: str | None = None, tokenizer=None, need_tokenizer: bool = True, quant: str | None = None,
               adapter=None):
    """``(model, tokenizer)`` from an HF-layout model folder (or a training run / checkpoint: its newest valid
    checkpoint, a sharded one consolidated), in eval mode on ``device``.

    ``tokenizer``: a tokenizer or a folder to use instead of the one beside the weights. With
    ``need_tokenizer`` a folder without tokenizer files is an :class:`EvalError`. ``quant`` (``"int8"``):
    quantise the block Linears while loading (a quantised folder loads quantised without it)."""
    from mptkit.errors import CheckpointError
    from mptkit.io.source import open_model_source
    from mptkit.io.tokenizer_files import load_tokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EvalError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = torch_dtype(dtype)
    dev = resolve_device(device)
    if not os.path.isdir(folder):
        raise EvalError(f"model {folder}: no such folder (expected an HF-layout model folder: config.json + "
                        "*.safetensors, e.g. runs/quickstart/hf, or a training run)")
    try:
        source = open_model_source(folder, adapter=adapter)  # adapter: a LoRA adapter applied unmerged
    except CheckpointError as e:
        raise EvalError(f"model {folder}: {e}") from None
    with source:
        model = source.load_model(dtype=dtype, device=dev, attn_impl=attn_impl, quant=quant).eval()
        tok = load_tokenizer(tokenizer) if tokenizer is not None else source.load_tokenizer()
    if tok is None and need_tokenizer:
        raise EvalError(f"model {folder}: no tokenizer files (tokenizer.json) beside the weights; "
                        "pass --tokenizer FOLDER")
    return model, tok


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_token_ids(ids, vocab_size: int, where: str) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` (an embedding lookup would fail with an index error)."""
    if len(ids) == 0:
        return
    hi = int(max(ids) if not hasattr(ids, "max") else ids.max())
    lo = int(min(ids) if not hasattr(ids, "min") else ids.min())
    if lo < 0 or hi >= vocab_size:
        raise EvalError(f"{where}: token ids span [{lo}, {hi}] but the model's vocab_size is {vocab_size}; "
                        "the data was tokenized with a different tokenizer than the model's")


@torch.inference_mode()
def next_token_logprobs(model, input_ids: torch.Tensor, select: torch.Tensor | None = None, *,
                        greedy: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS):
    """Log-probabilities of each next token: for ``input_ids`` (B, T), entry ``[b, t]`` of the (B, T-1)
    target grid is ``log p(input_ids[b, t+1] | input_ids[b, :t+1])``, computed in fp32.

    ``select`` (B, T-1) bool picks the entries to compute (default: all); the result holds them flattened
    in row-major order: ``logp`` (N,) fp32 and, with ``greedy``, ``argmax`` (N,) long, the model's most
    likely token at each selected entry (else None). The LM head runs ``chunk_elems // vocab`` rows at a
    time, so the (B, T, V) logits are never held.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise EvalError(f"scoring needs (batch, tokens >= 2) input ids, got shape {tuple(input_ids.shape)}")
    with decode_arithmetic(model):  # a quantised model: the arithmetic its generation runs
        return _next_token_logprobs(model, input_ids, select, greedy, chunk_elems)


def _next_token_logprobs(model, input_ids, select, greedy, chunk_elems):
    out = model(input_ids, return_logits=False, return_hidden=True)
    h = out.hidden_states[:, :-1]
    targets = input_ids[:, 1:]
    if select is None:
        rows = h.reshape(-1, h.shape[-1])
        tgt = targets.reshape(-1)
    else:
        select = select.to(h.device)
        rows = h[select]
        tgt = targets[select]
    n = rows.shape[0]
    vocab = model.config.vocab_size
    step = max(1, int(chunk_elems) // max(1, vocab))
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    am = torch.empty(n, dtype=torch.long, device=h.device) if greedy else None
    for s in range(0, n, step):
        logits = model.logits(rows[s : s + step]).float()
        t = tgt[s : s + step].unsqueeze(1)
        logp[s : s + step] = logits.gather(1, t).squeeze(1) - torch.logsumexp(logits, dim=-1)
        if greedy:
            am[s : s + step] = logits.argmax(dim=-1)
        del logits
    return logp, am
