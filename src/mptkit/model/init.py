"""MPT's parameter initialisation (``init_config``).

Default (MPT-7B): ``kaiming_normal_`` with ``fan_in`` and ``relu`` gain on every Linear and the
embedding; residual projections (``out_proj``, ``down_proj``, marked ``_is_residual``) divided by
``sqrt(2 * n_layers)`` when ``init_div_is_residual`` is true (a number divides by that number); norms
weight 1 / bias 0; biases 0. The fused Wqkv is initialised slice by slice (Q, K, V).
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import torch
from torch import nn

from mptkit.errors import ConfigError


def _div_is_residual(cfg) -> float:
    v = cfg.init_config.get("init_div_is_residual", True)
    if v is True:
        return math.sqrt(2 * cfg.n_layers)
    if v is False or v is None:
        return 1.0
    if isinstance(v, str):
        if v.isnumeric() or v.replace(".", "", 1).isnumeric():
            return float(v)
        raise ConfigError(f"init_config.init_div_is_residual: expected bool or number, got '{v}'")
    return float(v)


def _weight_init_fn(cfg):
    ic = cfg.init_config
    name = ic["name"]
    gain = float(ic.get("init_gain") or 0.0)
    if name == "kaiming_normal_":
        return partial(nn.init.kaiming_normal_, a=gain, mode=ic.get("fan_mode", "fan_in"),
                       nonlinearity=ic.get("init_nonlinearity", "relu"))
    if name == "kaiming_uniform_":
        return partial(nn.init.kaiming_uniform_, a=gain, mode=ic.get("fan_mode", "fan_in"),
                       nonlinearity=ic.get("init_nonlinearity", "relu"))
    if name in ("xavier_normal_", "xavier_uniform_"):
        fn = nn.init.xavier_normal_ if name == "xavier_normal_" else nn.init.xavier_uniform_
        return partial(fn, gain=gain or 1.0)
    if name == "baseline_":
        std = ic.get("init_std")
        if std is None:
            raise ConfigError("init_config.init_std is required for init_config.name 'baseline_'")
        return partial(nn.init.normal_, mean=0.0, std=float(std))
    if name in ("small_init_", "neox_init_"):
        return partial(nn.init.normal_, mean=0.0, std=math.sqrt(2 / (5 * cfg.d_model)))
    if name == "default_":
        return None
    raise ConfigError(f"init_config.name '{name}' is not supported")


@torch.no_grad()
def init_weights(model: nn.Module, cfg) -> None:
    """Initialise every parameter of an MPT model in place (deterministic under torch.manual_seed)."""
    fn = _weight_init_fn(cfg)
    div = _div_is_residual(cfg)
    ic = cfg.init_config
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if fn is None:
                module.reset_parameters()
            elif getattr(module, "_fused", None) is not None:
                dim, splits = module._fused
                bounds = [0, *splits, module.weight.shape[dim]]
                for s, e in itertools.pairwise(bounds):
                    fn(module.weight.narrow(dim, s, e - s))
            else:
                fn(module.weight)
            if cfg.init_config["name"] == "neox_init_" and getattr(module, "_is_residual", False):
                nn.init.normal_(module.weight, 0.0, 2.0 / (cfg.n_layers * math.sqrt(cfg.d_model)))
            elif getattr(module, "_is_residual", False):
                module.weight.div_(div)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if ic.get("emb_init_std") is not None:
                nn.init.normal_(module.weight, 0.0, float(ic["emb_init_std"]))
            elif ic.get("emb_init_uniform_lim") is not None:
                lim = ic["emb_init_uniform_lim"]
                lo, hi = (-lim, lim) if isinstance(lim, (int, float)) else lim
                nn.init.uniform_(module.weight, float(lo), float(hi))
            elif fn is None:
                module.reset_parameters()
            else:
                fn(module.weight)
        elif hasattr(module, "normalized_shape") and hasattr(module, "weight"):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
