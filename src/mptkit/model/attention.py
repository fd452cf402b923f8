"""ALiBi attention for MPT: the slopes, the attention module (fused Wqkv, MHA/MQA/GQA, clip_qkv, qk_ln)
and the scaled-dot-product backends behind one function, :func:`attention`.

Conventions used by every backend
---------------------------------
* ``q``: (B, H, Tq, D); ``k``, ``v``: (B, Hkv, Tk, D) with ``H % Hkv == 0``; query head ``h`` reads
  key/value head ``h // (H // Hkv)`` (llm-foundry's ``repeat_kv_for_gqa``).
* Queries are the *last* ``Tq`` positions of the ``Tk`` keys (bottom-right alignment): query ``i`` sits at
  position ``Tk - Tq + i``. This is what a KV cache needs and what flash-attn's ``alibi_slopes`` assumes.
* Causal ALiBi bias for query position ``p`` and key position ``j <= p``: ``-slope_h * (p - j)``. MPT's own
  key-only bias ``slope_h * (j - (L-1))`` differs by a per-row constant, which softmax removes.
* ``key_padding_mask``: (B, Tk) bool, True = a real token. ``sequence_id``: (B, Tk) int; a query only sees
  keys with the same id (packed documents). Both apply on top of causality.
* A query always sees its own position (the diagonal), even when ``key_padding_mask`` marks it as padding:
  a left-padding query then attends only to itself, so its output is finite, identical in every backend
  and independent of the real tokens (no NaN, no leak from later tokens into the gradient).
* Returned: (B, Tq, H, D).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.errors import ConfigError
from mptkit.model.fastpath import FastPathOptions, attention_reason

# ----------------------------------------------------------------------------- ALiBi slopes


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """MPT's ALiBi slopes, shape (n_heads,), fp32.

    n = 2^ceil(log2 H); m_j = j * bias_max / n for j = 1..n; slope_j = 2^-m_j. When n != H (non power of
    two), MPT interleaves: the odd-indexed slopes first, then the even-indexed, and keeps the first H.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (float(alibi_bias_max) / n)
    slopes = torch.pow(2.0, -m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


# ----------------------------------------------------------------------------- masks / bias


def mask_value(dtype: torch.dtype) -> float:
    """A large finite negative: a fully masked row (left padding) gives finite output instead of NaN."""
    return torch.finfo(dtype).min


def build_attn_bias(
    *,
    batch: int,
    n_heads: int,
    tq: int,
    tk: int,
    slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    sequence_id: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    q_start: int | None = None,
) -> torch.Tensor:
    """The additive bias (B|1, H|1, Tq, Tk): ALiBi plus causal/padding/sequence masks.

    This materialises Tq x Tk; the memory-bounded backends never call it on the whole sequence.
    ``q_start`` (default ``tk - tq``) is the position of the first query.
    """
    q0 = tk - tq if q_start is None else q_start
    qpos = torch.arange(q0, q0 + tq, device=device)
    kpos = torch.arange(tk, device=device)
    rel = kpos[None, :] - qpos[:, None]  # (Tq, Tk), <= 0 where allowed
    allowed = (rel <= 0)[None, None]  # (1,1,Tq,Tk)
    if slopes is not None:
        bias = (slopes.to(device=device, dtype=torch.float32)[:, None, None] * rel[None].to(torch.float32))[None]
    else:
        bias = torch.zeros((1, 1, tq, tk), device=device, dtype=torch.float32)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    if sequence_id is not None:
        sq = sequence_id[:, q0 : q0 + tq] if sequence_id.shape[1] == tk else sequence_id
        allowed = allowed & (sq[:, None, :, None] == sequence_id[:, None, None, :])
    if key_padding_mask is not None:
        allowed = allowed | (rel == 0)[None, None]  # a padding query sees itself (see module docstring)
    bias = bias.to(dtype).masked_fill(~allowed, mask_value(dtype))
    return bias


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv*n_rep, T, D), head h reading kv head h // n_rep."""
    if n_rep == 1:
        return x
    b, hkv, t, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)


