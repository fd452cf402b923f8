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
  those advance).

The cache holds storage and its modes; the attention over it (prefill with the model's own backend and
far-key skipping, batched decode reading keys in place with the step's ALiBi bias) is
:class:`~mptkit.infer.cache_attention.CacheAttention` (``cache.attention``), and the glue to the compiled
kernels is in :mod:`mptkit.infer.decode`. ``options`` (:class:`~mptkit.infer.options.DecodeOptions`) holds
the decode knobs the attention reads (``skip_min_past``).

Capacity grows (the tensors are re-allocated, doubling) up to ``max_context``. A model with learned
position embeddings cannot go past its table (``max_seq_len``); an ALiBi model can, up to the
configured context.
"""

from __future__ import annotations

import logging
import math

import torch

from mptkit.errors import InferenceError
from mptkit.infer.cache_attention import CacheAttention
from mptkit.infer.options import DecodeOptions

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

    def attend(self, q, k, v, *, slopes, softmax_scale, impl: str = "auto", options=None):
        return self.cache.attention.attend(self.i, q, k, v, slopes=slopes, softmax_scale=softmax_scale, impl=impl,
                                           options=options)


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
        options: DecodeOptions | None = None,
    ):
        self.config = config
        self.options = options or DecodeOptions()
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
        self.slopes: torch.Tensor | None = None  # (H,) fp32 ALiBi slopes, or None
        # the attention over this cache's slots (its maths and per-step tables): mptkit.infer.cache_attention
        self.attention = CacheAttention(self)
        # per-forward state
        self._mode = None
        self._slot = 0
        self._t = 0
        self._n = 0
        self._active: list[bool] | None = None
        self._pos = None
        self._rows = None
        self._pos_t = None
        self._pos_top = 0
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
        self.attention.invalidate()

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
        self.slopes = None if slopes is None else slopes.to(device=self.device, dtype=torch.float32)
        self.attention.invalidate()

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
        # the row indices (and the attention's bias) of the batched path are made on first use: the fused
        # kernels need neither
        self._pos = self._rows = None
        self._tk = tk
        self.attention.begin_decode(n, tk)

    def decode_rows(self) -> torch.Tensor:
        """For a batched (n > 1) decode step on the torch path: each slot's length (``self._pos``, a tensor) and
        where each slot's new K/V row goes (once per step, shared by all layers)."""
        if self._rows is None:
            n = self._n
            pos = torch.tensor(self.lengths[:n], device=self.device)
            self._pos = pos
            # rows of the (slots*Hkv*capacity, D) view of a layer's K/V where each slot's new key/value goes
            self._rows = ((torch.arange(n, device=self.device)[:, None] * self.kv_heads
                           + torch.arange(self.kv_heads, device=self.device)[None]) * self.capacity
                          + pos[:, None]).reshape(-1)
        return self._rows

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
                rows = self.decode_rows()
                self.k[i].view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(self.dtype))
                self.v[i].view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(self.dtype))
            self._raise_kmax(i, slice(0, n), k.to(self.dtype))
            return self.k[i][:n, :, :tk], self.v[i][:n, :, :tk]
        raise InferenceError("KVCache used without begin_prefill()/begin_decode()")

    def write_row1(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-1 decode of layer ``i``: write the new key/value rows ``k``/``v`` (1, Hkv*D) at slot 0's length
        (key-norm bound raised); return slot 0's stored keys and values, (Hkv, capacity, D) each."""
        p = self.lengths[0]
        hkv, d = self.kv_heads, self.head_dim
        kc = self.k[i][0]  # (Hkv, capacity, D)
        vc = self.v[i][0]
        kc.select(1, p).copy_(k.view(hkv, d))
        vc.select(1, p).copy_(v.view(hkv, d))
        self._raise_kmax(i, 0, kc.select(1, p)[:, None])
        return kc, vc

    # ------------------------------------------------------------------ state for the compiled kernels
    def key_bounds(self) -> list[torch.Tensor] | None:
        """The per-layer key-norm bounds, or None once far-key skipping was switched off for this cache (code
        that then reads every key does not raise the bounds, so they stay off)."""
        if not self.skip_far_keys:
            self._kmax_valid = False
        return self.kmax if self._kmax_valid else None

    def decode_positions(self) -> tuple[torch.Tensor, int]:
        """In this decode step: each slot's length as an int64 tensor (-1 for an idle slot), and max + 1."""
        if self._pos_t is None:  # once per step, shared by all layers
            n = self._n
            act = self._active or [True] * n
            # idle slots: -1 (the kernel neither writes nor attends there; a free slot may still hold the
            # keys/values of its last sequence for reuse, of any length)
            pos = [ln if a else -1 for ln, a in zip(self.lengths[:n], act)]
            self._pos_t = torch.tensor(pos, dtype=torch.int64)
            self._pos_top = max(max(pos), 0) + 1
        return self._pos_t, self._pos_top


def cache_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """K and V bytes one token occupies across all layers."""
    es = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.kv_n_heads * config.head_dim * es


def round_capacity(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)
