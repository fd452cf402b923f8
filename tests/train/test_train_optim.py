"""Optimizers and schedules against their published formulas, written out independently here."""

from __future__ import annotations

import math

import pytest
import torch

from mptkit.train.config import Duration
from mptkit.train.optim import DecoupledAdamW, DecoupledLionW, build_optimizer
from mptkit.train.schedule import build_schedule


def _to_b(d: Duration) -> int:
    assert d.unit == "ba"
    return int(d.value)


@pytest.mark.parametrize("alpha_f", [0.0, 0.1])
def test_cosine_linear_constant_schedules_match_formulas(alpha_f):
    """Warmup t/t_w, then cosine / linear decay to alpha_f at t_max, or constant."""
    tw, tm = 10, 110
    cos = build_schedule({"name": "cosine_with_warmup", "t_warmup": "10ba", "alpha_f": alpha_f}, max_steps=tm,
                         to_batches=_to_b)
    lin = build_schedule({"name": "linear_decay_with_warmup", "t_warmup": "10ba", "alpha_f": alpha_f},
                         max_steps=tm, to_batches=_to_b)
    const = build_schedule({"name": "constant_with_warmup", "t_warmup": "10ba"}, max_steps=tm, to_batches=_to_b)
    for t in [0, 1, 5, 9, 10, 11, 50, 60, 109, 110, 200]:
        if t < tw:
            want = t / tw
            assert cos(t) == pytest.approx(want) and lin(t) == pytest.approx(want) and const(t) == pytest.approx(want)
            continue
        tau = min((t - tw) / (tm - tw), 1.0)
        assert cos(t) == pytest.approx(alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * tau)))
        assert lin(t) == pytest.approx(1 - (1 - alpha_f) * tau)
        assert const(t) == pytest.approx(1.0)
    assert cos(0) == 0.0 and cos(tm) == pytest.approx(alpha_f)


def test_inv_sqrt_schedule_matches_formula():
    """inv_sqrt_with_warmup: alpha_f + (1-alpha_f)/sqrt((t - t_w + t_s)/t_s), then linear cooldown."""
    s = build_schedule({"name": "inv_sqrt_with_warmup", "t_warmup": "4ba", "t_scale": "4ba", "t_cooldown": "10ba",
                        "alpha_f_decay": 0.1, "alpha_f_cooldown": 0.0}, max_steps=100, to_batches=_to_b)
    for t in [4, 8, 20, 89]:
        assert s(t) == pytest.approx(0.1 + 0.9 / math.sqrt((t - 4 + 4) / 4))
    a_i = 0.1 + 0.9 / math.sqrt((90 - 4 + 4) / 4)
    assert s(95) == pytest.approx(a_i + 0.5 * (0.0 - a_i))
    assert s(100) == pytest.approx(0.0)
    assert s(2) == pytest.approx(0.5)


def _tiny_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 4, generator=g).requires_grad_()
    b = torch.randn(4, generator=g).requires_grad_()
    return w, b