# ----------------------------------------------------------------------------- backends

AttnFn = Callable[..., torch.Tensor]
BACKENDS: dict[str, AttnFn] = {}


def register_backend(name: str) -> Callable[[AttnFn], AttnFn]:
    def deco(fn: AttnFn) -> AttnFn:
        BACKENDS[name] = fn
        return fn

    return deco


@register_backend("torch")
def eager_attention(
    q, k, v, *, slopes, softmax_scale, key_padding_mask=None, sequence_id=None, dropout_p=0.0, training=False
):
    """The reference: explicit scores, bias and softmax in fp32."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    n_rep = h // k.shape[1]
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * softmax_scale
    bias = build_attn_bias(
        batch=b, n_heads=h, tq=tq, tk=tk, slopes=slopes, key_padding_mask=key_padding_mask,
        sequence_id=sequence_id, dtype=torch.float32, device=q.device,
    )
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    if dropout_p and training:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2)


# A T x T float bias bigger than this (elements, B*H*Tq*Tk) is avoided by ``auto``: it goes blockwise.
BIAS_ELEMS_LIMIT = 1 << 25  # 128 MB in fp32


@register_backend("sdpa")
def sdpa_attention(
    q, k, v, *, slopes, softmax_scale, key_padding_mask=None, sequence_id=None, dropout_p=0.0, training=False,
    chunk: int = 1024,
):
    """PyTorch's scaled_dot_product_attention (``chunk``: query rows per call of the CPU flash kernel's ALiBi
    path, ``FastPathOptions.sdpa_alibi_chunk``).

    Causal attention without padding/packing masks on CPU runs ALiBi on the fused CPU flash kernel (exact,
    O(T) memory, the masked half skipped; see :mod:`mptkit.model.attention_sdpa_alibi`). Otherwise the
    ALiBi/mask bias is passed as a float ``attn_mask`` (Tq x Tk per head)."""
    from mptkit.model import attention_sdpa_alibi

    b, h, tq, _ = q.shape
    tk = k.shape[2]
    n_rep = h // k.shape[1]
    dp = dropout_p if training else 0.0
    plain = key_padding_mask is None and sequence_id is None and dp == 0.0
    if plain and tq > 16 and attention_sdpa_alibi.available(q):
        return attention_sdpa_alibi.sdpa_alibi_attention(
            q, k, v, slopes=slopes, softmax_scale=softmax_scale, chunk=chunk
        )
    if slopes is None and key_padding_mask is None and sequence_id is None:
        if tq == tk:
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True, dropout_p=dp, scale=softmax_scale
            )
            return out.transpose(1, 2)
        if tq == 1:  # one new token sees every cached key
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), dropout_p=dp, scale=softmax_scale
            )
            return out.transpose(1, 2)
    bias = build_attn_bias(
        batch=b, n_heads=h, tq=tq, tk=tk, slopes=slopes, key_padding_mask=key_padding_mask,
        sequence_id=sequence_id, dtype=q.dtype, device=q.device,
    )
    out = F.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=bias, dropout_p=dp, scale=softmax_scale
    )
    return out.transpose(1, 2)


@register_backend("flex")
def _flex(q, k, v, *, compiled: bool = True, **kw):
    """Compiled FlexAttention with an ALiBi score_mod and a block mask (attention_flex); ``compiled`` is
    ``FastPathOptions.flex_compile``."""
    from mptkit.model.attention_flex import flex_attention_alibi

    return flex_attention_alibi(q, k, v, compiled=compiled, **kw)


@register_backend("flash")
def _flash(q, k, v, **kw):
    """flash-attn >= 2.4 with ``alibi_slopes`` (CUDA, fp16/bf16; attention_flash)."""
    from mptkit.model.attention_flash import flash_attention_alibi

    return flash_attention_alibi(q, k, v, **kw)


@register_backend("blockwise")
def _blockwise(q, k, v, **kw):
    """Online softmax over key blocks, forward and backward: never T x T (attention_blockwise)."""
    from mptkit.model.attention_blockwise import blockwise_attention

    return blockwise_attention(q, k, v, **kw)


def _flash_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    from mptkit.model.attention_flash import flash_attn_version

    return flash_attn_version() is not None


def resolve_impl(
    impl: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tq: int = 0,
    tk: int = 0,
    batch_heads: int = 1,
    masked: bool = False,
    dropout: bool = False,
) -> str:
    """Map ``auto`` (and MPT's legacy ``triton``) to a concrete backend for this call.

    ``auto``: flash-attn on CUDA in fp16/bf16 when installed (no attention dropout with padding/packing,
    which flash's varlen path would need); else ``sdpa`` when its T x T bias is small or not needed (CPU
    causal attention runs on the fused kernel in O(T) memory); else ``blockwise`` (padded or packed inputs
    whose bias would exceed ``BIAS_ELEMS_LIMIT`` elements, and long sequences on other devices).
    ``sdpa`` is also the fallback for attention dropout, which blockwise does not implement."""
    if impl in ("auto", "triton"):
        if _flash_usable(device, dtype) and not masked:
            return "flash"
        if dropout:
            return "sdpa"
        needs_bias = masked or device.type != "cpu"
        if needs_bias and batch_heads * tq * tk > BIAS_ELEMS_LIMIT:
            return "blockwise"
        return "sdpa"
    if impl not in BACKENDS:
        raise ConfigError(
            f"attn_config.attn_impl '{impl}' is not available here (available: {sorted(BACKENDS)})"
        )
    return impl


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    slopes: torch.Tensor | None,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
    sequence_id: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    impl: str = "auto",
    options: FastPathOptions | None = None,
) -> torch.Tensor:
    """Dispatch to the backend named by ``impl`` (see the module docstring for shapes and semantics).
    ``options``: the model's fast-path options (the flex backend's compilation); None: the defaults."""
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    name = resolve_impl(
        impl, q.device, q.dtype, tq=q.shape[2], tk=k.shape[2], batch_heads=q.shape[0] * q.shape[1],
        masked=key_padding_mask is not None or sequence_id is not None, dropout=bool(dropout_p and training),
    )
    extra = {}
    opts = options if options is not None else FastPathOptions()
    if name == "flex":
        extra["compiled"] = opts.flex_compile
    elif name == "sdpa":
        extra["chunk"] = opts.sdpa_alibi_chunk
    return BACKENDS[name](
        q, k, v, slopes=slopes, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
        sequence_id=sequence_id, dropout_p=dropout_p, training=training, **extra,
    )


# ----------------------------------------------------------------------------- the module


class LayerKVCache(Protocol):
    """What the attention module needs from a KV cache for one layer (see mptkit.infer.cache).

    The model-level cache passed as ``cache=`` to ``MPTForCausalLM.forward`` has ``seq_len`` (tokens
    already cached, used for positions and mask shapes), ``layer(i)`` -> a LayerKVCache, and
    ``advance(t)`` (called once after all layers have consumed ``t`` new tokens).

    A layer cache may also define ``attend(q, k, v, *, slopes, softmax_scale, impl, options) -> (B, Tq, H, D)``;
    then the attention module calls it instead of :func:`attention` (for cache layouts where sequences of a
    batch have different lengths, e.g. continuous batching), with its own backend name (``impl``, resolved per
    call by :func:`resolve_impl`) and fast-path options for the cache's prefill attention.
    """

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, T, D) keys/values; return all keys/values so far."""
        ...


