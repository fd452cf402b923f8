"""Exact ALiBi on PyTorch's fused CPU attention kernel, in O(T) memory, forward and backward.

PyTorch's CPU flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``) skips the masked half of
causal attention and keeps only the output and the log-sum-exp, but it takes no ALiBi. Two observations make
it compute ALiBi exactly anyway:

1. **ALiBi as one more head dimension.** For a query block and a constant ``c``, append ``slope / scale`` to
   every query and ``j - c`` to key ``j`` (and a zero to the values). The kernel's score becomes
   ``scale * q.k + slope * (j - c)``, which differs from MPT's ``-slope * (p - j)`` by a per-row constant that
   softmax removes. Choosing ``c`` inside the query block keeps the added term small for the keys that
   matter (near the diagonal), so fp32 rounding stays at the level of the scores themselves.
2. **Causal blocks merged by log-sum-exp.** Queries are cut into chunks of ``chunk`` rows. For chunk
   [q0, q1) (absolute positions, bottom-right aligned) the kernel runs twice: the keys before the chunk
   (no mask) and the chunk's own square (``is_causal``). The two partial outputs merge by their
   log-sum-exps. In backward, calling the kernel's backward on each part with the *merged* output and
   log-sum-exp yields exactly that part's share of dQ and its dK, dV (FlashAttention's backward needs only
   P = exp(S - LSE) and rowsum(dO * O), both global quantities).

Covers causal attention with ALiBi (or none), MHA/MQA/GQA and KV-cache offsets. Padding masks and packed
``sequence_id`` need a mask: :mod:`mptkit.model.attention` routes those elsewhere.
"""

from __future__ import annotations

import torch

CHUNK = 256


def _ops():
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


def available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16) and _ops() is not None


