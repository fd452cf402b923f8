"""The fast paths' contract: which modules they may compute from their parameters, and their options.

Several code paths skip a module's ``forward`` and compute the same arithmetic from its tensors instead: the
decode step (``mptkit.infer.decode.FastDecoder``, which reads ``Wqkv.weight``, ``up_proj.weight`` …), the
compiled CPU kernels (``mptkit.infer.kernels``, raw weight pointers), and the CPU training paths (the chunked
MLP of ``model/blocks.py`` reads ``up_proj.weight`` / ``down_proj.weight``; the packed QKV attention of
``model/attention.py`` reads q, k and v out of ``Wqkv``'s output). That is only right for the exact modules
whose arithmetic they reproduce. A module that is wrapped (a LoRA adapter around a Linear), subclassed,
patched (an instance ``forward``), hooked (forward hooks or pre-hooks, a parametrization — which changes the
class) or unknown would be silently ignored; so every fast path asks this module first, and where it does not
cover a module the caller runs the model's own forward (the decoder logs once, at setup, which module and why).

* :func:`plain_reason` — the one predicate: ``None`` when a module is exactly one of the given classes with no
  hooks and no patched ``forward``, else why not. The training paths call it (through :func:`mlp_reason` and
  :func:`attention_reason`) on every forward: a few attribute reads, and an adapter added after the model was
  built is seen at once.
* :func:`block_coverage` — one block: whether the fast decoder may compute it (every module in it is one of
  :data:`DECODE_TYPES`) and whether the compiled whole-block kernel may (LayerNorm norms with weights, the
  plain MLP, no QK-LayerNorm; the kernels check dtype, device and layout themselves).
* :func:`model_coverage` — a whole ``MPTForCausalLM``: the modules around the blocks, then each block.

:class:`FastPathOptions` holds the model's fast-path knobs (given to ``MPTForCausalLM(..., fast_paths=...)`` or
``model.set_fast_paths``); environment variables, where named, are only their defaults.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules import module as _nn_module

from mptkit.errors import ConfigError

_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: unset or empty gives ``default``; ``0``/``false``/``no``/``off`` (any
    case) is off, anything else on."""
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    return v not in _OFF


