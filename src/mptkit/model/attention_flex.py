"""FlexAttention backend: ALiBi as a ``score_mod``, causal / padding / sequence-id as a block mask.

The kernel is compiled once per *bucket*: query and key lengths are rounded up to a power of two (at least
128), the extra keys are masked out and the extra queries dropped, so a run that sees many lengths compiles
only a handful of times. Causal attention keeps this exact: padded keys sit after every real query.

Compilation can be turned off with ``FastPathOptions(flex_compile=False)`` (``mptkit.model.fastpath``; its
default comes from the environment variable ``MPTKIT_FLEX_COMPILE``, ``0`` = off): flex_attention then runs
uncompiled (slow, O(T^2) memory, meant for debugging). On CPU, torch 2.13's compiled FlexAttention has
no backward pass: use it for inference there (training on CPU: ``auto``/``sdpa``/``blockwise``).

The slopes are read from a captured tensor (``slopes[h]``), not from ``exp2(-8 h / H)``: that shortcut is
only right for power-of-two head counts.
"""

from __future__ import annotations

import functools

import torch

from mptkit.errors import ConfigError

MIN_BUCKET = 128


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # torch < 2.5
        raise ConfigError(f"attn_impl 'flex' needs torch >= 2.5 with FlexAttention ({e})") from e
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return fn, create_block_mask


def flex_attention_alibi(
    q, k, v, *, slopes, softmax_scale, key_padding_mask=None, sequence_id=None, dropout_p=0.0, training=False,
    compiled: bool = True,
):
    """(B, H, Tq, D) q, (B, Hkv, Tk, D) k/v -> (B, Tq, H, D); exact ALiBi causal attention (``compiled``:
    through ``torch.compile``, bucketed lengths)."""
    if dropout_p and training:
        raise ConfigError("attn_impl 'flex' does not implement attention dropout; set attn_pdrop 0 or use 'sdpa'")
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ConfigError(
            "attn_impl 'flex' has no backward pass on CPU in this torch: train with attn_impl 'auto', 'sdpa' or "
            "'blockwise' (flex is for CPU inference and for CUDA)"
        )
    if q.device.type == "cpu":  # no grad wanted here (checked above); flex refuses inputs that require it
        q, k, v = q.detach(), k.detach(), v.detach()
    flex, create_block_mask = _flex_fn(compiled)
    b, h, tq, _d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    off = tk - tq
    bq, bk = (_bucket(tq), _bucket(tk)) if compiled else (tq, tk)
    if bq != tq:
        q = torch.nn.functional.pad(q, (0, 0, 0, bq - tq))
    if bk != tk:
        k = torch.nn.functional.pad(k, (0, 0, 0, bk - tk))
        v = torch.nn.functional.pad(v, (0, 0, 0, bk - tk))
    dev = q.device
    sl = (slopes if slopes is not None else torch.zeros(h)).to(device=dev, dtype=torch.float32)
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.zeros((b, bk), dtype=torch.bool, device=dev)
        kpm[:, :tk] = key_padding_mask.to(torch.bool)
    sid = None
    if sequence_id is not None:
        sid = torch.full((b, bk), -1, dtype=torch.long, device=dev)
        sid[:, :tk] = sequence_id
        # padded queries (positions >= tk) need an id too: give them their own (-1)

    # Lengths enter as tensors, not Python ints, so that a new length in the same bucket reuses the kernel.
    off_t = torch.tensor(off, device=dev)
    tk_t = torch.tensor(tk, device=dev)

    def score_mod(score, bi, hi, qi, ki):
        return score + sl[hi] * (ki - qi - off_t).to(torch.float32)

    def mask_mod(bi, hi, qi, ki):
        p = qi + off_t
        ok = (ki <= p) & (ki < tk_t)
        if kpm is not None:
            ok = ok & (kpm[bi, ki] | (ki == p))
        if sid is not None:
            qid = sid[bi, torch.clamp(p, max=bk - 1)]
            ok = ok & (sid[bi, ki] == qid)
        return ok | (ki == p)  # a query always sees itself (padded queries too: no empty rows)

    mb = b if (kpm is not None or sid is not None) else None
    block_mask = create_block_mask(mask_mod, mb, None, bq, bk, device=str(dev))
    out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=softmax_scale, enable_gqa=(h != hkv))
    return out[:, :, :tq].transpose(1, 2)