def test_lionw_matches_published_update_rule():
    """Lion (Chen et al. 2023): c = b1*m + (1-b1)*g; p -= lr*sign(c); m = b2*m + (1-b2)*g, with decoupled
    decay p *= 1 - (lr/lr0)*wd on >=2-D weights only. Compared step by step with a reference."""
    w, b = _tiny_params()
    ref_w, ref_b = w.detach().clone(), b.detach().clone()
    m_w, m_b = torch.zeros_like(ref_w), torch.zeros_like(ref_b)
    lr0, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    opt = DecoupledLionW([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr0,
                         betas=(b1, b2))
    g = torch.Generator().manual_seed(1)
    for step, mult in enumerate([1.0, 0.5, 0.25, 1.0]):
        gw, gb = torch.randn(5, 4, generator=g), torch.randn(4, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = lr0 * mult
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        lr = lr0 * mult
        for ref, m, grad, decay in ((ref_w, m_w, gw, wd), (ref_b, m_b, gb, 0.0)):
            ref.mul_(1 - (lr / lr0) * decay)
            c = b1 * m + (1 - b1) * grad
            ref.sub_(lr * torch.sign(c))
            m.copy_(b2 * m + (1 - b2) * grad)
        torch.testing.assert_close(w.detach(), ref_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.detach(), ref_b, rtol=0, atol=1e-6)


def test_decoupled_adamw_matches_reference():
    """Decoupled AdamW: p *= 1 - (lr/lr0)*wd; Adam bias-corrected step (reference written out here)."""
    w, _ = _tiny_params(3)
    ref = w.detach().clone()
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    lr0, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-8, 0.01
    opt = DecoupledAdamW([{"params": [w], "weight_decay": wd}], lr=lr0, betas=(b1, b2), eps=eps)
    g = torch.Generator().manual_seed(2)
    for t, mult in enumerate([1.0, 0.3, 0.7], start=1):
        grad = torch.randn(5, 4, generator=g)
        opt.param_groups[0]["lr"] = lr0 * mult
        w.grad = grad.clone()
        opt.step()
        lr = lr0 * mult
        ref.mul_(1 - lr / lr0 * wd)
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        ref.sub_(lr * mhat / (vhat.sqrt() + eps))
        torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-7)


def test_weight_decay_only_on_matrices():
    """Weight decay applies only to >=2-D weights, each once: a step with zero gradients (no Adam/Lion update)
    shrinks every matrix by exactly the decay factor (decoupled: 1 - wd; torch adamw: 1 - lr*wd; the tied
    embedding once, not twice) and leaves norm weights and biases untouched; a step with gradients moves every
    parameter (each is in the optimizer)."""
    from mptkit.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    lr, wd = 0.1, 0.5
    for name, factor in (("decoupled_adamw", 1 - wd), ("decoupled_lionw", 1 - wd), ("adamw", 1 - lr * wd)):
        model = MPTForCausalLM(tiny_cfg(no_bias=False))
        params = dict(model.named_parameters())
        assert any(p.dim() < 2 for p in params.values()) and "transformer.wte.weight" in params
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = build_optimizer(model, {"name": name, "lr": lr, "weight_decay": wd})
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in params.items():
            want = before[n] * factor if p.dim() >= 2 else before[n]
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=f"{name}: {n}")
        moved = {n: p.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = torch.ones_like(p)
        opt.step()
        assert [n for n, p in params.items() if torch.equal(p.detach(), moved[n])] == [], name


def test_decoupled_adamw_fused_equals_loop():
    """The fused kernel path (default) and the per-tensor loop give the same weights and state, with weight
    decay on one group, none on the other, and a changing lr (the decay follows lr / initial_lr)."""
    torch.manual_seed(0)
    ps = [torch.randn(50, 40, requires_grad=True), torch.randn(40, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fused = DecoupledAdamW([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                           lr=0.01)
    loop = DecoupledAdamW([{"params": qs[:1], "weight_decay": 0.1}, {"params": qs[1:], "weight_decay": 0.0}],
                          lr=0.01, fused=False)
    for t in range(6):
        grads = [torch.randn_like(p) for p in ps]
        for opt, params in ((fused, ps), (loop, qs)):
            for g, p in zip(grads, params):
                p.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 - t / 6)
            opt.step()
    for a, b in zip(ps, qs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused.state[a]["exp_avg_sq"], loop.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert float(fused.state[ps[0]]["step"]) == 6.0
    grads = [p.grad for p in ps]
    assert fused._can_fuse(ps) == all(g is not None for g in grads)  # CPU float32: the fused path was used


def _recipe_optimizer(spec: dict, tmp_path):
    """The optimizer the trainer builds from a recipe's ``optimizer`` section (the recipe validation included)."""
    from mptkit.train.trainer import Trainer
    from tests.helpers import datasets, make_cfg

    train, val = datasets()
    return Trainer(make_cfg(tmp_path, optimizer=spec), train_dataset=train, eval_dataset=val).setup().optimizer


def _three_random_steps(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Three steps of ``opt`` on seeded random gradients; its parameters (stepped in place)."""
    ps = [p for g in opt.param_groups for p in g["params"]]
    torch.manual_seed(0)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return ps


def test_recipe_fused_key_selects_the_optimizer_path(tmp_path, monkeypatch):
    """optimizer.fused reaches the optimizer the trainer builds: decoupled_adamw runs torch's fused AdamW
    kernel unless fused: false (the per-tensor loop, which never calls it); adamw gets torch's fused=True or
    the single-tensor foreach=False path, as torch reports in its defaults. Each path takes the same step as
    the other, and a bad value or fused lionw is refused by the recipe check."""
    from mptkit.errors import ConfigError
    from mptkit.train import optim
    from tests.helpers import make_cfg

    calls = []
    real = optim.torch_adamw_functional

    def counting(*a, **k):
        calls.append(k.get("fused"))
        return real(*a, **k)

    monkeypatch.setattr(optim, "torch_adamw_functional", counting)
    params = {}
    for fused in (None, True, False):
        calls.clear()
        opt = _recipe_optimizer({"name": "decoupled_adamw", "lr": 1e-2, "weight_decay": 0.1, "fused": fused},
                                tmp_path / str(fused))
        assert opt.fused is fused
        ps = _three_random_steps(opt)
        assert calls == ([] if fused is False else [True] * 3 * len(opt.param_groups)), fused
        params[fused] = [p.detach().clone() for p in ps]
    for a, b in zip(params[None], params[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(params[None], params[True]))

    steps = {}
    for fused in (None, True):
        opt = _recipe_optimizer({"name": "adamw", "lr": 1e-2, "fused": fused}, tmp_path / f"adamw{fused}")
        assert isinstance(opt, torch.optim.AdamW)
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == ((True, None) if fused else (None, False))
        ps = _three_random_steps(opt)
        steps[fused] = [p.detach().clone() for p in ps]
    for a, b in zip(steps[None], steps[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    with pytest.raises(ConfigError, match="optimizer.fused: expected true, false or null"):
        make_cfg(tmp_path, optimizer={"name": "decoupled_adamw", "fused": "yes"})
    with pytest.raises(ConfigError, match="decoupled_lionw has one implementation"):
        make_cfg(tmp_path, optimizer={"name": "decoupled_lionw", "fused": True})


def test_fused_true_where_torch_cannot_fuse_is_an_error():
    """fused: true never falls back silently: parameters torch's fused kernel cannot take are an error."""
    from mptkit.errors import TrainError

    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    opt = DecoupledAdamW([p], lr=1e-3, fused=True)
    p.grad = torch.randn_like(p)
    with pytest.raises(TrainError, match="optimizer.fused: true.*cpu/float64"):
        opt.step()
    q = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    loop = DecoupledAdamW([q], lr=1e-3)  # the default falls back to the loop for float64
    q.grad = torch.randn_like(q)
    loop.step()
