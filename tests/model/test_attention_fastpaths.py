"""The training step's fast paths agree with plain references: the fused LM-head loss (buffer reuse, in-place
softmax, row factors folded into the small operands, exact recomputation of near-zero target probabilities,
the upstream-gradient shortcut) and the fused attention block (see each test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mptkit.model.fused_loss import linear_cross_entropy


def _ref(h, w, lab, scale=None):
    logits = F.linear(h, w)
    if scale is not None:
        logits = logits * scale
    return F.cross_entropy(logits.float(), lab)


@pytest.mark.parametrize("upstream", [1.0, 0.3])
@pytest.mark.parametrize("n", [1, 37, 64])
def test_fused_loss_matches_plain_for_chunkings_and_upstream_grads(n, upstream):
    """Loss and both gradients equal the plain cross-entropy for chunk counts that do and do not divide N,
    with the unit upstream gradient (returned without an extra pass) and with another one."""
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    lab = torch.randint(0, 50, (n,), generator=g)
    if n > 3:
        lab[[0, n // 2, n - 1]] = -100
    ref = _ref(h, w, lab)
    gref = torch.autograd.grad(ref * upstream, (h, w))
    got = linear_cross_entropy(h, w, lab, chunk_elems=50 * 5)
    ggot = torch.autograd.grad(got * upstream, (h, w))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_loss_exact_when_target_probability_underflows():
    """A target ~200 nats below the best logit (softmax probability 0 in fp32) still gets its exact loss and
    gradient (the row is recomputed), and an ignored row with such a target does not turn the loss into NaN."""
    h = torch.zeros(4, 8)
    h[:, 0] = 1.0
    w = torch.zeros(30, 8)
    w[5, 0] = 200.0  # class 5 dominates every row
    w[7, 0] = 0.5
    h.requires_grad_(True)
    w.requires_grad_(True)
    lab = torch.tensor([3, 5, 7, -100])
    ref = _ref(h, w, lab)
    gref = torch.autograd.grad(ref, (h, w))
    got = linear_cross_entropy(h, w, lab, chunk_elems=30 * 2)
    ggot = torch.autograd.grad(got, (h, w))
    assert torch.isfinite(got) and ref.item() > 100
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-6)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    lab_ign = torch.tensor([-100, 5, 5, 5])  # the ignored row's (clamped) target has probability 0
    assert torch.isfinite(linear_cross_entropy(h, w, lab_ign))


def test_fused_loss_backward_twice_gives_the_same_gradients():
    """With retain_graph the saved gradients are not consumed or modified: a second backward adds the same."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    lab = torch.randint(0, 40, (20,), generator=g)
    loss = linear_cross_entropy(h, w, lab, chunk_elems=40 * 7)
    loss.backward(retain_graph=True)
    g1 = (h.grad.clone(), w.grad.clone())
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * g1[0])
    torch.testing.assert_close(w.grad, 2 * g1[1])


def test_fused_loss_under_bf16_autocast_matches_plain():
    """Under CPU bf16 autocast the head runs in bf16 (as F.linear would) and the loss stays close to fp32."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(33, 32, generator=g, requires_grad=True)
    w = (torch.randn(64, 32, generator=g) * 0.2).requires_grad_(True)
    lab = torch.randint(0, 64, (33,), generator=g)
    ref = _ref(h, w, lab, scale=0.5)
    gref = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, lab, scale=0.5, chunk_elems=64 * 8)
    ggot = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=1e-2)
    for a, b in zip(ggot, gref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("chunk", [1024, 32])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_qkv_attention_matches_split_path_and_eager(monkeypatch, kv_heads, chunk):
    """MPTAttention's packed path (q, k, v read from the fused qkv, d(qkv) written in one piece) gives the
    same output and gradients (input and both weights) as the split q/k/v path through the same kernel, and
    as the eager reference; with one kernel chunk and with several (chunk 32 at T=80: merged log-sum-exps),
    for MHA and GQA. A call counter proves the packed path ran."""
    from mptkit.model import attention_sdpa_alibi as sa
    from mptkit.model.fastpath import FastPathOptions
    from mptkit.model.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    calls = []
    real = sa.sdpa_alibi_attention_packed
    monkeypatch.setattr(sa, "sdpa_alibi_attention_packed", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    over = {"attn_type": "grouped_query_attention", "kv_n_heads": kv_heads} if kv_heads != 4 else {}
    model = MPTForCausalLM(tiny_cfg(attn_config={"attn_impl": "auto", **over}))
    layer = model.transformer.blocks[0].attn
    slopes = model.alibi_slopes
    x = torch.randn(2, 80, 64)

    def run(packed, impl):
        model.set_fast_paths(FastPathOptions(packed_qkv=packed, sdpa_alibi_chunk=chunk))
        layer.attn_impl = impl
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi, slopes=slopes)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xi.grad, layer.Wqkv.weight.grad, layer.out_proj.weight.grad

    packed = run(True, "auto")
    assert len(calls) == 1 and calls == [chunk]  # the options' chunk reached the kernel
    split = run(False, "auto")
    eager = run(False, "torch")
    assert len(calls) == 1
    for a, b, c in zip(packed, split, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)


def test_packed_qkv_path_not_taken_with_masks_cache_or_qk_ln(monkeypatch):
    """Padding masks, packed sequence ids, qk_ln and a short input keep the split path (which handles them)."""
    from mptkit.model import attention_sdpa_alibi as sa
    from mptkit.model.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    calls = []
    real = sa.sdpa_alibi_attention_packed
    monkeypatch.setattr(sa, "sdpa_alibi_attention_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randint(0, 211, (2, 40))
    m = MPTForCausalLM(tiny_cfg(attn_config={"attn_impl": "auto"}))
    am = torch.ones(2, 40, dtype=torch.long)
    am[0, :3] = 0
    m(x, attention_mask=am)
    m(x[:, :10])
    MPTForCausalLM(tiny_cfg(attn_config={"attn_impl": "auto", "qk_ln": True}))(x)
    assert calls == []
    m(x, attention_mask=torch.ones(2, 40, dtype=torch.long))  # an all-ones mask is no mask
    assert calls == [1, 1]  # one per layer


@pytest.mark.parametrize("chunk", [7, 32])
def test_chunked_mlp_matches_plain_mlp(chunk):
    """The chunked CPU MLP (GELU recomputed in backward, buffers reused per chunk of rows) gives the plain
    up -> GELU -> down output (to fp32 rounding: the BLAS may pick another kernel for a 7-row chunk than for
    the whole matrix, e.g. on AMD EPYC) and the same gradients for the input and both weights (up to the
    summation order of the weight gradients), for chunks that do and do not divide the rows; a whole model
    with gradient checkpointing agrees too."""
    from mptkit.model.fastpath import FastPathOptions
    from mptkit.model.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    model = MPTForCausalLM(tiny_cfg())
    mlp = model.transformer.blocks[0].ffn
    x = torch.randn(2, 45, 64)

    def run(c):
        model.set_fast_paths(FastPathOptions(mlp_chunk=c))
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = mlp(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xi.grad, mlp.up_proj.weight.grad, mlp.down_proj.weight.grad

    plain, chunked = run(0), run(chunk)
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked[1:], plain[1:]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)

    ids = torch.randint(0, 211, (2, 40))
    grads = []
    for c, ckpt in ((0, False), (chunk, True)):
        model.set_fast_paths(FastPathOptions(mlp_chunk=c))
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(ckpt)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
