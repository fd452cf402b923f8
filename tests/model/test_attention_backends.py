"""Every attention backend available here gives the eager reference's outputs and gradients (fp32), for
causal, left-padded and packed inputs, MHA/GQA/MQA, with and without a KV-cache offset; ``auto`` picks
sensibly; backends that cannot run here fail with a clear ConfigError."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from mptkit.errors import ConfigError

A = importlib.import_module("mptkit.model.attention")  # the module (the package re-exports the function)
from mptkit.model.attention_blockwise import blockwise_attention
from mptkit.model.attention_sdpa_alibi import sdpa_alibi_attention

CASES = [
    # (name, heads, kv_heads, tq, tk, padding, packing)
    ("mha-causal", 4, 4, 37, 37, False, False),
    ("gqa-padded", 6, 2, 37, 37, True, False),
    ("mqa-packed", 4, 1, 37, 37, False, True),
    ("gqa-padded-packed", 4, 2, 33, 33, True, True),
    ("mha-kvcache", 4, 4, 9, 41, False, False),
    ("gqa-kvcache-padded", 4, 2, 5, 41, True, False),
    ("decode-one-token", 6, 3, 1, 30, False, False),
]


def _inputs(b, h, hkv, tq, tk, d, padding, packing, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, tq, d, generator=g) * 1.5).requires_grad_()
    k = (torch.randn(b, hkv, tk, d, generator=g) * 1.5).requires_grad_()
    v = torch.randn(b, hkv, tk, d, generator=g).requires_grad_()
    kpm = sid = None
    if padding:
        kpm = torch.ones(b, tk, dtype=torch.bool)
        kpm[0, :7] = False  # left padding in the first row
        kpm[-1, :2] = False
    if packing:
        sid = torch.zeros(b, tk, dtype=torch.long)
        sid[:, tk // 3:] = 1
        sid[-1, 2 * tk // 3:] = 2
    return q, k, v, kpm, sid


def _run(impl, q, k, v, kpm, sid, slopes, **kw):
    return A.attention(q, k, v, slopes=slopes, softmax_scale=0.3, key_padding_mask=kpm, sequence_id=sid,
                       impl=impl, **kw)


def _grads(out, q, k, v, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, (q, k, v), g)


BACKENDS_HERE = ["sdpa", "blockwise", "auto"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", BACKENDS_HERE)
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "noalibi"])
def test_backend_matches_eager_outputs_and_gradients(case, impl, alibi):
    """Outputs and dQ/dK/dV of each backend equal the eager `torch` reference within fp32 tolerance."""
    _, h, hkv, tq, tk, padding, packing = case
    q, k, v, kpm, sid = _inputs(2, h, hkv, tq, tk, 8, padding, packing)
    slopes = A.alibi_slopes(h) if alibi else None
    ref = _run("torch", q, k, v, kpm, sid, slopes)
    gref = _grads(ref, q, k, v)
    got = _run(impl, q, k, v, kpm, sid, slopes)
    ggot = _grads(got, q, k, v)
    assert got.shape == ref.shape == (2, tq, h, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    for a, b, n in zip(ggot, gref, "qkv"):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m, n=n: f"d{n}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_blockwise_with_tiny_blocks_matches_eager(case):
    """Blockwise with blocks smaller than the sequence (many partial, diagonal and skipped blocks) is exact."""
    _, h, hkv, tq, tk, padding, packing = case
    q, k, v, kpm, sid = _inputs(2, h, hkv, tq, tk, 8, padding, packing, seed=3)
    slopes = A.alibi_slopes(h)
    ref = _run("torch", q, k, v, kpm, sid, slopes)
    gref = _grads(ref, q, k, v)
    got = blockwise_attention(q, k, v, slopes=slopes, softmax_scale=0.3, key_padding_mask=kpm, sequence_id=sid,
                              block_q=4, block_k=7)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(_grads(got, q, k, v), gref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_sdpa_alibi_chunked_kernel_matches_eager_for_any_chunk(chunk):
    """ALiBi on the CPU flash kernel (extra head dim + log-sum-exp merge of chunks) is exact, forward and
    backward, however the queries are chunked, with GQA and a KV-cache offset."""
    q, k, v, _, _ = _inputs(2, 6, 2, 29, 40, 16, False, False, seed=5)
    slopes = A.alibi_slopes(6)
    ref = _run("torch", q, k, v, None, None, slopes)
    gref = _grads(ref, q, k, v)
    got = sdpa_alibi_attention(q, k, v, slopes=slopes, softmax_scale=0.3, chunk=chunk)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(_grads(got, q, k, v), gref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_sdpa_alibi_stays_accurate_at_long_length():
    """At T=2048 (slopes up to 1/2, bias up to ~1000) the fused-kernel ALiBi stays close to a float64 eager
    reference: the per-chunk centring keeps the added position term small where it matters."""
    torch.manual_seed(0)
    h, t, d = 4, 2048, 16
    q = torch.randn(1, h, t, d)
    k = torch.randn(1, h, t, d)
    v = torch.randn(1, h, t, d)
    slopes = A.alibi_slopes(h)
    ref = A.eager_attention(q.double(), k.double(), v.double(), slopes=slopes, softmax_scale=d**-0.5)
    got = A.attention(q, k, v, slopes=slopes, softmax_scale=d**-0.5, impl="sdpa")
    assert (got.double() - ref).abs().max().item() < 3e-5


def test_blockwise_memory_does_not_grow_with_t_squared():
    """Blockwise attention keeps its autograd state O(T): saved tensors are the inputs, output and per-row
    log-sum-exp (nothing of size Tq x Tk)."""
    t = 1024
    q, k, v, _, _ = _inputs(1, 2, 2, t, t, 8, False, False)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = blockwise_attention(q, k, v, slopes=A.alibi_slopes(2), softmax_scale=0.3, block_q=128, block_k=128)
    assert out.shape == (1, t, 2, 8)
    assert saved and max(saved) <= 2 * t * 8  # q/k/v/out are 2*t*8; a T x T tensor would be 2*t*t


def test_auto_resolution():
    """`auto` uses sdpa on CPU for plain causal attention at any length (fused kernel, O(T) memory), sdpa
    for short masked inputs, blockwise where a masked T x T bias would be large, sdpa for attention dropout."""
    cpu = torch.device("cpu")
    f32 = torch.float32
    assert A.resolve_impl("auto", cpu, f32, tq=512, tk=512, batch_heads=64) == "sdpa"
    assert A.resolve_impl("auto", cpu, f32, tq=65536, tk=65536, batch_heads=4) == "sdpa"
    assert A.resolve_impl("auto", cpu, f32, tq=256, tk=256, batch_heads=8, masked=True) == "sdpa"
    assert A.resolve_impl("auto", cpu, f32, tq=16384, tk=16384, batch_heads=4, masked=True) == "blockwise"
    assert A.resolve_impl("auto", cpu, f32, tq=16384, tk=16384, batch_heads=4, masked=True, dropout=True) == "sdpa"
    assert A.resolve_impl("triton", cpu, f32, tq=8, tk=8) == "sdpa"
    with pytest.raises(ConfigError, match="not available"):
        A.resolve_impl("nonsense", cpu, f32)


def test_auto_runs_the_backend_it_picks_inside_the_model(monkeypatch):
    """What `auto` picks is what a model with attn_impl auto runs (kernel calls counted, one per layer): plain
    causal attention on CPU stays on sdpa even where a T x T bias would be over the limit; packed
    (sequence_id) or padded inputs go to blockwise once their bias is over BIAS_ELEMS_LIMIT and stay on sdpa
    below it; attention dropout in training runs sdpa even over the limit."""
    from mptkit.model import MPTForCausalLM
    from mptkit.model import attention_sdpa_alibi as sa
    from tests.helpers import tiny_cfg

    calls: list[str] = []
    for name in ("torch", "sdpa", "blockwise"):
        real = A.BACKENDS[name]
        monkeypatch.setitem(A.BACKENDS, name,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    fused = sa.sdpa_alibi_attention_packed  # the sdpa path's fused-qkv variant
    monkeypatch.setattr(sa, "sdpa_alibi_attention_packed",
                        lambda *a, **k: calls.append("sdpa") or fused(*a, **k))
    x = torch.randint(0, 211, (2, 40))
    sid = torch.zeros(2, 40, dtype=torch.long)
    sid[:, 20:] = 1
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[0, :5] = 0
    model = MPTForCausalLM(tiny_cfg(attn_config={"attn_impl": "auto", "attn_uses_sequence_id": True})).eval()
    drop = MPTForCausalLM(tiny_cfg(attn_config={"attn_impl": "auto", "attn_uses_sequence_id": True,
                                                "attn_pdrop": 0.1})).train()

    def run(m, **kw):
        calls.clear()
        with torch.no_grad():
            m(x, **kw)
        return list(calls)

    over = 2 * 4 * 40 * 40 - 1  # batch x heads x T x T: one element more than this limit
    assert run(model, sequence_id=sid) == ["sdpa"] * 2  # under the default limit
    assert run(model, attention_mask=pad) == ["sdpa"] * 2
    monkeypatch.setattr(A, "BIAS_ELEMS_LIMIT", over)
    assert run(model) == ["sdpa"] * 2  # CPU causal: no bias needed
    assert run(model, sequence_id=sid) == ["blockwise"] * 2
    assert run(model, attention_mask=pad) == ["blockwise"] * 2
    assert run(drop, sequence_id=sid) == ["sdpa"] * 2


def test_flash_backend_errors_clearly_without_cuda():
    """`flash` on CPU / fp32 / without flash-attn raises a ConfigError that names the fix."""
    q, k, v, _, _ = _inputs(1, 2, 2, 8, 8, 8, False, False)
    with pytest.raises(ConfigError, match="CUDA"):
        A.attention(q, k, v, slopes=A.alibi_slopes(2), softmax_scale=0.3, impl="flash")


def test_flex_backend_refuses_cpu_training_clearly():
    """Compiled FlexAttention has no CPU backward in this torch: asking for it with grads is a ConfigError."""
    q, k, v, _, _ = _inputs(1, 2, 2, 8, 8, 8, False, False)
    with pytest.raises(ConfigError, match="backward"):
        A.attention(q, k, v, slopes=A.alibi_slopes(2), softmax_scale=0.3, impl="flex")


def test_flex_uncompiled_matches_eager():
    """The flex score_mod/mask_mod encode the same semantics (ALiBi, causal offset, padding, packing, GQA);
    checked uncompiled (fast)."""
    import warnings

    from mptkit.model.fastpath import FastPathOptions

    uncompiled = FastPathOptions(flex_compile=False)

    for case in (CASES[1], CASES[3], CASES[5]):
        _, h, hkv, tq, tk, padding, packing = case
        q, k, v, kpm, sid = _inputs(2, h, hkv, tq, tk, 8, padding, packing)
        with torch.no_grad():
            ref = _run("torch", q, k, v, kpm, sid, A.alibi_slopes(h))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _run("flex", q, k, v, kpm, sid, A.alibi_slopes(h), options=uncompiled)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_flex_compiled_matches_eager_and_buckets_lengths():
    """Compiled flex (CPU, inference) is exact, and two lengths in the same bucket reuse one compilation."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    outs = []
    for t in (100, 120):  # both round up to the 128 bucket
        q, k, v, kpm, _ = _inputs(2, 4, 2, t, t, 16, True, False)
        with torch.no_grad():
            ref = _run("torch", q, k, v, kpm, None, A.alibi_slopes(4))
            got = _run("flex", q, k, v, kpm, None, A.alibi_slopes(4))
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        outs.append(got)
    assert counters["stats"]["unique_graphs"] <= 1


