"""A pre-allocated KV cache with per-sequence lengths ("slots").

One :class:`KVCache` holds, for every layer, key and value tensors of shape
``(slots, kv_heads, capacity, head_dim)``. Each slot is one sequence with its own length, so sequences of
different lengths share one batch without padding: ALiBi depends only on the distance between a query
and a key, and each slot's bias is computed from its own length (per-sequence positions). This is what
batched generation and continuous batching (requests joining and leaving between decode steps) need.

The cache talks to the model through the KV-cache protocol of :mod:`mptkit.model.attention`:
``seq_len``, ``layer(i)`` -> a layer cache with ``update(k, v)`` and ``attend(q, k, v, ...)``, and
``advance(t)``. Two modes, chosen before each forward pass:

* ``begin_prefill(slot, t)``: ``t`` tokens of one slot (batch 1). Chunked prefill works: the new queries
  see the slot's cached keys plus themselves, causally.
* ``begin_decode(n)``: one new token for each of slots ``0..n-1`` (batch ``n``); a slot that is idle in
  this step gets a dummy token whose result the caller ignores (``active`` marks the real ones, only
  those advance). Keys are read in place (no gather), the ALiBi bias row is computed once per step and
  shared by every layer.

Capacity grows (the tensors are re-allocated, doubling) up to ``max_context``. A model with learned
position embeddings cannot go past its table (``max_seq_len``); an ALiBi model can, up to the
configured context.
"""

from __future__ import annotations

import logging
import math

import torch

from mptkit.errors import InferenceError
from mptkit.model.attention import attention

log = logging.getLogger(__name__)


def context_limit(config, max_context: int | None) -> int:
    """The longest sequence (prompt + generated) this model may run to.

    ALiBi models: ``max_context`` if given (any length), else ``max_seq_len``. Models with learned
    position embeddings: at most ``max_seq_len``; asking for more is an error."""
    if config.use_learned_pos_emb:
        if max_context is not None and max_context > config.max_seq_len:
            raise InferenceError(
                f"max context {max_context} exceeds this model's max_seq_len={config.max_seq_len}: it uses "
                "learned position embeddings, which have no entry past their table (ALiBi models have no "
                "such limit)"
            )
        return max_context or config.max_seq_len
    if max_context is not None and max_context < 1:
        raise InferenceError(f"max context must be positive, got {max_context}")
    return max_context or config.max_seq_len


class _LayerCache:
    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int):
        self.cache = cache
        self.i = i

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.cache._update(self.i, k, v)

    def attend(self, q, k, v, *, slopes, softmax_scale):
        return self.cache._attend(q, k, v, slopes=slopes, softmax_scale=softmax_scale, layer=self.i)


