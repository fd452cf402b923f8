"""The decode step (one new token for each cache slot) over the model's own parameters, without the
per-module dispatch of ``MPTForCausalLM.forward``.

At batch 1 a decode step's time goes to streaming the model's weights and, through the generic forward, to
Python: module ``__call__``s, dropout calls that are identities in eval, autocast checks, 3-D reshapes around
every linear. This module runs the same arithmetic as the model's forward — the
same kernels on the same tensors in the same order (embedding -> per block: norm_1, fused Wqkv, clip, split,
qk_ln, cache write + attention through the cache's hooks, out_proj, residual, norm_2, FFN, residual ->
norm_f -> LM head (x logit_scale)) — on (n, d_model) rows. Equality with the model's forward is tested
(``tests/infer/test_infer_decode.py``): greedy tokens identical, logits equal to float rounding.

With mptkit's compiled CPU kernels (``mptkit.infer.kernels``; fp32 on x86-64), the linears run through a
small-M kernel, attention through a fused cache-write + attention kernel, and each standard block (LayerNorm,
MPTMLP, no QK-LayerNorm) as one call — all the blocks of a model made only of such blocks in one call per step
(one GIL release per step for a serving thread to use, instead of one per layer) — the same arithmetic to float
rounding, tested the same way.

It is a read-only view of the model: parameters are looked up once, never copied, so a model whose weights
change in place (finetuning between generations) is seen as is. Which models it covers is decided once, when it
is built, by :func:`mptkit.model.fastpath.model_coverage` (the same predicate as the compiled kernels' and the
training fast paths'): every module must be exactly one of the types whose arithmetic it reproduces. A model
with a wrapped, subclassed, hooked or unknown module (a LoRA adapter around a Linear) is not covered:
:meth:`FastDecoder.for_model` logs once which module and why and returns None, and the generator runs the
model's own forward. Within a covered model, LPRMSNorm, QK-LayerNorm and the GLU FFN are called as modules
(still exact). Models in training mode, and calls under autocast, use the generic forward.

The glue to the compiled kernels (which cache states they may run on, and the calls with the cache's storage,
positions and key-norm bounds) lives here too; the cache itself (``mptkit.infer.cache``) only holds storage and
its modes, and the attention maths over it is ``mptkit.infer.cache_attention``.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from mptkit.errors import InferenceError
from mptkit.infer.cache import KVCache
from mptkit.infer.options import DecodeOptions
from mptkit.model.blocks import MPTMLP, LayerNorm, LPLayerNorm, RMSNorm
from mptkit.model.fastpath import model_coverage
from mptkit.model.quant import QuantLinear

log = logging.getLogger(__name__)
_logged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> reasons already logged


def _norm_fn(mod):
    """A plain function computing ``mod(x)`` outside autocast (the caller checks autocast is off)."""
    if type(mod) in (LayerNorm, LPLayerNorm):  # LPLayerNorm is exactly LayerNorm outside autocast
        shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(mod) is RMSNorm:
        shape, w, eps = mod.normalized_shape, mod.weight, mod.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    return mod  # anything else (LPRMSNorm, custom): the module itself


def _linear_fn(w: torch.Tensor, b: torch.Tensor | None, small, small_rows: int):
    """``F.linear(x, w, b)`` for 2-D ``x``: our small-M kernel (``mptkit.infer.kernels``) for a decode batch of
    up to ``small_rows`` rows (``DecodeOptions.small_rows``) when it is available for these weights, else the
    one BLAS call it reduces to (``w.t()`` is a view made once)."""
    wt = w.t()
    mm = (lambda x: torch.mm(x, wt)) if b is None else (lambda x: torch.addmm(b, x, wt))
    if small is None or not small.supports(w) or (b is not None and not small.supports(b.view(1, -1))):
        return mm
    lin = small.linear
    return lambda x: lin(x, w, b) if x.shape[0] <= small_rows else mm(x)


def _module_linear(mod, small, q8, small_rows: int):
    """``mod(x)`` for 2-D ``x``, ``mod`` an ``nn.Linear`` or a q8_0 / q4_0 ``QuantLinear`` (exact types: checked by
    model_coverage): the fp32 path above, or the quantised kernel on the block values and scales (``q8``, None: the
    module's exact torch dequantise-then-matmul, a few rows at a time)."""
    if type(mod) is QuantLinear:
        from mptkit.infer.quant_kernels import q8_linear_fn

        return q8_linear_fn(mod, q8, small_rows)
    return _linear_fn(mod.weight, mod.bias, small, small_rows)


def _ffn_fn(mod, small, small_rows: int, q8=None):
    if type(mod) is MPTMLP:  # exact types: checked by model_coverage before any layer is built
        up = _module_linear(mod.up_proj, small, q8, small_rows)
        down = _module_linear(mod.down_proj, small, q8, small_rows)
        return lambda x: down(F.gelu(up(x)))
    return mod  # MPTGLU: the module (exact, a little slower)


class _Layer:
    __slots__ = ("block", "clip", "ffn", "k_ln", "norm_1", "norm_2", "out", "q_ln", "qkv", "scale")

    def __init__(self, blk, coverage, small, small_rows: int, q8=None):
        a = blk.attn
        if small is not None and coverage.kernel:
            from mptkit.infer.kernels import BlockWeights

            self.block = BlockWeights.of(blk, q8)  # the whole block in one compiled call (None: tensors it can't read)
        else:
            self.block = None
        self.norm_1 = _norm_fn(blk.norm_1)
        self.qkv = _module_linear(a.Wqkv, small, q8, small_rows)
        self.clip = a.clip_qkv
        self.q_ln = a.q_ln if a.qk_ln else None
        self.k_ln = a.k_ln if a.qk_ln else None
        self.out = _module_linear(a.out_proj, small, q8, small_rows)
        self.norm_2 = _norm_fn(blk.norm_2)
        self.ffn = _ffn_fn(blk.ffn, small, small_rows, q8)
        self.scale = a.softmax_scale


# ----------------------------------------------------------------------------- glue to the compiled kernels


def fused_ok(cache: KVCache, kernels) -> bool:
    """Whether the compiled decode kernels may run this step of ``cache``: a CPU cache in decode mode computing
    in fp32, stored in fp32 (or fp16 where the kernels convert it)."""
    return (cache._mode == "decode" and cache.device.type == "cpu" and cache.compute_dtype == torch.float32
            and (cache.dtype == torch.float32 or (cache.dtype == torch.float16 and kernels.has_f16)))


def decode_fused(cache: KVCache, i: int, q, k, v, softmax_scale: float, kernels) -> torch.Tensor:
    """Decode step of layer ``i`` for all ``n`` slots through the compiled kernel (``CpuKernels.decode_attention``):
    write each slot's new key/value row at its length, attend over its keys (ALiBi from the slot's own position).
    ``q`` (n, H*D), ``k``/``v`` (n, Hkv*D) -> (n, H*D). Same result as the cache's ``update`` + ``attend`` to
    float rounding for the active slots; idle slots are neither written nor read (their output rows are zero)."""
    pos, top = cache.decode_positions()
    km = cache.key_bounds()
    return kernels.decode_attention(q, k, v, cache.k[i], cache.v[i], pos, top, cache.slopes, softmax_scale,
                                    km and km[i])


def fused_block(cache: KVCache, i: int, x: torch.Tensor, weights, kernels) -> None:
    """Layer ``i``'s whole block on ``x`` (n, d) in place, cache write included (``CpuKernels.decode_block``)."""
    pos, top = cache.decode_positions()
    km = cache.key_bounds()
    kernels.decode_block(x, weights, cache.k[i], cache.v[i], pos, top, cache.slopes, km and km[i])


def fused_layers(cache: KVCache, x: torch.Tensor, stack, kernels) -> None:
    """Every layer's block on ``x`` (n, d) in place, in one call (``CpuKernels.decode_layers``)."""
    pos, top = cache.decode_positions()
    kernels.decode_layers(x, stack, cache.k, cache.v, pos, top, cache.slopes, cache.key_bounds())


class FastDecoder:
    """``decoder(ids, cache) -> logits (n, V)`` for a cache set up by ``cache.begin_decode(n)``; equivalent to
    ``model(ids[:, None], cache=cache, logits_to_keep=1).logits[:, -1]``.

    oneDNN is switched off for the step (and restored): its fp32 GELU pays a primitive set-up per call, which
    makes it slower than PyTorch's own vectorised kernel at decode sizes (results differ by at most an ulp or
    two); fp32 matmuls are MKL calls either way.

    Only for a model :func:`~mptkit.model.fastpath.model_coverage` covers (else an InferenceError); use
    :meth:`for_model`, which logs why a model is not covered and returns None."""

    @classmethod
    def for_model(cls, model, options: DecodeOptions | None = None) -> FastDecoder | None:
        """A decoder for ``model``, or None (logged once per model and reason) where the fast path does not
        cover it: the caller then runs the model's own forward."""
        cov = model_coverage(model)
        if not cov.fast:
            seen = _logged.setdefault(model, set())
            if cov.reason not in seen:
                seen.add(cov.reason)
                log.info("fast decode off for this model, using its own forward: %s", cov.reason)
            return None
        return cls(model, options=options, coverage=cov)

    def __init__(self, model, *, cpu_kernels: bool | None = None, options: DecodeOptions | None = None,
                 coverage=None):
        cov = coverage if coverage is not None else model_coverage(model)
        if not cov.fast:
            raise InferenceError(f"the fast decoder does not cover this model ({cov.reason}); run its own forward "
                                 "(FastDecoder.for_model returns None for such models)")
        self.options = options = options or DecodeOptions()
        self.coverage = cov
        self.model = model
        cfg = model.config
        self.cfg = cfg
        t = model.transformer
        self.wte = t.wte.weight
        self.wpe = t.wpe.weight if hasattr(t, "wpe") else None
        small = None
        use_kernels = options.cpu_kernels if cpu_kernels is None else cpu_kernels
        if use_kernels and self.wte.device.type == "cpu" and self.wte.dtype == torch.float32:
            from mptkit.infer.kernels import cpu_kernels as build_kernels

            small = build_kernels()
        self.small = small  # the small-M linear kernel in use, or None (torch.mm)
        q8 = None
        if any(type(m) is QuantLinear for m in model.modules()):
            if use_kernels and self.wte.device.type == "cpu":
                from mptkit.infer.quant_kernels import q8_kernels

                q8 = q8_kernels()  # None (logged why): the QuantLinears' exact torch fallback
                if q8 is not None and options.quant_int_dot:
                    q8 = q8.integer_variant()  # activations rounded to q8_0 blocks, integer dot products
            else:
                log.info("quantised linears: no compiled q8/q4 kernel (%s); each runs its exact torch dequantise-then-"
                         "matmul", "switched off" if not use_kernels else f"weights on {self.wte.device}")
        self.q8 = q8  # the q8_0 linear kernel in use for quantised layers, or None
        rows = options.small_rows
        qh = getattr(model, "quant_head", None)  # the tied head's q8_0 copy: read through the q8 kernel
        if qh is not None:
            self.head = _module_linear(qh, small, q8, rows)
        else:
            self.head = _linear_fn(t.wte.weight if cfg.tie_word_embeddings else model.lm_head.weight, None, small,
                                   rows)
        self.logit_scale = cfg.logit_scale_value
        self.emb_frac = cfg.embedding_fraction
        self.layers = [_Layer(b, c, small, rows, q8) for b, c in zip(t.blocks, cov.blocks)]
        self.stack = None  # every block in one compiled call per step, where every block is covered
        if small is not None:
            from mptkit.infer.kernels import DecodeStack

            self.stack = DecodeStack.of([L.block for L in self.layers])
        self.norm_f = _norm_fn(t.norm_f)
        self.d, self.h, self.hkv, self.hd = cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.kv_dim = self.hkv * self.hd

    def usable(self) -> bool:
        """False when the generic forward must run: training mode, or autocast on the weights' device."""
        return not self.model.training and not torch.is_autocast_enabled(self.wte.device.type)

    def __call__(self, ids: torch.Tensor, cache, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` (n,) or (n, 1) long; ``positions`` (n,) for learned position embeddings (each slot's own)."""
        onednn = torch._C._get_mkldnn_enabled()
        if onednn:
            torch._C._set_mkldnn_enabled(False)
        try:
            return self._step(ids.reshape(-1), cache, positions)
        finally:
            if onednn:
                torch._C._set_mkldnn_enabled(True)

    def _step(self, ids: torch.Tensor, cache, positions: torch.Tensor | None) -> torch.Tensor:
        n = ids.shape[0]
        x = F.embedding(ids, self.wte)  # (n, d)
        if self.wpe is not None:
            pos = positions if positions is not None else torch.full((n,), cache.seq_len, device=ids.device)
            x = x + F.embedding(pos, self.wpe)
        if self.emb_frac != 1:
            f = self.emb_frac
            x = x * f + x.detach() * (1 - f)
        slopes = self.model.slopes
        d, h, hkv, hd, kvd = self.d, self.h, self.hkv, self.hd, self.kv_dim
        ours = isinstance(cache, KVCache)
        one = n == 1 and ours
        fused = self.small is not None and ours and fused_ok(cache, self.small)
        if fused:
            x = x.contiguous()  # the fused block updates it in place
        if fused and self.stack is not None:
            fused_layers(cache, x, self.stack, self.small)
        for i, L in enumerate(self.layers if not (fused and self.stack is not None) else ()):
            if fused and L.block is not None and not L.block.quantised:  # (a quantised block: only in the stack)
                fused_block(cache, i, x, L.block, self.small)
                continue
            qkv = L.qkv(L.norm_1(x))
            if L.clip:
                qkv = qkv.clamp(min=-L.clip, max=L.clip)
            q, k, v = qkv.split([d, kvd, kvd], dim=-1)
            if L.q_ln is not None:
                dt = q.dtype
                q = L.q_ln(q).to(dt)
                k = L.k_ln(k).to(dt)
            if fused:
                o = decode_fused(cache, i, q, k, v, L.scale, self.small)
            elif one:
                o = cache.attention.decode1(i, q, k, v, L.scale)
            else:
                q = q.view(n, 1, h, hd).transpose(1, 2)
                k = k.view(n, 1, hkv, hd).transpose(1, 2)
                v = v.view(n, 1, hkv, hd).transpose(1, 2)
                lc = cache.layer(i)
                k, v = lc.update(k, v)
                o = lc.attend(q, k, v, slopes=slopes, softmax_scale=L.scale).reshape(n, d)  # (n, 1, H, hd)
            x = x + L.out(o)
            x = x + L.ffn(L.norm_2(x))
        cache.advance(1)
        out = self.head(self.norm_f(x))
        if self.logit_scale is not None:
            out = out * self.logit_scale
        return out
