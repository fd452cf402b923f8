"""Evaluating a quantised model scores the arithmetic its generation runs: the integer path by default (each
quantised linear's input rounded to q8_0 blocks, as llama.cpp's perplexity does), the exact
dequantise-then-matmul one with ``MPTKIT_QUANT_INT_DOT=0``."""

from __future__ import annotations

import pytest
import torch

from mptkit.eval.perplexity import perplexity
from mptkit.infer.quant_kernels import q8_kernels
from mptkit.model import MPTForCausalLM
from mptkit.model.quant import quantize_model
from tests.helpers import round_quant_inputs, tiny_cfg


@pytest.mark.parametrize("quant", ["int8", "q4"])
def test_perplexity_of_a_quantised_model_is_that_of_its_decode_arithmetic(quant, monkeypatch):
    assert q8_kernels() is not None, "the q8 kernel did not build (see the log)"
    torch.manual_seed(0)
    m = MPTForCausalLM(tiny_cfg(d_model=64, n_heads=4, max_seq_len=64)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    quantize_model(m, quant)
    ids = torch.randint(0, m.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    got = perplexity(m, ids, max_seq_len=64, stride=32).loss
    hooks = round_quant_inputs(m)
    try:
        want = perplexity(m, ids, max_seq_len=64, stride=32).loss  # outside any kernel: torch + the rounding
    finally:
        for h in hooks:
            h.remove()
    monkeypatch.setenv("MPTKIT_QUANT_INT_DOT", "0")
    exact = perplexity(m, ids, max_seq_len=64, stride=32).loss
    monkeypatch.delenv("MPTKIT_QUANT_INT_DOT")
    with torch.inference_mode():
        plain = torch.nn.functional.cross_entropy(m(ids[None, :64]).logits[0, :-1], ids[1:64]).item()
    first = perplexity(m, ids[:64], max_seq_len=64).loss  # one window: the plain forward's loss, rounded
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert exact != pytest.approx(got, rel=1e-6, abs=0)  # the two arithmetics differ, and eval follows the option
    monkeypatch.setenv("MPTKIT_QUANT_INT_DOT", "0")
    assert perplexity(m, ids[:64], max_seq_len=64).loss == pytest.approx(plain, rel=1e-5)
    assert first == pytest.approx(plain, rel=0.05)  # the rounding moves the loss a little, not a lot
