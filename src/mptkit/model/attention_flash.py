"""flash-attn (>= 2.4) backend: ALiBi through ``alibi_slopes`` on CUDA, fp16/bf16.

flash-attn adds ``-slope * |i + Tk - Tq - j|`` to the scores and aligns causal attention bottom-right, which
is exactly MPT's causal ALiBi, also with a KV cache (Tq < Tk). GQA/MQA is native (fewer K/V heads). The
package is imported lazily, only when this backend is used; a missing or too old flash-attn, a CPU tensor or
an fp32 tensor gives a :class:`~mptkit.errors.ConfigError` that says what to do.

Padding masks and packed ``sequence_id`` would need flash-attn's varlen (unpadded) entry point; this backend
hands such calls to the exact, memory-bounded ``blockwise`` backend instead. FlashAttention-3 (flash_attn_3 /
hopper) has no ``alibi_slopes`` and is not used.
"""

from __future__ import annotations

import functools

import torch

from mptkit.errors import ConfigError

MIN_VERSION = (2, 4)


@functools.lru_cache(maxsize=1)
def flash_attn_version() -> tuple[int, ...] | None:
    """flash-attn's version when it is installed and new enough for ``alibi_slopes``, else None."""
    try:
        import flash_attn
    except (ImportError, OSError, RuntimeError):  # not installed, or a CUDA build that cannot load here
        return None
    try:
        v = tuple(int(x) for x in flash_attn.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    return v if v >= MIN_VERSION else None


def flash_attention_alibi(
    q, k, v, *, slopes, softmax_scale, key_padding_mask=None, sequence_id=None, dropout_p=0.0, training=False
):
    """(B, H, Tq, D) q, (B, Hkv, Tk, D) k/v -> (B, Tq, H, D) with flash-attn's causal ALiBi kernel."""
    if q.device.type != "cuda":
        raise ConfigError("attn_impl 'flash' needs CUDA tensors; use 'auto', 'sdpa' or 'blockwise' on CPU")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(
            f"attn_impl 'flash' needs fp16 or bf16 (got {q.dtype}): train under bf16 autocast or cast the model, "
            "or use attn_impl 'sdpa' for fp32"
        )
    if flash_attn_version() is None:
        raise ConfigError(
            "attn_impl 'flash' needs flash-attn >= 2.4 (for alibi_slopes): pip install 'flash-attn>=2.4' "
            "--no-build-isolation, or use attn_impl 'auto'/'sdpa'"
        )
    if key_padding_mask is not None or sequence_id is not None:
        from mptkit.model.attention_blockwise import blockwise_attention

        return blockwise_attention(
            q, k, v, slopes=slopes, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
            sequence_id=sequence_id, dropout_p=dropout_p, training=training,
        )
    from flash_attn import flash_attn_func

    dtype = q.dtype
    k = k.to(dtype)
    v = v.to(dtype)
    alibi = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32).contiguous()
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # flash-attn wants (B, T, H, D)
        dropout_p=dropout_p if training else 0.0, softmax_scale=softmax_scale, causal=True,
        alibi_slopes=alibi,
    )
    return out
