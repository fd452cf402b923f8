"""Attention over a :class:`~mptkit.infer.cache.KVCache`'s slots: the maths the cache's layer hook ``attend``
runs, and the batch-1 decode step the fast decoder calls.

One :class:`CacheAttention` belongs to each cache (``cache.attention``) and reads its storage and its mode:

* prefill (one slot, batch 1; chunked prefill sees the slot's cached keys plus itself, causally) and packed
  prefill (several slots' chunks in one row, each against its own slot): :func:`mptkit.model.attention.attention`
  with the model's own attention backend (the ``impl`` its attention modules pass, resolved per call). A chunk
  after ``DecodeOptions.skip_min_past`` cached tokens leaves out, one head at a time, the far keys an ALiBi head
  provably gives weight 0 (:meth:`CacheAttention.prefill_skipping`).
* decode (one new token per slot, slots of different lengths): keys read in place, query heads sharing a kv
  head batched as rows of one bmm (GQA/MQA need no repeated keys), the ALiBi/causal bias of the step computed
  once and shared by every layer (at batch 1 a view of a precomputed ramp).
"""

from __future__ import annotations

import torch

from mptkit.model.attention import attention


class CacheAttention:
    """The attention maths over one cache's storage, with the step's bias tables."""

    def __init__(self, cache):
        self.cache = cache
        self._ramp = None  # (H, 1, capacity) ALiBi ramp, for the cache's current capacity and slopes
        self._bias = (
            None  # this decode step's bias: (H, 1, tk) at n == 1, (n, H, 1, tk) else (made on first use)
        )
        self._n = 0
        self._tk = 0

    def invalidate(self) -> None:
        """The cache grew or its slopes changed: the ramp is made again on next use."""
        self._ramp = None

    def _alibi_ramp(self) -> torch.Tensor:
        """(H, 1, capacity): slope_h * (j - (capacity-1)); the last L columns are a decode row for length L."""
        c = self.cache
        if self._ramp is None:
            j = torch.arange(-(c.capacity - 1), 1, device=c.device, dtype=torch.float32)
            self._ramp = (c.slopes[:, None, None] * j[None, None, :]).to(c.compute_dtype)
        return self._ramp

    def begin_decode(self, n: int, tk: int) -> None:
        """A decode step of ``n`` slots reading ``tk`` keys at most starts (called by ``cache.begin_decode``)."""
        self._n, self._tk = n, tk
        if n == 1 and self.cache.slopes is not None:
            self._bias = self._alibi_ramp()[:, :, self.cache.capacity - tk :]  # (H, 1, tk), a view
        else:
            self._bias = None  # n > 1: made on first use (_decode_bias); the fused kernels need none

    def _decode_bias(self) -> None:
        """For a batched (n > 1) decode step on the torch path: the ALiBi/causal bias of every slot (computed
        once per step, shared by all layers)."""
        if self._bias is not None:
            return
        c = self.cache
        n, tk = self._n, self._tk
        c.decode_rows()
        pos = c._pos
        kpos = torch.arange(tk, device=c.device)
        rel = (kpos[None, :] - pos[:, None]).to(torch.float32)  # (n, tk), <= 0 where visible
        allowed = rel <= 0
        if c.slopes is not None:
            bias = c.slopes[None, :, None, None] * rel[:, None, None, :]
        else:
            bias = torch.zeros((n, c.n_heads, 1, tk), device=c.device)
        self._bias = bias.masked_fill(~allowed[:, None, None, :], torch.finfo(torch.float32).min).to(
            c.compute_dtype
        )

    # ------------------------------------------------------------------ batch-1 decode (the fast decoder)
    def decode1(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float
    ) -> torch.Tensor:
        """Batch-1 decode of layer ``i`` in one call: write the new key/value row at the slot's position and
        attend over the slot's keys, on 2-D rows. ``q`` (1, H*D), ``k``/``v`` (1, Hkv*D) -> (1, H*D).

        The same arithmetic as the layer hooks ``update`` + ``attend`` at n=1 (bmm rows per kv head, the ALiBi
        row from the ramp), without the (B, H, T, D) views in between."""
        c = self.cache
        tk = c.seq_len + 1
        hkv, d = c.kv_heads, c.head_dim
        rep = c.n_heads // hkv
        kc, vc = c.write_row1(i, k, v)
        qq = q.view(hkv, rep, d)
        kk = kc.narrow(1, 0, tk).to(q.dtype)
        if self._bias is None:
            s = torch.bmm(qq, kk.transpose(1, 2)) * softmax_scale
        else:
            s = torch.baddbmm(self._bias.view(hkv, rep, tk), qq, kk.transpose(1, 2), alpha=softmax_scale)
        pr = (
            torch.softmax(s.float(), dim=-1).to(v.dtype)
            if s.dtype != torch.float32
            else torch.softmax(s, dim=-1)
        )
        return torch.bmm(pr, vc.narrow(1, 0, tk).to(pr.dtype)).view(1, hkv * rep * d)

    # ------------------------------------------------------------------ prefill
    def prefill_skipping(
        self, q, k, v, slopes, softmax_scale: float, layer: int, impl: str = "auto", options=None
    ):
        """A prefill chunk's attention with the far keys its ALiBi heads provably give weight 0 left out, one
        head at a time (each head its own key range), or None when no head can leave any out.

        Row i of the chunk (position ``start + i``) weighs key j by exp(s_ij - max_i) with s_ij - max_i <=
        2 * scale * |q_i| * kmax - slope * (start + i - j) (kmax: the slot's key-norm bound, the chunk's keys
        included). Keys with slope * (start - j) above 2 * scale * max_i |q_i| * kmax + 110 get weights below
        exp(-110), zero in fp32 (under the smallest denormal), for every row: leaving them out changes the
        result only by the summation order of the attention's blocks (float rounding). ALiBi biases are
        relative, so the remaining keys keep theirs."""
        c = self.cache
        start = c.lengths[c._slot]
        if start < c.options.skip_min_past:
            return None
        h, hkv = q.shape[1], k.shape[1]
        rep = h // hkv
        with torch.no_grad():
            qn = q[0].float().norm(dim=-1).amax(dim=-1)  # (H,)
            km = c.kmax[layer][c._slot].float().repeat_interleave(rep)  # (H,)
            reach = (2.0 * abs(float(softmax_scale)) * qn * km * (1 + 1e-5) + 110.0) / slopes.float()
            cut = (start - torch.ceil(reach) - 1).clamp(min=0).long()
        cuts = [int(x) // 64 * 64 for x in cut.tolist()]  # key slices starting 64-row aligned
        if not any(cuts):
            return None
        outs = []
        for i, cc in enumerate(cuts):
            g = i // rep
            outs.append(
                attention(
                    q[:, i : i + 1],
                    k[:, g : g + 1, cc:],
                    v[:, g : g + 1, cc:],
                    slopes=slopes[i : i + 1],
                    softmax_scale=softmax_scale,
                    impl=impl,
                    options=options,
                )
            )
        return torch.cat(outs, dim=2)  # (1, t, H, D)

    # ------------------------------------------------------------------ the layer hook
    def attend(self, layer: int, q, k, v, *, slopes, softmax_scale, impl: str = "auto", options=None):
        """Layer ``layer``'s attention in the cache's current mode; ``impl``/``options``: the model's attention
        backend and fast-path options (prefill). q (B, H, Tq, D), k/v as the layer hook ``update`` returned
        them -> (B, Tq, H, D)."""
        c = self.cache
        if k.dtype != q.dtype:  # a cache stored in a narrower type (kv_dtype): attention computes in q's
            k, v = k.to(q.dtype), v.to(q.dtype)
        mode = c._mode
        if mode == "prefill":
            if slopes is not None and c.skip_far_keys and c._kmax_valid:
                out = self.prefill_skipping(q, k, v, slopes, softmax_scale, layer, impl, options)
                if out is not None:
                    return out
            return attention(q, k, v, slopes=slopes, softmax_scale=softmax_scale, impl=impl, options=options)
        if mode == "prefill_packed":
            outs, off = [], 0
            for s, t in c._segs:
                end = c.lengths[s] + t
                ks, vs = c.k[layer][s : s + 1, :, :end], c.v[layer][s : s + 1, :, :end]
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
                outs.append(
                    attention(
                        q[:, :, off : off + t],
                        ks,
                        vs,
                        slopes=slopes,
                        softmax_scale=softmax_scale,
                        impl=impl,
                        options=options,
                    )
                )
                off += t
            return torch.cat(outs, dim=1)  # (1, sum t, H, D)
        # decode: q (n, H, 1, D), k/v (n, Hkv, tk, D) read in place. Query heads sharing a kv head are
        # batched as rows of one bmm, so GQA/MQA need no repeated keys; the bias is shared by all layers.
        n, h, _, d = q.shape
        if n > 1:
            self._decode_bias()
        hkv, tk = k.shape[1], k.shape[2]
        rep = h // hkv
        qq = q.reshape(n * hkv, rep, d)
        kk = k.reshape(n * hkv, tk, d)
        vv = v.reshape(n * hkv, tk, d)
        if self._bias is None:
            s = torch.bmm(qq, kk.transpose(1, 2)) * softmax_scale
        else:
            s = torch.baddbmm(self._bias.reshape(-1, rep, tk), qq, kk.transpose(1, 2), alpha=softmax_scale)
        p = (
            torch.softmax(s.float(), dim=-1).to(v.dtype)
            if s.dtype != torch.float32
            else torch.softmax(s, dim=-1)
        )
        out = torch.bmm(p, vv)  # (n*hkv, rep, d)
        return out.view(n, h, 1, d).transpose(1, 2)


__all__ = ["CacheAttention"]
