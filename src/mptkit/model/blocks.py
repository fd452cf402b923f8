"""MPT's norms, feed-forward networks and the pre-LN block."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.model.attention import MPTAttention


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm (weight, optional bias)."""


class LPLayerNorm(nn.LayerNorm):
    """MPT's low-precision LayerNorm: under autocast, run in the autocast dtype (input and weights cast),
    with autocast off. Outside autocast it is exactly LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _autocast_dtype(x)
        if dt is None:
            return super().forward(x)
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (MPT's rmsnorm has a weight and no bias)."""

    low_precision = False

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.normalized_shape = (d,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _autocast_dtype(x) if self.low_precision else None
        if dt is None:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.rms_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.eps)


class LPRMSNorm(RMSNorm):
    low_precision = True


NORMS = {
    "layernorm": LayerNorm,
    "low_precision_layernorm": LPLayerNorm,
    "rmsnorm": RMSNorm,
    "low_precision_rmsnorm": LPRMSNorm,
}


def norm_factory(config) -> Callable[[int], nn.Module]:
    cls = NORMS[config.norm_type]
    bias = not config.no_bias
    eps = config.layer_norm_epsilon
    return lambda d: cls(d, eps=eps, bias=bias)


class MPTMLP(nn.Module):
    """up_proj -> GELU (exact) -> down_proj."""

    def __init__(self, config):
        super().__init__()
        h = config.ffn_hidden_size
        bias = not config.no_bias
        self.up_proj = nn.Linear(config.d_model, h, bias=bias)
        self.down_proj = nn.Linear(h, config.d_model, bias=bias)
        self.down_proj._is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MPTGLU(MPTMLP):
    """down_proj(GELU(gate_proj(x)) * up_proj(x)) (llm-foundry's ``mptglu``)."""

    def __init__(self, config):
        super().__init__(config)
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class MPTBlock(nn.Module):
    """Pre-LN block: x + drop(attn(norm_1(x))), then x + drop(ffn(norm_2(x)))."""

    def __init__(self, config):
        super().__init__()
        make_norm = norm_factory(config)
        self.norm_1 = make_norm(config.d_model)
        self.attn = MPTAttention(config, make_norm)
        self.norm_2 = make_norm(config.d_model)
        self.ffn = (MPTGLU if config.ffn_config["ffn_type"] == "mptglu" else MPTMLP)(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        slopes: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        layer_cache=None,
    ) -> torch.Tensor:
        a = self.attn(
            self.norm_1(x), slopes=slopes, key_padding_mask=key_padding_mask, sequence_id=sequence_id,
            layer_cache=layer_cache,
        )
        x = x + self.resid_attn_dropout(a)
        x = x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))
        return x