def _augment(q, k, v, slopes, scale, n_rep):
    """q' = [q, slope/scale], k' = [k, pos], v' = [v, 0]; kv heads repeated for the kernel.

    Each is one copy of the (possibly strided) input into a contiguous (B, H, T, D+1) buffer plus a strided
    fill of the extra column (no zero-fill of the whole buffer first)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qa = q.new_empty((b, h, tq, d + 1))
    qa[..., :d] = q
    if slopes is not None:
        qa[..., d] = (slopes.to(torch.float32) / scale).to(q.dtype).view(1, h, 1)
    else:
        qa[..., d] = 0
    ka = k.new_empty((b, hkv, tk, d + 1))
    ka[..., :d] = k
    ka[..., d] = 0  # filled per query chunk with (j - c)
    va = v.new_empty((b, hkv, tk, d + 1))
    va[..., :d] = v
    va[..., d] = 0
    if n_rep > 1:
        ka = ka[:, :, None].expand(b, hkv, n_rep, tk, d + 1).contiguous().view(b, h, tk, d + 1)
        va = va[:, :, None].expand(b, hkv, n_rep, tk, d + 1).contiguous().view(b, h, tk, d + 1)
    return qa, ka, va


def _plan(tq, tk, chunk):
    off = tk - tq
    for q0 in range(0, tq, chunk):
        q1 = min(tq, q0 + chunk)
        yield q0, q1, off + q0, off + q1  # query rows, absolute positions [a0, a1) of the chunk


def _forward_core(qa, ka, va, scale, chunk):
    """Kernel calls and log-sum-exp merges. Returns out (B, H, Tq, D+1), laid out as (B, Tq, H, D+1) in
    memory like the kernel's own output, and lse (B, H, Tq) fp32. Writes the position column of ``ka``."""
    fwd, _ = _ops()
    b, h, tq, d1 = qa.shape
    d = d1 - 1
    tk = ka.shape[2]
    pos = torch.arange(tk, device=qa.device, dtype=torch.float32)
    plan = list(_plan(tq, tk, chunk))
    if len(plan) == 1 and plan[0][2] == 0:  # one chunk, no keys before it: no merge, no extra buffers
        c = float(tk // 2)
        ka[..., d] = (pos - c).to(ka.dtype)
        out, lse = fwd(qa, ka, va, 0.0, True, scale=scale)
        return out, lse
    out = qa.new_empty((b, tq, h, d1)).transpose(1, 2)
    lse = torch.empty((b, h, tq), dtype=torch.float32, device=qa.device)
    for q0, q1, a0, a1 in plan:
        c = float(a0 + (a1 - a0) // 2)
        ka[..., :a1, d] = (pos[:a1] - c).to(ka.dtype)
        qc = qa[:, :, q0:q1]
        o2, l2 = fwd(qc, ka[:, :, a0:a1], va[:, :, a0:a1], 0.0, True, scale=scale)
        if a0 > 0:
            o1, l1 = fwd(qc, ka[:, :, :a0], va[:, :, :a0], 0.0, False, scale=scale)
            l1 = l1.float()
            l2 = l2.float()
            lm = torch.logaddexp(l1, l2)
            oc = out[:, :, q0:q1]
            torch.mul(o1, torch.exp(l1 - lm).unsqueeze(-1).to(o1.dtype), out=oc)
            oc.addcmul_(o2, torch.exp(l2 - lm).unsqueeze(-1).to(o2.dtype))
            lse[:, :, q0:q1] = lm
        else:
            out[:, :, q0:q1] = o2
            lse[:, :, q0:q1] = l2
    return out, lse


def _backward_core(doa, qa, ka, va, out, lse, scale, chunk):
    """Gradients (B, H, T, D) of the un-augmented q, k, v (kv heads still repeated) for output grad ``doa``
    (B, H, Tq, D+1, last column zero). Writes the position column of ``ka``."""
    _, bwd = _ops()
    b, h, tq, d1 = qa.shape
    d = d1 - 1
    tk = ka.shape[2]
    pos = torch.arange(tk, device=qa.device, dtype=torch.float32)
    plan = list(_plan(tq, tk, chunk))
    if len(plan) == 1 and plan[0][2] == 0:
        ka[..., d] = (pos - float(tk // 2)).to(ka.dtype)
        gq, gk, gv = bwd(doa, qa, ka, va, out, lse, 0.0, True, scale=scale)
        return gq[..., :d], gk[..., :d], gv[..., :d]
    dq = torch.empty((b, h, tq, d), dtype=torch.float32, device=qa.device)
    dk = torch.zeros((b, h, tk, d), dtype=torch.float32, device=qa.device)
    dv = torch.zeros((b, h, tk, d), dtype=torch.float32, device=qa.device)
    for q0, q1, a0, a1 in plan:
        c = float(a0 + (a1 - a0) // 2)
        ka[..., :a1, d] = (pos[:a1] - c).to(ka.dtype)
        qc = qa[:, :, q0:q1]
        oc = out[:, :, q0:q1]
        lc = lse[:, :, q0:q1]
        gc = doa[:, :, q0:q1]
        gq, gk, gv = bwd(gc, qc, ka[:, :, a0:a1], va[:, :, a0:a1], oc, lc, 0.0, True, scale=scale)
        dq[:, :, q0:q1] = gq[..., :d]
        dk[:, :, a0:a1] += gk[..., :d]
        dv[:, :, a0:a1] += gv[..., :d]
        if a0 > 0:
            gq, gk, gv = bwd(gc, qc, ka[:, :, :a0], va[:, :, :a0], oc, lc, 0.0, False, scale=scale)
            dq[:, :, q0:q1] += gq[..., :d]
            dk[:, :, :a0] += gk[..., :d]
            dv[:, :, :a0] += gv[..., :d]
    return dq, dk, dv


def _pad_last(x):
    """(…, D) -> (…, D+1) with a zero last column, keeping x's dim order in memory when it is dense."""
    y = x.new_empty((*x.shape[:-1], x.shape[-1] + 1))
    y[..., :-1] = x
    y[..., -1] = 0
    return y


class _SdpaAlibi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, chunk):
        b, h, tq, d = q.shape
        n_rep = h // k.shape[1]
        qa, ka, va = _augment(q, k, v, slopes, scale, n_rep)  # reads strided q/k/v: the only copy
        out, lse = _forward_core(qa, ka, va, scale, chunk)
        ctx.save_for_backward(qa, ka, va, out, lse)
        ctx.scale = scale
        ctx.chunk = chunk
        ctx.shape = (b, h, tq, d, k.shape[1], k.shape[2], q.dtype, k.dtype, v.dtype)
        return out[..., :d]

    @staticmethod
    def backward(ctx, dout):
        qa, ka, va, out, lse = ctx.saved_tensors
        b, h, _, d, hkv, tk, qdt, kdt, vdt = ctx.shape
        n_rep = h // hkv
        doa = _pad_last(dout.transpose(1, 2)).transpose(1, 2)  # (B, Tq, H, D+1) in memory, as ``out``
        dq, dk, dv = _backward_core(doa, qa, ka, va, out, lse, ctx.scale, ctx.chunk)
        if n_rep > 1:
            dk = dk.reshape(b, hkv, n_rep, tk, d).sum(2)
            dv = dv.reshape(b, hkv, n_rep, tk, d).sum(2)
        return dq.to(qdt), dk.to(kdt), dv.to(vdt), None, None, None


class _SdpaAlibiPacked(torch.autograd.Function):
    """The same attention from the fused projection: ``qkv`` (B, T, (H + 2 Hkv) D) in, (B, T, H D) out.

    Reads q, k, v straight from ``qkv`` into the kernel's buffers and writes dq, dk, dv straight into one
    (B, T, (H + 2 Hkv) D) gradient: no per-tensor transpose/reshape copies and no concatenation of the
    three gradients in backward (what autograd does for split + view + transpose)."""

    @staticmethod
    def forward(ctx, qkv, slopes, scale, chunk, n_heads, kv_heads):
        b, t, width = qkv.shape
        d = width // (n_heads + 2 * kv_heads)
        q, k, v = qkv.split([n_heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.view(b, t, n_heads, d).transpose(1, 2)
        k = k.view(b, t, kv_heads, d).transpose(1, 2)
        v = v.view(b, t, kv_heads, d).transpose(1, 2)
        qa, ka, va = _augment(q, k, v, slopes, scale, n_heads // kv_heads)
        out, lse = _forward_core(qa, ka, va, scale, chunk)
        ctx.save_for_backward(qa, ka, va, out, lse)
        ctx.scale = scale
        ctx.chunk = chunk
        ctx.dims = (n_heads, kv_heads, d, qkv.dtype)
        return out[..., :d].transpose(1, 2).reshape(b, t, n_heads * d)

    @staticmethod
    def backward(ctx, dout):
        qa, ka, va, out, lse = ctx.saved_tensors
        h, hkv, d, dt = ctx.dims
        b, t = dout.shape[:2]
        doa = _pad_last(dout.reshape(b, t, h, d)).transpose(1, 2)
        dq, dk, dv = _backward_core(doa, qa, ka, va, out, lse, ctx.scale, ctx.chunk)
        n_rep = h // hkv
        if n_rep > 1:
            dk = dk.reshape(b, hkv, n_rep, t, d).sum(2)
            dv = dv.reshape(b, hkv, n_rep, t, d).sum(2)
        g = dout.new_empty((b, t, (h + 2 * hkv) * d), dtype=dt)
        g[..., : h * d].view(b, t, h, d).copy_(dq.transpose(1, 2))
        g[..., h * d : (h + hkv) * d].view(b, t, hkv, d).copy_(dk.transpose(1, 2))
        g[..., (h + hkv) * d :].view(b, t, hkv, d).copy_(dv.transpose(1, 2))
        return g, None, None, None, None, None


def sdpa_alibi_attention(q, k, v, *, slopes, softmax_scale, chunk: int = CHUNK):
    """Causal (bottom-right aligned) ALiBi attention on the CPU flash kernel; returns (B, Tq, H, D)."""
    out = _SdpaAlibi.apply(q, k, v, slopes, float(softmax_scale), int(chunk))
    return out.transpose(1, 2)


def sdpa_alibi_attention_packed(qkv, *, n_heads, kv_heads, slopes, softmax_scale, chunk: int = CHUNK):
    """Causal self-attention (no cache) from the fused projection ``qkv`` (B, T, (H + 2 Hkv) D), rows
    Q | K | V as MPT's Wqkv; returns (B, T, H D), ready for ``out_proj``."""
    return _SdpaAlibiPacked.apply(qkv, slopes, float(softmax_scale), int(chunk), int(n_heads), int(kv_heads))
