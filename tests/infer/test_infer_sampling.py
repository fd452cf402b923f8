"""Temperature, top-k, top-p and min-p truncation, checked directly against an independent implementation
(transformers' logits warpers, applied in the same order) and through the sampler's choices: a truncated token
is never drawn, and the kept ones are drawn with the renormalised probabilities."""

from __future__ import annotations

import pytest
import torch

from mptkit.infer.sampling import SamplingParams, SequenceSampler

V = 64


def _reference(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """transformers' warpers, in mptkit's order: temperature, top-k, top-p, min-p."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    x = logits[None].clone()
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in warpers:
        x = w(ids, x)
    return x[0]


CASES = [
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 0.8, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.8},
    {"temperature": 1.1, "top_k": 30, "top_p": 0.95, "min_p": 0.02},
    {"temperature": 0.5, "top_p": 0.3, "min_p": 0.2},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_truncation_equals_transformers_warpers(case):
    """On logits of several spreads, the processed logits keep exactly the tokens transformers' warpers keep,
    with the same values (logits / temperature)."""
    gen = torch.Generator().manual_seed(3)
    for spread in (0.5, 2.0, 6.0):
        logits = torch.randn(V, generator=gen) * spread
        got = SequenceSampler(SamplingParams(seed=0, **case), [], V).process(logits)
        want = _reference(logits, **case)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (spread, case)
        keep = torch.isfinite(want)
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-6, atol=1e-6)
        assert keep.sum() >= 1


def test_draws_follow_the_truncated_distribution():
    """8,000 seeded draws with top-k 6, top-p 0.9 and min-p 0.05: no truncated token is ever drawn, and each
    kept token's frequency is its renormalised probability (within 4 standard errors)."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 2
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05, seed=5)
    probs = torch.softmax(_reference(logits, temperature=0.9, top_k=6, top_p=0.9, min_p=0.05), -1)
    assert 1 < int((probs > 0).sum()) <= 6
    s = SequenceSampler(params, [], V)
    n = 8000
    counts = torch.bincount(torch.tensor([s.choose(logits) for _ in range(n)]), minlength=V).double()
    assert counts[probs == 0].sum() == 0
    freq = counts / n
    se = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 4 * se + 1e-9).all()), (freq[probs > 0], probs[probs > 0])


def test_the_same_seed_draws_the_same_tokens_and_greedy_ignores_truncation():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a = [SequenceSampler(p, [], V).choose(logits) for _ in range(3)]
    s1, s2 = SequenceSampler(p, [], V), SequenceSampler(p, [], V)
    assert [s1.choose(logits) for _ in range(50)] == [s2.choose(logits) for _ in range(50)]
    assert len(set(a)) == 1  # a fresh sampler with the seed draws the same first token
    g = SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)
    assert SequenceSampler(g, [], V).choose(logits) == int(logits.argmax())