@dataclass(frozen=True)
class FastPathOptions:
    """The model's fast-path knobs (none changes a result beyond float rounding; each can be switched off to
    compare).

    ``packed_qkv``: MPTAttention hands its fused qkv straight to the CPU flash-kernel ALiBi path when it applies
    (False: always split q/k/v). ``mlp_chunk``: token rows per step of the chunked CPU training MLP (0: always
    the plain three-op MLP). ``sdpa_alibi_chunk``: query rows per call of the CPU flash kernel's ALiBi path (the
    ``sdpa`` backend; any size gives the same result to float rounding). ``flex_compile``: compile FlexAttention (``attn_impl: flex``); False runs it
    uncompiled (slow, T x T memory, for debugging); default from ``MPTKIT_FLEX_COMPILE`` (unset: on)."""

    packed_qkv: bool = True
    mlp_chunk: int = 2048
    sdpa_alibi_chunk: int = 1024
    flex_compile: bool = field(default_factory=lambda: env_flag("MPTKIT_FLEX_COMPILE", True))

    def __post_init__(self) -> None:
        if not isinstance(self.mlp_chunk, int) or isinstance(self.mlp_chunk, bool) or self.mlp_chunk < 0:
            raise ConfigError(
                f"fast_paths.mlp_chunk must be a whole number >= 0 (0: off), got {self.mlp_chunk!r}"
            )
        c = self.sdpa_alibi_chunk
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ConfigError(f"fast_paths.sdpa_alibi_chunk must be a whole number >= 1, got {c!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FastPathOptions:
        """From a recipe section (e.g. ``model.fast_paths: {mlp_chunk: 0}``); an unknown key is an error."""
        return _from_dict(cls, d, "fast_paths")


def _from_dict(cls, d, section: str):
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ConfigError(f"{section}: unknown option(s) {bad}; known: {sorted(known)}")
    return cls(**d)


# ----------------------------------------------------------------------------- the predicate


def plain_reason(m: nn.Module, types: type | tuple[type, ...]) -> str | None:
    """``None`` when ``m`` is exactly (not a subclass of) one of ``types``, with no forward hooks or pre-hooks
    and no ``forward`` set on the instance, and no global module hooks are registered; else the reason."""
    types = types if isinstance(types, tuple) else (types,)
    if type(m) not in types:
        return f"{type(m).__module__}.{type(m).__qualname__} is not one of the types the fast path reproduces"
    if m._forward_hooks or m._forward_pre_hooks:
        return f"{type(m).__name__} has forward hooks"
    if "forward" in m.__dict__:
        return f"{type(m).__name__} has its forward replaced on the instance"
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    return None


def mlp_reason(ffn: nn.Module) -> str | None:
    """Why the plain MLP's fast paths (the chunked CPU training MLP, the decoder's functional MLP) may not
    compute ``ffn`` from ``up_proj.weight`` / ``down_proj.weight``, or None."""
    from mptkit.model.blocks import MPTMLP

    return (
        plain_reason(ffn, MPTMLP) or _child(ffn, "up_proj", nn.Linear) or _child(ffn, "down_proj", nn.Linear)
    )


def mlp_kernel_reason(ffn: nn.Module) -> str | None:
    """Why the decoder's whole-block kernel may not compute ``ffn`` (an exact MPTMLP whose linears are each
    exactly one of :func:`linear_types`: fp32 or q8_0 / q4_0, read by the block kernel), or None."""
    from mptkit.model.blocks import MPTMLP

    lin = linear_types()
    return plain_reason(ffn, MPTMLP) or _child(ffn, "up_proj", lin) or _child(ffn, "down_proj", lin)


def attention_reason(attn: nn.Module) -> str | None:
    """Why the attention fast paths (packed QKV in training, the decoder) may not stand in for ``attn``'s own
    forward, or None. The packed path reads q, k, v from ``Wqkv``'s output (a wrapped Wqkv is still called as a
    module there), so it needs only ``attn`` itself to be the exact MPTAttention; the decoder checks the
    Linears too (:func:`block_coverage`)."""
    from mptkit.model.attention import MPTAttention

    return plain_reason(attn, MPTAttention)


def _child(parent: nn.Module, name: str, types) -> str | None:
    m = getattr(parent, name, None)
    if not isinstance(m, nn.Module):
        return f"{name} is missing"
    r = plain_reason(m, types)
    return None if r is None else f"{name}: {r}"


def linear_types() -> tuple[type, ...]:
    """The linear layers the fast decoder computes from their tensors: ``nn.Linear`` and the q8_0
    :class:`~mptkit.model.quant.QuantLinear` (its int8 values and scales, read by the decoder's q8 kernel or
    its exact torch fallback)."""
    from mptkit.model.quant import QuantLinear

    return (nn.Linear, QuantLinear)


def decode_types() -> tuple[type, ...]:
    """Every module type a block may contain for the fast decoder to compute it."""
    from mptkit.model.attention import MPTAttention
    from mptkit.model.blocks import MPTGLU, MPTMLP, NORMS, MPTBlock

    return (MPTBlock, MPTAttention, MPTMLP, MPTGLU, *linear_types(), nn.Dropout, *NORMS.values())


@dataclass(frozen=True)
class BlockCoverage:
    """``fast``: the fast decoder may compute the block; ``kernel``: so may the compiled whole-block kernel
    (tensor dtype/device/layout checked by the kernels); ``reason``: why not (the first thing found)."""

    fast: bool
    kernel: bool
    reason: str | None = None


def block_coverage(blk: nn.Module) -> BlockCoverage:
    """Whether the fast decode / C-kernel path covers ``blk``: every module in it exactly one of
    :func:`decode_types` (no hooks, no patched forward), for the kernel also LayerNorm/LPLayerNorm norms with
    weights, the plain MLP, fp32 ``nn.Linear`` layers (a quantised block takes the decoder's per-linear path), no
    QK-LayerNorm and ``d_model == n_heads * head_dim``."""
    from mptkit.model.blocks import LayerNorm, LPLayerNorm, MPTBlock

    types = decode_types()
    for name, m in blk.named_modules():
        r = plain_reason(m, MPTBlock if name == "" else types)
        if r is not None:
            return BlockCoverage(False, False, f"{name or 'the block'}: {r}")
    a = blk.attn
    lin = linear_types()
    r = attention_reason(a) or _child(a, "Wqkv", lin) or _child(a, "out_proj", lin)
    if r is not None:
        return BlockCoverage(False, False, f"attn: {r}")
    lns = (LayerNorm, LPLayerNorm)
    kernel = (
        type(blk.norm_1) in lns
        and type(blk.norm_2) in lns
        and blk.norm_1.weight is not None
        and blk.norm_2.weight is not None
        and mlp_kernel_reason(blk.ffn) is None  # also: up_proj / down_proj exactly a linear type
        and type(a.Wqkv) in lin
        and type(a.out_proj) in lin
        and not a.qk_ln
        and a.d_model == a.n_heads * a.head_dim
    )
    return BlockCoverage(True, kernel)


@dataclass(frozen=True)
class ModelCoverage:
    """``reason`` is None when the fast decoder covers the whole model; else what it does not cover (a
    module path and why). ``blocks``: each block's :class:`BlockCoverage`."""

    blocks: tuple[BlockCoverage, ...]
    reason: str | None = None

    @property
    def fast(self) -> bool:
        return self.reason is None


def model_coverage(model: nn.Module) -> ModelCoverage:
    """The fast decoder's coverage of ``model``: the causal LM and the modules around the blocks (embeddings,
    final norm, LM head, dropout) exactly the known types, then :func:`block_coverage` for every block."""
    from mptkit.model.blocks import NORMS
    from mptkit.model.model import MPTForCausalLM, MPTModel

    r = plain_reason(model, MPTForCausalLM)
    if r is not None:
        return ModelCoverage((), f"the model: {r}")
    t = model.transformer
    around = [
        ("transformer", t, MPTModel),
        ("transformer.blocks", t.blocks, nn.ModuleList),
        ("transformer.wte", t.wte, nn.Embedding),
        ("transformer.emb_drop", t.emb_drop, nn.Dropout),
        ("transformer.norm_f", t.norm_f, tuple(NORMS.values())),
    ]
    if hasattr(t, "wpe"):
        around.append(("transformer.wpe", t.wpe, nn.Embedding))
    if hasattr(model, "lm_head"):
        around.append(("lm_head", model.lm_head, nn.Linear))
    if getattr(model, "quant_head", None) is not None:  # the tied head's q8_0 copy (model/quant.py)
        from mptkit.model.quant import QuantLinear

        around.append(("quant_head", model.quant_head, QuantLinear))
    for name, m, types in around:
        r = plain_reason(m, types)
        if r is not None:
            return ModelCoverage((), f"{name}: {r}")
    blocks = tuple(block_coverage(b) for b in t.blocks)
    for i, c in enumerate(blocks):
        if not c.fast:
            return ModelCoverage(blocks, f"transformer.blocks.{i}.{c.reason}")
    return ModelCoverage(blocks)


__all__ = [
    "BlockCoverage",
    "FastPathOptions",
    "ModelCoverage",
    "attention_reason",
    "block_coverage",
    "env_flag",
    "linear_types",
    "mlp_reason",
    "model_coverage",
    "plain_reason",
]
