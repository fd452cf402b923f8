"""MPT's norms, feed-forward networks and the pre-LN block."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.model.attention import MPTAttention
from mptkit.model.fastpath import FastPathOptions, mlp_reason


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


class _ChunkedMLP(torch.autograd.Function):
    """``down(gelu(up(x)))`` (no biases) that keeps only ``up(x)`` for backward and runs GELU, the down
    projection and the whole backward in chunks of token rows through two small reused buffers.

    The plain MLP allocates three more (tokens x ffn_hidden) tensors per step (GELU output, its gradient and
    the pre-GELU gradient): 128 MB each at B=8, T=2048, d_ffn=2048, which glibc maps afresh and the CPU
    page-faults in on every step. Here GELU is recomputed in backward from the saved ``up(x)`` (exactly the same
    values) and the weight gradients are summed over chunks (fp32, a different summation order only)."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, chunk):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        n = x2.shape[0]
        h = torch.matmul(x2, w_up.t())
        out = x2.new_empty((n, w_down.shape[0]))
        buf = h.new_empty((min(chunk, n), h.shape[1]))
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            a = torch.ops.aten.gelu.out(h[s:e], approximate="none", out=buf[: e - s])
            torch.matmul(a, w_down.t(), out=out[s:e])
        ctx.save_for_backward(x2, h, w_up, w_down)
        ctx.chunk = chunk
        ctx.shape = shape
        return out.view(*shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, h, w_up, w_down = ctx.saved_tensors
        chunk = ctx.chunk
        n = x2.shape[0]
        dy2 = dy.reshape(n, -1)
        dx = torch.empty_like(x2)
        abuf = h.new_empty((min(chunk, n), h.shape[1]))
        dbuf = torch.empty_like(abuf)
        dwu = dwd = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, dyc, xc = h[s:e], dy2[s:e], x2[s:e]
            a = torch.ops.aten.gelu.out(hc, approximate="none", out=abuf[: e - s])
            if dwd is None:
                dwd = torch.matmul(dyc.t(), a)
            else:
                dwd.addmm_(dyc.t(), a)
            da = torch.matmul(dyc, w_down, out=dbuf[: e - s])
            dh = torch.ops.aten.gelu_backward.grad_input(da, hc, approximate="none", grad_input=abuf[: e - s])
            if dwu is None:
                dwu = torch.matmul(dh.t(), xc)
            else:
                dwu.addmm_(dh.t(), xc)
            torch.matmul(dh, w_up, out=dx[s:e])
        return dx.view(ctx.shape), dwu, dwd, None


def _chunked_mlp_ok(x: torch.Tensor, mlp: MPTMLP, chunk: int) -> bool:
    """CPU training without biases or autocast, rows to chunk: where the chunked MLP pays off; and ``mlp`` and
    its Linears exactly the plain modules whose weights it reads (``fastpath.mlp_reason``: a wrapped or hooked
    Linear, or a subclass, runs the modules' own forward)."""
    return (
        chunk > 0
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and x.numel() // x.shape[-1] > chunk
        and not torch.is_autocast_enabled("cpu")
        and mlp_reason(mlp) is None
        and mlp.up_proj.bias is None
        and mlp.down_proj.bias is None
        and x.dtype == mlp.up_proj.weight.dtype == mlp.down_proj.weight.dtype
    )


class MPTMLP(nn.Module):
    """up_proj -> GELU (exact) -> down_proj (on CPU training: chunked, see ``_ChunkedMLP``; its rows per step
    are ``fast_paths.mlp_chunk``)."""

    def __init__(self, config, fast_paths: FastPathOptions | None = None):
        super().__init__()
        self.fast_paths = fast_paths or FastPathOptions()
        h = config.ffn_hidden_size
        bias = not config.no_bias
        self.up_proj = nn.Linear(config.d_model, h, bias=bias)
        self.down_proj = nn.Linear(h, config.d_model, bias=bias)
        self.down_proj._is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.fast_paths.mlp_chunk
        if _chunked_mlp_ok(x, self, chunk):
            return _ChunkedMLP.apply(x, self.up_proj.weight, self.down_proj.weight, chunk)
        return self.down_proj(F.gelu(self.up_proj(x)))


class MPTGLU(MPTMLP):
    """down_proj(GELU(gate_proj(x)) * up_proj(x)) (llm-foundry's ``mptglu``)."""

    def __init__(self, config, fast_paths: FastPathOptions | None = None):
        super().__init__(config, fast_paths)
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class MPTBlock(nn.Module):
    """Pre-LN block: x + drop(attn(norm_1(x))), then x + drop(ffn(norm_2(x)))."""

    def __init__(self, config, fast_paths: FastPathOptions | None = None):
        super().__init__()
        fast_paths = fast_paths or FastPathOptions()
        make_norm = norm_factory(config)
        self.norm_1 = make_norm(config.d_model)
        self.attn = MPTAttention(config, make_norm, fast_paths)
        self.norm_2 = make_norm(config.d_model)
        self.ffn = (MPTGLU if config.ffn_config["ffn_type"] == "mptglu" else MPTMLP)(config, fast_paths)
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

    def set_fast_paths(self, fast_paths: FastPathOptions) -> None:
        """The options of this block's fast paths (its attention's and FFN's)."""
        for m in (self.attn, self.ffn):
            if isinstance(getattr(m, "fast_paths", None), FastPathOptions):
                m.fast_paths = fast_paths
