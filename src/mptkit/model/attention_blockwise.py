"""Memory-bounded ALiBi attention: online softmax over key blocks, forward and backward.

Neither the T x T scores nor the T x T ALiBi bias ever exist: the forward pass walks query blocks of
``block_q`` rows and, for each, key blocks of ``block_k`` columns, keeping a running max, denominator and
output (the online softmax of FlashAttention); it saves only the output and the per-row log-sum-exp. The
backward pass recomputes each block's probabilities from that log-sum-exp and accumulates dQ, dK, dV
(FlashAttention-2's backward). Peak extra memory is O(B * H * block_q * block_k) plus the O(T) inputs and
gradients, whatever the sequence length.

Semantics are those of :mod:`mptkit.model.attention` (bottom-right aligned queries, ALiBi ``-slope * (p -
j)``, causal, ``key_padding_mask`` True = real token, ``sequence_id`` equality, a query always sees its own
position, GQA head ``h`` reads kv head ``h // n_rep``). GQA/MQA is computed without repeating K and V: query
heads are grouped as (Hkv, n_rep) and broadcast against their kv head.

Key blocks wholly above the causal diagonal are skipped, so causal attention costs about half of the
full T x T work. Attention dropout is not implemented here (MPT trains with ``attn_pdrop`` 0).
"""

from __future__ import annotations

import torch

from mptkit.errors import ConfigError

BLOCK_Q = 512
BLOCK_K = 512


def _block_scores(q5, k5, q0, k0, *, q_pos0, slopes5, scale, kpm, sid_q, sid_k, causal_needed):
    """Scores of one (query block, key block) pair with bias and masks: (B, Hkv, R, bq, bk) fp32.

    ``q_pos0``: absolute position of the block's first query; ``k0``: of its first key. Masked entries hold
    the most negative fp32 (finite, so a row masked within one block cannot produce NaN).
    """
    bq = q5.shape[3]
    bk = k5.shape[3]
    s = torch.matmul(q5, k5.transpose(-1, -2))
    if s.dtype != torch.float32:
        s = s.float()
    s.mul_(scale)
    dev = s.device
    rel = None
    if slopes5 is not None or causal_needed or kpm is not None:
        qpos = torch.arange(q_pos0, q_pos0 + bq, device=dev, dtype=torch.float32)
        kpos = torch.arange(k0, k0 + bk, device=dev, dtype=torch.float32)
        rel = kpos[None, :] - qpos[:, None]  # (bq, bk); <= 0 where causal allows
    if slopes5 is not None:
        s.add_(slopes5 * rel)
    allowed = None
    if causal_needed:
        allowed = rel <= 0  # (bq, bk)
    if sid_k is not None:
        same = sid_q[:, :, None] == sid_k[:, None, :]  # (B, bq, bk)
        allowed = same if allowed is None else (allowed & same)
    if kpm is not None:
        real = kpm[:, None, :] | (rel == 0)  # a (padding) query always sees itself
        allowed = real if allowed is None else (allowed & real)
    if allowed is not None:
        if allowed.dim() == 3:  # (B, bq, bk) -> (B, 1, 1, bq, bk)
            allowed = allowed[:, None, None]
        s.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return s


