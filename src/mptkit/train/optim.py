"""Optimizers: decoupled AdamW and decoupled LionW (MPT-7B's), plus torch's AdamW; parameter groups.

*Decoupled* weight decay (Loshchilov & Hutter; composer / llm-foundry semantics): the decay is not scaled
by the learning rate itself but by the schedule's multiplier ``lr / initial_lr``, so ``weight_decay`` is
the per-step decay fraction at peak lr::

    p <- p * (1 - (lr / initial_lr) * weight_decay)

DecoupledAdamW then applies Adam's bias-corrected update. DecoupledLionW applies Lion (Chen et al. 2023,
"Symbolic Discovery of Optimization Algorithms")::

    c = beta1 * m + (1 - beta1) * g ;  p <- p - lr * sign(c) ;  m <- beta2 * m + (1 - beta2) * g

Weight decay applies only to parameters with two or more dimensions (matrices, embeddings); norms'
weights and biases are not decayed (nanoGPT's rule). The updates are written with plain per-tensor
ops, so a run is bitwise reproducible on CPU at a fixed thread count.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adamw import adamw as torch_adamw_functional

from mptkit.errors import ConfigError, TrainError
from mptkit.train.sections import DEFAULT_BETAS, OptimizerConfig


class DecoupledAdamW(torch.optim.Optimizer):
    """``fused`` (the recipe's ``optimizer.fused``): None (default) = torch's fused AdamW kernel
    (``torch.optim.adamw.adamw(..., fused=True)``) per group where torch has it (CPU/CUDA floating tensors,
    one device), else the loop; less optimizer time than the per-tensor loop (one pass over the weights
    instead of seven); True = the fused kernel, an error where it cannot run; False = the plain
    per-tensor loop below. Both implement the same update and share the state layout (``step``,
    ``exp_avg``, ``exp_avg_sq``), so a checkpoint resumes under either."""

    def __init__(self, params, lr: float = 1e-3, betas=DEFAULT_BETAS["decoupled_adamw"], eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):
        if lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.fused = fused

    def _can_fuse(self, params: list[torch.Tensor]) -> bool:
        if self.fused is False or not params:
            return False
        dev = params[0].device
        ok = all(p.device == dev and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 and not p.grad.is_sparse for p in params) and dev.type in ("cpu", "cuda")
        if not ok and self.fused:
            kinds = sorted({f"{p.device.type}/{str(p.dtype).replace('torch.', '')}" for p in params})
            raise TrainError(f"optimizer.fused: true, but torch's fused AdamW cannot run on these parameters "
                             f"({', '.join(kinds)}; it needs float32/float16/bfloat16 dense tensors on one CPU or "
                             "CUDA device): set optimizer.fused: false (the per-tensor loop) or leave it unset")
        return ok

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            decay = lr / group["initial_lr"] * wd if group["initial_lr"] else 0.0
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._can_fuse(params):
                # torch's AdamW decays p *= 1 - lr * weight_decay: pass weight_decay = decay / lr so that the
                # product is the decoupled decay (lr / initial_lr) * wd
                states = [self.state[p] for p in params]
                for st in states:
                    if st["step"].device != params[0].device:
                        st["step"] = st["step"].to(params[0].device)
                torch_adamw_functional(
                    params, [p.grad for p in params], [st["exp_avg"] for st in states],
                    [st["exp_avg_sq"] for st in states], [], [st["step"] for st in states], fused=True,
                    amsgrad=False, beta1=b1, beta2=b2, lr=lr, weight_decay=(decay / lr) if lr > 0 else 0.0,
                    eps=eps, maximize=False)
                continue
            for p in params:
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                step = int(st["step"].item())
                if decay:
                    p.mul_(1.0 - decay)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                bc1 = 1.0 - b1**step
                bc2 = 1.0 - b2**step
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)
        return loss


class DecoupledLionW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=DEFAULT_BETAS["decoupled_lionw"], weight_decay: float = 0.0):
        if lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            decay = lr / group["initial_lr"] * wd if group["initial_lr"] else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = st["exp_avg"]
                if decay:
                    p.mul_(1.0 - decay)
                update = m.lerp(g, 1.0 - b1).sign_()
                p.add_(update, alpha=-lr)
                m.lerp_(g, 1.0 - b2)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: >= 2-D weights (decayed) and the rest (norm weights, biases: not decayed).

    Tied parameters appear once (``model.parameters()`` deduplicates)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, spec: OptimizerConfig | dict) -> torch.optim.Optimizer:
    """From the recipe's ``optimizer`` section (:class:`mptkit.train.sections.OptimizerConfig`, or its YAML
    mapping: checked and defaulted the same way); ``fused``: true, false or None, never true for
    decoupled_lionw."""
    spec = OptimizerConfig.from_dict(spec)
    name, lr, fused = spec.name, float(spec.lr), spec.fused
    groups = param_groups(model, float(spec.weight_decay))
    betas = tuple(spec.betas)
    if name == "decoupled_adamw":
        return DecoupledAdamW(groups, lr=lr, betas=betas, eps=float(spec.eps), fused=fused)
    if name == "decoupled_lionw":
        return DecoupledLionW(groups, lr=lr, betas=betas)
    if name == "adamw":
        # torch's AdamW: decay scaled by lr (p <- p * (1 - lr * wd)). Default: the single-tensor path
        # (foreach=False, reproducible op by op); fused: true selects torch's fused kernel (fused=True).
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(spec.eps), foreach=False if not fused else None,
                                fused=True if fused else None)
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        return opt
    raise ConfigError(f"optimizer.name: unknown optimizer '{name}' (decoupled_adamw, decoupled_lionw, adamw)")


def set_lr(opt: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every group's lr to ``initial_lr * multiplier``; returns the first group's lr."""
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * multiplier
    return opt.param_groups[0]["lr"]