class MPTAttention(nn.Module):
    """MPT's attention: fused Wqkv (rows Q | K | V), optional clip_qkv and qk_ln, out_proj."""

    def __init__(self, config, norm_factory: Callable[[int], nn.Module], fast_paths: FastPathOptions | None = None):
        super().__init__()
        self.fast_paths = fast_paths or FastPathOptions()
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.kv_n_heads = config.kv_n_heads
        self.head_dim = config.head_dim
        self.softmax_scale = config.softmax_scale
        self.clip_qkv = config.attn_config["clip_qkv"]
        self.attn_pdrop = float(config.attn_config["attn_pdrop"])
        self.attn_impl = config.attn_impl
        bias = not config.no_bias
        kv_dim = self.kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(self.d_model, self.d_model + 2 * kv_dim, bias=bias)
        # Fused init: q, k, v slices are initialised separately (as llm-foundry's `_fused`).
        self.Wqkv._fused = (0, [self.d_model, self.d_model + kv_dim])
        self.qk_ln = bool(config.attn_config["qk_ln"])
        if self.qk_ln:
            self.q_ln = norm_factory(self.d_model)
            self.k_ln = norm_factory(kv_dim)
        self.out_proj = nn.Linear(self.d_model, self.d_model, bias=bias)
        self.out_proj._is_residual = True

    def forward(
        self,
        x: torch.Tensor,
        *,
        slopes: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        layer_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        if layer_cache is None and not self.qk_ln and self._packed_path(qkv, key_padding_mask, sequence_id):
            from mptkit.model.attention_sdpa_alibi import sdpa_alibi_attention_packed

            out = sdpa_alibi_attention_packed(
                qkv, n_heads=self.n_heads, kv_heads=self.kv_n_heads, slopes=slopes,
                softmax_scale=self.softmax_scale, chunk=self.fast_paths.sdpa_alibi_chunk,
            )
            return self.out_proj(out)
        kv_dim = self.kv_n_heads * self.head_dim
        q, k, v = qkv.split([self.d_model, kv_dim, kv_dim], dim=-1)
        if self.qk_ln:
            dtype = q.dtype
            q = self.q_ln(q).to(dtype)
            k = self.k_ln(k).to(dtype)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_n_heads, self.head_dim).transpose(1, 2)
        attend = None
        if layer_cache is not None:
            k, v = layer_cache.update(k, v)
            attend = getattr(layer_cache, "attend", None)
        if attend is not None:  # a cache with its own layout (per-slot lengths) computes attention itself
            out = attend(q, k, v, slopes=slopes, softmax_scale=self.softmax_scale, impl=self.attn_impl,
                         options=self.fast_paths)
        else:
            out = attention(
                q, k, v, slopes=slopes, softmax_scale=self.softmax_scale, key_padding_mask=key_padding_mask,
                sequence_id=sequence_id, dropout_p=self.attn_pdrop, training=self.training, impl=self.attn_impl,
                options=self.fast_paths,
            )
        return self.out_proj(out.reshape(b, t, self.d_model))

    def _packed_path(self, qkv, key_padding_mask, sequence_id) -> bool:
        """True when :func:`attention` would run this call on the CPU flash-kernel ALiBi path (causal
        self-attention, no padding/packing mask, no attention dropout): then the packed variant, which reads
        q, k, v from ``qkv`` and returns the gradient of ``qkv`` in one piece, computes the same thing.
        Off with ``fast_paths.packed_qkv`` false, and for anything but the exact MPTAttention
        (``fastpath.attention_reason``)."""
        if not self.fast_paths.packed_qkv or sequence_id is not None or (self.attn_pdrop and self.training):
            return False
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            return False
        t = qkv.shape[1]
        if t <= 16 or self.d_model % self.n_heads or attention_reason(self) is not None:
            return False
        from mptkit.model import attention_sdpa_alibi

        if not attention_sdpa_alibi.available(qkv):
            return False
        name = resolve_impl(
            self.attn_impl, qkv.device, qkv.dtype, tq=t, tk=t, batch_heads=qkv.shape[0] * self.n_heads
        )
        return name == "sdpa"