def _plan(tq, tk, block_q, block_k):
    """Yield (q0, q1, [(k0, k1, causal_needed), ...]) for the bottom-right aligned causal layout."""
    off = tk - tq
    for q0 in range(0, tq, block_q):
        q1 = min(tq, q0 + block_q)
        last_key = off + q1 - 1  # the last query of the block sees keys <= last_key
        kb = []
        for k0 in range(0, last_key + 1, block_k):
            k1 = min(tk, k0 + block_k)
            kb.append((k0, k1, k1 - 1 > off + q0))  # mask needed if some key is after the first query
        yield q0, q1, kb


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, kpm, sid, block_q, block_k):
        b, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        r = h // hkv
        q5 = q.reshape(b, hkv, r, tq, d)
        k5 = k[:, :, None]
        v5 = v[:, :, None]
        slopes5 = None if slopes is None else slopes.to(torch.float32).reshape(1, hkv, r, 1, 1)
        off = tk - tq
        out = torch.empty((b, hkv, r, tq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, hkv, r, tq), dtype=torch.float32, device=q.device)
        for q0, q1, kblocks in _plan(tq, tk, block_q, block_k):
            qb = q5[:, :, :, q0:q1]
            sid_q = sid[:, off + q0 : off + q1] if sid is not None else None
            m = torch.full((b, hkv, r, q1 - q0, 1), float("-inf"), dtype=torch.float32, device=q.device)
            l_ = torch.zeros_like(m)
            acc = torch.zeros((b, hkv, r, q1 - q0, d), dtype=torch.float32, device=q.device)
            for k0, k1, causal_needed in kblocks:
                s = _block_scores(
                    qb, k5[:, :, :, k0:k1], q0, k0, q_pos0=off + q0, slopes5=slopes5, scale=scale,
                    kpm=None if kpm is None else kpm[:, k0:k1], sid_q=sid_q,
                    sid_k=None if sid is None else sid[:, k0:k1], causal_needed=causal_needed,
                )
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                alpha = torch.exp(m - m_new)
                p = s.sub_(m_new).exp_()
                l_.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
                pv = torch.matmul(p.to(v.dtype), v5[:, :, :, k0:k1])
                acc.mul_(alpha).add_(pv)
                m = m_new
                del s, p
            out[:, :, :, q0:q1] = (acc / l_).to(q.dtype)
            lse[:, :, :, q0:q1] = (m + torch.log(l_)).squeeze(-1)
        out = out.view(b, h, tq, d)
        ctx.save_for_backward(q, k, v, out, lse, slopes, kpm, sid)
        ctx.scale = scale
        ctx.blocks = (block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes, kpm, sid = ctx.saved_tensors
        scale = ctx.scale
        block_q, block_k = ctx.blocks
        b, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        r = h // hkv
        off = tk - tq
        q5 = q.reshape(b, hkv, r, tq, d)
        k5 = k[:, :, None]
        v5 = v[:, :, None]
        do5 = dout.contiguous().view(b, hkv, r, tq, d)
        out5 = out.view(b, hkv, r, tq, d)
        slopes5 = None if slopes is None else slopes.to(torch.float32).reshape(1, hkv, r, 1, 1)
        delta = (do5.float() * out5.float()).sum(-1, keepdim=True)  # (B, Hkv, R, Tq, 1)
        dq = torch.zeros((b, hkv, r, tq, d), dtype=torch.float32, device=q.device)
        dk = torch.zeros((b, hkv, tk, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros((b, hkv, tk, d), dtype=torch.float32, device=q.device)
        for q0, q1, kblocks in _plan(tq, tk, block_q, block_k):
            qb = q5[:, :, :, q0:q1]
            dob = do5[:, :, :, q0:q1]
            lse_b = lse[:, :, :, q0:q1, None]
            delta_b = delta[:, :, :, q0:q1]
            sid_q = sid[:, off + q0 : off + q1] if sid is not None else None
            dq_acc = dq[:, :, :, q0:q1]
            for k0, k1, causal_needed in kblocks:
                kb = k5[:, :, :, k0:k1]
                vb = v5[:, :, :, k0:k1]
                s = _block_scores(
                    qb, kb, q0, k0, q_pos0=off + q0, slopes5=slopes5, scale=scale,
                    kpm=None if kpm is None else kpm[:, k0:k1], sid_q=sid_q,
                    sid_k=None if sid is None else sid[:, k0:k1], causal_needed=causal_needed,
                )
                p = s.sub_(lse_b).exp_()  # (B, Hkv, R, bq, bk)
                pd = p.to(v.dtype)
                # dV[kv head] = sum over its R query heads of P^T dO
                dv[:, :, k0:k1] += torch.matmul(pd.transpose(-1, -2), dob).sum(2).float()
                dp = torch.matmul(dob, vb.transpose(-1, -2)).float()
                ds = p.mul_(dp.sub_(delta_b))  # dS = P * (dP - delta), in place over p
                ds.mul_(scale)
                dsd = ds.to(q.dtype)
                dq_acc += torch.matmul(dsd, kb).float()
                dk[:, :, k0:k1] += torch.matmul(dsd.transpose(-1, -2), qb).sum(2).float()
                del s, p, dp, ds
        return (dq.reshape(b, h, tq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None, None, None, None)


def blockwise_attention(
    q, k, v, *, slopes, softmax_scale, key_padding_mask=None, sequence_id=None, dropout_p=0.0, training=False,
    block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
):
    """Exact ALiBi attention in O(T) memory (see the module docstring); returns (B, Tq, H, D)."""
    if dropout_p and training:
        raise ConfigError(
            "attn_impl 'blockwise' does not implement attention dropout (attn_pdrop > 0 while training); "
            "use attn_impl 'sdpa' or 'torch', or set attn_config.attn_pdrop to 0"
        )
    _b, h, tq, _d = q.shape
    tk = k.shape[2]
    if tk < tq:
        raise ConfigError(f"attention: {tq} queries but only {tk} keys (queries are the last Tq of the keys)")
    if slopes is not None and slopes.numel() != h:
        raise ConfigError(f"attention: {slopes.numel()} ALiBi slopes for {h} heads")
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    sid = sequence_id
    if sid is not None and sid.shape[1] != tk:
        raise ConfigError(f"attention: sequence_id covers {sid.shape[1]} positions; expected {tk} (all keys)")
    out = _BlockwiseAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), slopes, float(softmax_scale), kpm, sid,
        int(block_q), int(block_k),
    )
    return out.transpose(1, 2)
