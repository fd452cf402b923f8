"""The fast decode step (``mptkit.infer.decode.FastDecoder``) computes what the model's own forward computes:
for every model feature (MHA/GQA/MQA, learned positions, clip_qkv, qk_ln, GLU, RMSNorm, biases, untied head
with logit_scale, embedding_fraction) its logits match ``model(..., cache=...)`` step by step, at batch 1 and
in a batched step with slots of different lengths, and greedy generation equals full recompute."""

from __future__ import annotations

import pytest
import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM
from tests.conftest import tiny_cfg

CONFIGS = {
    "mha": {},
    "gqa": {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    "mqa": {"attn_config": {"attn_type": "multiquery_attention"}},
    "learned_pos": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "clip_qkln_bias": {"no_bias": False, "attn_config": {"clip_qkv": 0.5, "qk_ln": True}},
    "clip_bias": {"no_bias": False, "attn_config": {"clip_qkv": 0.5}},
    "glu_rms": {"norm_type": "rmsnorm", "ffn_config": {"ffn_type": "mptglu"}},
    "lp_rms": {"norm_type": "low_precision_rmsnorm"},
    "untied_scale_embfrac": {"tie_word_embeddings": False, "logit_scale": 0.7, "embedding_fraction": 0.5},
    "3heads_softmax_scale": {"d_model": 48, "n_heads": 3, "attn_config": {"softmax_scale": 0.2}},
}


def _model(over):
    torch.manual_seed(0)
    m = MPTForCausalLM(tiny_cfg(**over)).eval()
    with torch.no_grad():  # larger weights than the init, so that attention and the bias matter
        for n, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_decode_equals_model_forward(name):
    model = _model(CONFIGS[name])
    fast = Generator(model, None)
    slow = Generator(model, None, fast_decode=False)
    assert fast.fast is not None and slow.fast is None
    if fast.fast.small is not None:  # compiled kernels built: standard blocks run as one fused call each
        fused = [L.block is not None for L in fast.fast.layers]
        standard = name in ("mha", "gqa", "mqa", "learned_pos", "clip_bias", "untied_scale_embfrac", "3heads_softmax_scale")
        assert all(fused) if standard else not any(fused)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (7, 3, 12)]
    # batch 1, step by step, logits against the generic forward on an identical cache
    for gen_ in (fast, slow):
        gen_.c = gen_.new_cache(capacity=8)  # grows during the test
    with torch.inference_mode():
        la = fast.prefill(fast.c, 0, prompts[0])
        lb = slow.prefill(slow.c, 0, prompts[0])
        for _ in range(12):
            t = int(lb.argmax())
            la, lb = fast.decode(fast.c, [t])[0], slow.decode(slow.c, [t])[0]
            torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)
        # batched step: three slots of different lengths, the middle one idle in some steps
        for gen_ in (fast, slow):
            gen_.c = gen_.new_cache(slots=3, capacity=16)
            for i, p in enumerate(prompts):
                gen_.prefill(gen_.c, i, p)
        toks = [1, 2, 3]
        for step in range(6):
            active = [True, step % 2 == 0, True]
            la, lb = fast.decode(fast.c, toks, active), slow.decode(slow.c, toks, active)
            for i in range(3):
                if active[i]:
                    torch.testing.assert_close(la[i], lb[i], atol=2e-5, rtol=2e-5)
            toks = [int(x) for x in lb.argmax(-1)]
        assert fast.c.lengths == slow.c.lengths
    # greedy generation equals full recompute
    out = fast.generate([prompts[2]], SamplingParams(max_tokens=15))[0].token_ids
    seq = list(prompts[2])
    with torch.inference_mode():
        for t in out:
            assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == t
            seq.append(t)


def test_fast_decode_steps_aside_in_training_mode_and_restores_onednn():
    """In training mode the generic forward runs (dropout would apply); the oneDNN switch is restored."""
    model = _model({})
    gen = Generator(model, None)
    assert gen.fast.usable()
    model.train()
    assert not gen.fast.usable()
    model.eval()
    before = torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
    gen.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    assert (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()) == before