def test_attn_impl_values_come_from_the_backend_registry(monkeypatch):
    """The config's attn_impl values are "auto", the registry's backends and "triton": a backend added with
    register_backend is accepted by the config and by set_attn_impl (and its function is what the model runs),
    an unknown name is refused naming the same list."""
    from mptkit.model import MPTConfig
    from mptkit.model.config import ATTN_IMPLS
    from tests.helpers import tiny_cfg, tiny_model

    assert ATTN_IMPLS == ("auto", "torch", "sdpa", "flex", "flash", "blockwise", "triton")
    calls = []
    monkeypatch.setitem(A.BACKENDS, "mine", lambda *a, **k: calls.append(1) or A.eager_attention(*a, **k))
    mine = tiny_model(attn_config={"attn_impl": "mine"})
    ref = tiny_model(attn_config={"attn_impl": "torch"})
    x = torch.randint(0, 211, (2, 12))
    with torch.no_grad():
        assert torch.equal(mine(x).logits, ref(x).logits) and len(calls) == 2  # one call per layer
    ref.set_attn_impl("mine")
    assert ref.config.attn_config["attn_impl"] == "mine"
    listed = "('auto', 'torch', 'sdpa', 'flex', 'flash', 'blockwise', 'mine', 'triton')"
    with pytest.raises(ConfigError, match=re.escape(f"attn_impl 'xformers' is not one of {listed}")):
        MPTConfig.from_dict(tiny_cfg(attn_config={"attn_impl": "xformers"}))
    with pytest.raises(ConfigError, match="attn_impl 'xformers' is not one of"):
        ref.set_attn_impl("xformers")
