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
change in place (finetuning between generations) is seen as is. Norms and FFNs of types it does not know are
called as modules (still exact). Models in training mode, and calls under autocast, use the generic forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mptkit.model.blocks import MPTMLP, LayerNorm, LPLayerNorm, RMSNorm


def _norm_fn(mod):
    """A plain function computing ``mod(x)`` outside autocast (the caller checks autocast is off)."""
    if type(mod) in (LayerNorm, LPLayerNorm):  # LPLayerNorm is exactly LayerNorm outside autocast
        shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(mod) is RMSNorm:
        shape, w, eps = mod.normalized_shape, mod.weight, mod.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    return mod  # anything else (LPRMSNorm, custom): the module itself


SMALL_ROWS = 16  # batches up to this many rows use the small-M kernel (when built); larger ones torch.mm


def _linear_fn(w: torch.Tensor, b: torch.Tensor | None, small=None):
    """``F.linear(x, w, b)`` for 2-D ``x``: our small-M kernel (``mptkit.infer.kernels``) for a decode batch
    when it is available for these weights, else the one BLAS call it reduces to (``w.t()`` is a view made
    once)."""
    wt = w.t()
    mm = (lambda x: torch.mm(x, wt)) if b is None else (lambda x: torch.addmm(b, x, wt))
    if small is None or not small.supports(w) or (b is not None and not small.supports(b.view(1, -1))):
        return mm
    lin = small.linear
    return lambda x: lin(x, w, b) if x.shape[0] <= SMALL_ROWS else mm(x)


def _ffn_fn(mod, small):
    if type(mod) is MPTMLP:
        up = _linear_fn(mod.up_proj.weight, mod.up_proj.bias, small)
        down = _linear_fn(mod.down_proj.weight, mod.down_proj.bias, small)
        return lambda x: down(F.gelu(up(x)))
    return mod  # MPTGLU and others: the module (exact, a little slower)


class _Layer:
    __slots__ = ("block", "clip", "ffn", "k_ln", "norm_1", "norm_2", "out", "q_ln", "qkv", "scale")

    def __init__(self, blk, small):
        a = blk.attn
        if small is not None:
            from mptkit.infer.kernels import BlockWeights

            self.block = BlockWeights.of(blk)  # the whole block in one compiled call, where it covers it
        else:
            self.block = None
        self.norm_1 = _norm_fn(blk.norm_1)
        self.qkv = _linear_fn(a.Wqkv.weight, a.Wqkv.bias, small)
        self.clip = a.clip_qkv
        self.q_ln = a.q_ln if a.qk_ln else None
        self.k_ln = a.k_ln if a.qk_ln else None
        self.out = _linear_fn(a.out_proj.weight, a.out_proj.bias, small)
        self.norm_2 = _norm_fn(blk.norm_2)
        self.ffn = _ffn_fn(blk.ffn, small)
        self.scale = a.softmax_scale


class FastDecoder:
    """``decoder(ids, cache) -> logits (n, V)`` for a cache set up by ``cache.begin_decode(n)``; equivalent to
    ``model(ids[:, None], cache=cache, logits_to_keep=1).logits[:, -1]``.

    oneDNN is switched off for the step (and restored): its fp32 GELU pays a primitive set-up per call, which
    makes it slower than PyTorch's own vectorised kernel at decode sizes (results differ by at most an ulp or
    two); fp32 matmuls are MKL calls either way."""

    def __init__(self, model, *, cpu_kernels: bool = True):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        t = model.transformer
        self.wte = t.wte.weight
        self.wpe = t.wpe.weight if hasattr(t, "wpe") else None
        small = None
        if cpu_kernels and self.wte.device.type == "cpu" and self.wte.dtype == torch.float32:
            from mptkit.infer.kernels import cpu_kernels

            small = cpu_kernels()
        self.small = small  # the small-M linear kernel in use, or None (torch.mm)
        self.head = _linear_fn(t.wte.weight if cfg.tie_word_embeddings else model.lm_head.weight, None, small)
        self.logit_scale = cfg.logit_scale_value
        self.emb_frac = cfg.embedding_fraction
        self.layers = [_Layer(b, small) for b in t.blocks]
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
        one = n == 1 and hasattr(cache, "decode1")
        fused = self.small is not None and hasattr(cache, "fused_ok") and cache.fused_ok(self.small)
        if fused:
            x = x.contiguous()  # the fused block updates it in place
        if fused and self.stack is not None:
            cache.fused_layers(x, self.stack, self.small)
        for i, L in enumerate(self.layers if not (fused and self.stack is not None) else ()):
            if fused and L.block is not None:
                cache.fused_block(i, x, L.block, self.small)
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
                o = cache.decode_fused(i, q, k, v, L.scale, self.small)
            elif one:
                o = cache.decode1(i, q, k, v, L.scale)
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
