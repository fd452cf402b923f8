"""Model-level properties of the attention work: length extrapolation past max_seq_len, the learned-position
limit, the same loss/gradients through every backend, and the fused LM-head loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mptkit.errors import ConfigError
from mptkit.model import MPTForCausalLM
from mptkit.model.fused_loss import linear_cross_entropy
from tests.helpers import tiny_cfg


def test_alibi_model_extrapolates_past_max_seq_len():
    """A model with max_seq_len 64 runs at 256 tokens with finite logits; the first 64 positions' logits are
    those of the 64-token run (causality), and the per-token loss past 64 stays in the range of the loss
    before 64 (ALiBi extrapolates; no blow-up)."""
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_cfg(max_seq_len=64, attn_config={"attn_impl": "auto"})).eval()
    # Train briefly on a periodic sequence so the loss means something.
    x = torch.arange(256).remainder(17).add(3)[None].repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(x[:, :64], labels=x[:, :64]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        long = model(x).logits
        short = model(x[:, :64]).logits
    assert long.shape == (2, 256, 211)
    assert torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :64], short, atol=1e-4, rtol=1e-4)
    tok_loss = F.cross_entropy(long[:, :-1].reshape(-1, 211), x[:, 1:].reshape(-1), reduction="none").view(2, -1)
    inside, outside = tok_loss[:, 20:63].mean().item(), tok_loss[:, 64:].mean().item()
    assert inside < 1.0, inside  # it learnt the pattern
    assert outside < 2 * inside + 0.5, (inside, outside)  # and still predicts it at 4x the training length


def test_learned_position_model_errors_past_its_table():
    """Without ALiBi, learned positions have no entry past max_seq_len: a clear ConfigError, not an index error."""
    model = MPTForCausalLM(tiny_cfg(max_seq_len=32, learned_pos_emb=True, attn_config={"alibi": False})).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 32, dtype=torch.long)).logits).all()
        with pytest.raises(ConfigError, match="max_seq_len=32"):
            model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("impl", ["sdpa", "blockwise", "auto"])
@pytest.mark.parametrize("variant", ["causal", "padded", "packed-gqa"])
def test_model_loss_and_grads_match_eager_through_each_backend(impl, variant):
    """A whole model (loss and every parameter gradient) agrees with the eager backend."""
    over = {"attn_config": {"attn_impl": "torch"}}
    if variant == "packed-gqa":
        over = {"attn_config": {"attn_impl": "torch", "attn_uses_sequence_id": True,
                                "attn_type": "grouped_query_attention", "kv_n_heads": 2}}
    torch.manual_seed(0)
    ref = MPTForCausalLM(tiny_cfg(**over))
    other = MPTForCausalLM(tiny_cfg(**over))
    other.load_state_dict(ref.state_dict())
    other.set_attn_impl(impl)
    x = torch.randint(0, 211, (2, 48))
    kw = {}
    if variant == "padded":
        am = torch.ones(2, 48, dtype=torch.long)
        am[0, :9] = 0
        kw["attention_mask"] = am
    if variant == "packed-gqa":
        sid = torch.zeros(2, 48, dtype=torch.long)
        sid[:, 20:] = 1
        kw["sequence_id"] = sid
    la = ref(x, labels=x, **kw).loss
    lb = other(x, labels=x, **kw).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    for (n, pa), (_, pb) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=2e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_fused_linear_cross_entropy_matches_plain():
    """The chunked LM-head loss equals cross_entropy(linear(h, w) * scale) with ignored rows, in value and in
    both gradients (scaled by an arbitrary upstream gradient), for chunks that do not divide N."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    lab = torch.randint(0, 50, (37,), generator=g)
    lab[[3, 10, 36]] = -100
    ref = F.cross_entropy(F.linear(h, w) * 0.7, lab)
    gref = torch.autograd.grad(ref * 2.5, (h, w))
    got = linear_cross_entropy(h, w, lab, scale=0.7, chunk_elems=50 * 6)
    ggot = torch.autograd.grad(got * 2.5, (h, w))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_return_logits_false_gives_same_loss_and_grads():
    """model(x, labels=x, return_logits=False) (fused loss, no logits kept) = the plain loss and gradients."""
    torch.manual_seed(0)
    a = MPTForCausalLM(tiny_cfg(tie_word_embeddings=False, logit_scale=0.5))
    b = MPTForCausalLM(tiny_cfg(tie_word_embeddings=False, logit_scale=0.5))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 211, (2, 30))
    labels = x.clone()
    labels[0, :5] = -100
    oa = a(x, labels=labels)
    ob = b(x, labels=labels, return_logits=False)
    assert ob.logits is None and oa.logits is not None
    oa.loss.backward()
    ob.loss.backward()
    assert abs(oa.loss.item() - ob.loss.item()) < 1e-5
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