class KVCache:
    """Per-layer K/V tensors ``(slots, kv_heads, capacity, head_dim)`` with a length per slot."""

    def __init__(
        self,
        config,
        *,
        slots: int = 1,
        capacity: int | None = None,
        max_context: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
    ):
        self.config = config
        self.n_layers = config.n_layers
        self.kv_heads = config.kv_n_heads
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.max_context = context_limit(config, max_context)
        self.slots = slots
        self.dtype = dtype  # storage of K/V
        self.compute_dtype = compute_dtype or dtype  # what attention computes in (K/V read back to it)
        self.device = torch.device(device)
        cap = capacity if capacity is not None else min(self.max_context, 256)
        self.capacity = max(1, min(cap, self.max_context))
        self.k = [self._alloc(self.capacity) for _ in range(self.n_layers)]
        self.v = [self._alloc(self.capacity) for _ in range(self.n_layers)]
        # per layer, (slots, kv_heads): a bound on the norm of every key stored (as stored: fp16 rounded), raised
        # by every write, zeroed with the slot. The compiled decode attention proves from it which far keys an
        # ALiBi head gives weight exactly 0 and does not read them (same result, bitwise).
        self.kmax = [torch.zeros((slots, self.kv_heads), dtype=torch.float32, device=self.device)
                     for _ in range(self.n_layers)]
        self.skip_far_keys = True  # False: every key is read (benchmarks compare); the bounds then go stale
        self._kmax_valid = True
        self.lengths = [0] * slots  # tokens cached per slot (python ints: no device sync)
        self._layers = [_LayerCache(self, i) for i in range(self.n_layers)]
        self._slopes = None
        self._ramp = None
        # per-forward state
        self._mode = None
        self._slot = 0
        self._t = 0
        self._n = 0
        self._active: list[bool] | None = None
        self._pos = None
        self._bias = None
        self.seq_len = 0

    # ------------------------------------------------------------------ storage
    def _alloc(self, cap: int) -> torch.Tensor:
        return torch.zeros((self.slots, self.kv_heads, cap, self.head_dim), dtype=self.dtype, device=self.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def ensure_capacity(self, needed: int) -> None:
        """Make room for ``needed`` tokens in every slot (re-allocating, doubling, up to max_context)."""
        if needed > self.max_context:
            raise InferenceError(
                f"sequence of {needed} tokens exceeds the context limit of {self.max_context} tokens"
            )
        if needed <= self.capacity:
            return
        new_cap = min(self.max_context, max(needed, 2 * self.capacity))
        log.debug("KV cache grows from %d to %d tokens", self.capacity, new_cap)
        for i in range(self.n_layers):
            for store in (self.k, self.v):
                t = self._alloc(new_cap)
                t[:, :, : self.capacity].copy_(store[i])
                store[i] = t
        self.capacity = new_cap
        self._ramp = None

    # The bounds may have been made inside torch.inference_mode (a cache built in a caller's inference context)
    # and be updated outside it, or the reverse: updates run in inference mode, where an in-place write is
    # allowed on both inference and normal tensors.
    def reset_slot(self, slot: int) -> None:
        self.lengths[slot] = 0
        with torch.inference_mode():
            for km in self.kmax:
                km[slot] = 0.0

    def reset(self) -> None:
        self.lengths = [0] * self.slots
        with torch.inference_mode():
            for km in self.kmax:
                km.zero_()

    def _raise_kmax(self, i: int, slots, rows: torch.Tensor) -> None:
        """Raise layer ``i``'s key-norm bound of ``slots`` (an index or slice) by the stored keys ``rows``
        (..., Hkv, t, D) of those slots."""
        if rows.shape[-2] == 0:
            return
        with torch.inference_mode():
            norms = rows.float().norm(dim=-1).amax(dim=-1)  # (..., Hkv)
            km = self.kmax[i]
            km[slots] = torch.maximum(km[slots], norms.reshape(km[slots].shape))

    def free_slots(self) -> list[int]:
        return [i for i, n in enumerate(self.lengths) if n == 0]

    # ------------------------------------------------------------------ modes
    def set_slopes(self, slopes: torch.Tensor | None) -> None:
        self._slopes = None if slopes is None else slopes.to(device=self.device, dtype=torch.float32)
        self._ramp = None

    def _alibi_ramp(self) -> torch.Tensor:
        """(H, 1, capacity): slope_h * (j - (capacity-1)); the last L columns are a decode row for length L."""
        if self._ramp is None:
            j = torch.arange(-(self.capacity - 1), 1, device=self.device, dtype=torch.float32)
            self._ramp = (self._slopes[:, None, None] * j[None, None, :]).to(self.compute_dtype)
        return self._ramp

    def begin_prefill(self, slot: int, t: int) -> None:
        """The next forward pass feeds ``t`` tokens of ``slot`` (batch 1)."""
        self.ensure_capacity(self.lengths[slot] + t)
        self._mode = "prefill"
        self._slot = slot
        self._t = t
        self.seq_len = self.lengths[slot]

    def begin_prefill_packed(self, segments: list[tuple[int, int]]) -> None:
        """The next forward pass feeds the prompt chunks of several slots concatenated into one row (batch 1):
        ``segments`` = [(slot, t), ...] in order, distinct slots. Each chunk attends to its own slot's cached
        keys and itself, causally; the linear layers run once over all of them (one GEMM at M = sum t instead
        of one per prompt). For models without position embeddings (ALiBi or none): the model sees no
        "past" (``seq_len`` 0), positions are each slot's own."""
        slots = [s for s, _ in segments]
        if len(set(slots)) != len(slots) or any(t < 1 for _, t in segments):
            raise InferenceError(f"packed prefill needs distinct slots and non-empty chunks, got {segments}")
        for s, t in segments:
            self.ensure_capacity(self.lengths[s] + t)
        self._mode = "prefill_packed"
        self._segs = list(segments)
        self.seq_len = 0

    def begin_decode(self, n: int, active: list[bool] | None = None) -> None:
        """The next forward pass feeds one token to each of slots ``0..n-1``; only ``active`` slots advance."""
        lens = self.lengths[:n]
        act = active if active is not None else [True] * n
        top = max(ln for ln, a in zip(lens, act) if a) if any(act) else 0
        # idle slots get a dummy write at their own length: room for every slot's next position
        self.ensure_capacity(max(lens) + 1)
        self._mode = "decode"
        self._n = n
        self._active = act
        self._pos_t = None  # int64 lengths for the fused kernel, made on first use in this step
        tk = top + 1
        self.seq_len = top  # what the model sees as "past" (positions for learned embeddings use a mask)
        if n == 1:
            self._pos = None
            if self._slopes is not None:
                self._bias = self._alibi_ramp()[:, :, self.capacity - tk :]  # (H, 1, tk), a view
            else:
                self._bias = None
            return
        # the row indices and the (n, H, 1, tk) bias of the batched-matmul path are made on first use
        # (_decode_tables): the fused kernels need neither
        self._pos = self._rows = self._bias = None
        self._tk = tk

    def _decode_tables(self) -> None:
        """For a batched (n > 1) decode step on the torch path: where each slot's new K/V row goes, and the
        ALiBi/causal bias of every slot (computed once per step, shared by all layers)."""
        if self._rows is not None:
            return
        n, tk = self._n, self._tk
        pos = torch.tensor(self.lengths[:n], device=self.device)
        self._pos = pos
        # rows of the (slots*Hkv*capacity, D) view of a layer's K/V where each slot's new key/value goes
        self._rows = ((torch.arange(n, device=self.device)[:, None] * self.kv_heads
                       + torch.arange(self.kv_heads, device=self.device)[None]) * self.capacity
                      + pos[:, None]).reshape(-1)
        kpos = torch.arange(tk, device=self.device)
        rel = (kpos[None, :] - pos[:, None]).to(torch.float32)  # (n, tk), <= 0 where visible
        allowed = rel <= 0
        if self._slopes is not None:
            bias = self._slopes[None, :, None, None] * rel[:, None, None, :]
        else:
            bias = torch.zeros((n, self.n_heads, 1, tk), device=self.device)
        self._bias = bias.masked_fill(~allowed[:, None, None, :], torch.finfo(torch.float32).min).to(
            self.compute_dtype)

    def decode_attention_mask(self) -> torch.Tensor:
        """For learned-position models in a multi-slot decode: an (n, past+1) mask whose cumulative sum gives
        each slot's own position to ``MPTModel`` (which derives positions from the mask)."""
        n, past = self._n, self.seq_len
        lens = torch.tensor(self.lengths[:n], device=self.device)
        m = torch.arange(past + 1, device=self.device)[None, :] < lens[:, None]
        m[:, -1] = True
        return m.long()

    # ------------------------------------------------------------------ protocol
    def layer(self, i: int) -> _LayerCache:
        return self._layers[i]

    def advance(self, t: int) -> None:
        if self._mode == "prefill":
            self.lengths[self._slot] += t
        elif self._mode == "prefill_packed":
            for s, n in self._segs:
                self.lengths[s] += n
        elif self._mode == "decode":
            for s in range(self._n):
                if self._active[s]:
                    self.lengths[s] += 1
        self._mode = None

    def _update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self._mode == "prefill":
            s, start, t = self._slot, self.lengths[self._slot], self._t
            self.k[i][s : s + 1, :, start : start + t].copy_(k)
            self.v[i][s : s + 1, :, start : start + t].copy_(v)
            self._raise_kmax(i, s, self.k[i][s, :, start : start + t])
            return self.k[i][s : s + 1, :, : start + t], self.v[i][s : s + 1, :, : start + t]
        if self._mode == "prefill_packed":  # k/v (1, Hkv, sum t, D): each chunk into its slot
            off = 0
            for s, t in self._segs:
                start = self.lengths[s]
                self.k[i][s : s + 1, :, start : start + t].copy_(k[:, :, off : off + t])
                self.v[i][s : s + 1, :, start : start + t].copy_(v[:, :, off : off + t])
                self._raise_kmax(i, s, self.k[i][s, :, start : start + t])
                off += t
            return k, v  # _attend reads each slot's keys from the cache
        if self._mode == "decode":
            n, tk = self._n, self.seq_len + 1
            if n == 1:
                p = self.lengths[0]
                self.k[i][0:1, :, p : p + 1].copy_(k)
                self.v[i][0:1, :, p : p + 1].copy_(v)
            else:
                d = self.head_dim
                self._decode_tables()
                self.k[i].view(-1, d).index_copy_(0, self._rows, k.reshape(-1, d).to(self.dtype))
                self.v[i].view(-1, d).index_copy_(0, self._rows, v.reshape(-1, d).to(self.dtype))
            self._raise_kmax(i, slice(0, n), k.to(self.dtype))
            return self.k[i][:n, :, :tk], self.v[i][:n, :, :tk]
        raise InferenceError("KVCache used without begin_prefill()/begin_decode()")

    def decode1(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
        """Batch-1 decode of layer ``i`` in one call: write the new key/value row at the slot's position and
        attend over the slot's keys, on 2-D rows. ``q`` (1, H*D), ``k``/``v`` (1, Hkv*D) -> (1, H*D).

        The same arithmetic as ``_update`` + ``_attend`` at n=1 (bmm rows per kv head, the ALiBi row from the
        ramp), without the (B, H, T, D) views in between."""
        p, tk = self.lengths[0], self.seq_len + 1
        hkv, d = self.kv_heads, self.head_dim
        rep = self.n_heads // hkv
        kc = self.k[i][0]  # (Hkv, capacity, D)
        vc = self.v[i][0]
        kc.select(1, p).copy_(k.view(hkv, d))
        vc.select(1, p).copy_(v.view(hkv, d))
        self._raise_kmax(i, 0, kc.select(1, p)[:, None])
        qq = q.view(hkv, rep, d)
        kk = kc.narrow(1, 0, tk).to(q.dtype)
        if self._bias is None:
            s = torch.bmm(qq, kk.transpose(1, 2)) * softmax_scale
        else:
            s = torch.baddbmm(self._bias.view(hkv, rep, tk), qq, kk.transpose(1, 2), alpha=softmax_scale)
        pr = torch.softmax(s.float(), dim=-1).to(v.dtype) if s.dtype != torch.float32 else torch.softmax(s, dim=-1)
        return torch.bmm(pr, vc.narrow(1, 0, tk).to(pr.dtype)).view(1, hkv * rep * d)

    SKIP_MIN_PAST = 2048  # prefill chunks after this many cached tokens look for keys to skip

    def _prefill_skipping(self, q, k, v, slopes, softmax_scale: float, layer: int):
        """A prefill chunk's attention with the far keys its ALiBi heads provably give weight 0 left out, one
        head at a time (each head its own key range), or None when no head can leave any out.

        Row i of the chunk (position ``start + i``) weighs key j by exp(s_ij - max_i) with s_ij - max_i <=
        2 * scale * |q_i| * kmax - slope * (start + i - j) (kmax: the slot's key-norm bound, the chunk's keys
        included). Keys with slope * (start - j) above 2 * scale * max_i |q_i| * kmax + 110 get weights below
        exp(-110), zero in fp32 (under the smallest denormal), for every row: leaving them out changes the
        result only by the summation order of the attention's blocks (float rounding). ALiBi biases are
        relative, so the remaining keys keep theirs."""
        start = self.lengths[self._slot]
        if start < self.SKIP_MIN_PAST:
            return None
        h, hkv = q.shape[1], k.shape[1]
        rep = h // hkv
        with torch.no_grad():
            qn = q[0].float().norm(dim=-1).amax(dim=-1)  # (H,)
            km = self.kmax[layer][self._slot].float().repeat_interleave(rep)  # (H,)
            reach = (2.0 * abs(float(softmax_scale)) * qn * km * (1 + 1e-5) + 110.0) / slopes.float()
            cut = (start - torch.ceil(reach) - 1).clamp(min=0).long()
        cuts = [int(c) // 64 * 64 for c in cut.tolist()]  # key slices starting 64-row aligned
        if not any(cuts):
            return None
        outs = []
        for i, c in enumerate(cuts):
            g = i // rep
            outs.append(attention(q[:, i : i + 1], k[:, g : g + 1, c:], v[:, g : g + 1, c:], slopes=slopes[i : i + 1],
                                  softmax_scale=softmax_scale, impl="sdpa"))
        return torch.cat(outs, dim=2)  # (1, t, H, D)

    def fused_ok(self, kernels) -> bool:
        """Whether :meth:`decode_fused` / :meth:`fused_block` may run with ``kernels``: a CPU cache in decode
        mode computing in fp32, stored in fp32 (or fp16 where the kernels convert it)."""
        return (self._mode == "decode" and self.device.type == "cpu" and self.compute_dtype == torch.float32
                and (self.dtype == torch.float32 or (self.dtype == torch.float16 and kernels.has_f16)))

    def decode_fused(self, i: int, q, k, v, softmax_scale: float, kernels) -> torch.Tensor:
        """Decode step of layer ``i`` for all ``n`` slots through the compiled kernel
        (``mptkit.infer.kernels``): write each slot's new key/value row at its length, attend over its keys
        (ALiBi from the slot's own position). ``q`` (n, H*D), ``k``/``v`` (n, Hkv*D) -> (n, H*D). Same result
        as ``_update`` + ``_attend`` to float rounding for the active slots; idle slots are neither written
        nor read (their output rows are zero)."""
        pos, top = self.fused_positions()
        km = self._kmax_arg()
        return kernels.decode_attention(q, k, v, self.k[i], self.v[i], pos, top, self._slopes, softmax_scale,
                                        km and km[i])

    def _kmax_arg(self) -> list[torch.Tensor] | None:
        """The key-norm bounds for the compiled kernels, or None: skipping switched off (the kernels then do
        not raise the bounds, so they stay off for this cache)."""
        if not self.skip_far_keys:
            self._kmax_valid = False
        return self.kmax if self._kmax_valid else None

    def fused_positions(self) -> tuple[torch.Tensor, int]:
        """For the fused kernels in this decode step: each slot's length as an int64 tensor, and max + 1."""
        if self._pos_t is None:  # once per step, shared by all layers
            n = self._n
            act = self._active or [True] * n
            # idle slots: -1 (the kernel neither writes nor attends there; a free slot may still hold the
            # keys/values of its last sequence for reuse, of any length)
            pos = [ln if a else -1 for ln, a in zip(self.lengths[:n], act)]
            self._pos_t = torch.tensor(pos, dtype=torch.int64)
            self._pos_top = max(max(pos), 0) + 1
        return self._pos_t, self._pos_top

    def fused_block(self, i: int, x: torch.Tensor, weights, kernels) -> None:
        """Layer ``i``'s whole block on ``x`` (n, d) in place, cache write included
        (``CpuKernels.decode_block``)."""
        pos, top = self.fused_positions()
        km = self._kmax_arg()
        kernels.decode_block(x, weights, self.k[i], self.v[i], pos, top, self._slopes, km and km[i])

    def fused_layers(self, x: torch.Tensor, stack, kernels) -> None:
        """Every layer's block on ``x`` (n, d) in place, in one call (``CpuKernels.decode_layers``)."""
        pos, top = self.fused_positions()
        kernels.decode_layers(x, stack, self.k, self.v, pos, top, self._slopes, self._kmax_arg())

    def _attend(self, q, k, v, *, slopes, softmax_scale, layer: int | None = None):
        if k.dtype != q.dtype:  # a cache stored in a narrower type (kv_dtype): attention computes in q's
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self._mode == "prefill":
            if slopes is not None and layer is not None and self.skip_far_keys and self._kmax_valid:
                out = self._prefill_skipping(q, k, v, slopes, softmax_scale, layer)
                if out is not None:
                    return out
            return attention(q, k, v, slopes=slopes, softmax_scale=softmax_scale, impl="sdpa")
        if self._mode == "prefill_packed":
            outs, off = [], 0
            for s, t in self._segs:
                end = self.lengths[s] + t
                ks, vs = self.k[layer][s : s + 1, :, :end], self.v[layer][s : s + 1, :, :end]
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
                outs.append(attention(q[:, :, off : off + t], ks, vs, slopes=slopes, softmax_scale=softmax_scale,
                                      impl="sdpa"))
                off += t
            return torch.cat(outs, dim=1)  # (1, sum t, H, D)
        # decode: q (n, H, 1, D), k/v (n, Hkv, tk, D) read in place. Query heads sharing a kv head are
        # batched as rows of one bmm, so GQA/MQA need no repeated keys; the bias is shared by all layers.
        n, h, _, d = q.shape
        if n > 1:
            self._decode_tables()
        hkv, tk = k.shape[1], k.shape[2]
        rep = h // hkv
        qq = q.reshape(n * hkv, rep, d)
        kk = k.reshape(n * hkv, tk, d)
        vv = v.reshape(n * hkv, tk, d)
        if self._bias is None:
            s = torch.bmm(qq, kk.transpose(1, 2)) * softmax_scale
        else:
            s = torch.baddbmm(self._bias.reshape(-1, rep, tk), qq, kk.transpose(1, 2), alpha=softmax_scale)
        p = torch.softmax(s.float(), dim=-1).to(v.dtype) if s.dtype != torch.float32 else torch.softmax(s, dim=-1)
        out = torch.bmm(p, vv)  # (n*hkv, rep, d)
        return out.view(n, h, 1, d).transpose(1, 2)


def cache_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """K and V bytes one token occupies across all layers."""
    es = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.kv_n_heads * config.head_dim * es


def round_capacity(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)
