"""The fast decode step (``mptkit.infer.decode.FastDecoder``) computes what the model's own forward computes:
for every model feature (MHA/GQA/MQA, learned positions, clip_qkv, qk_ln, GLU, RMSNorm, biases, untied head
with logit_scale, embedding_fraction) its logits match ``model(..., cache=...)`` step by step, at batch 1 and
in a batched step with slots of different lengths, and greedy generation equals full recompute."""

from __future__ import annotations

import pytest
import torch

from mptkit.errors import InferenceError
from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM
from tests.helpers import MATRICES, assert_decode_logits_agree, tiny_cfg, tiny_model

# MATRICES: larger weights than the init, so that attention and the bias matter
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


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_decode_equals_model_forward(name):
    model = tiny_model(spread=MATRICES, **CONFIGS[name])
    fast = Generator(model, None)
    slow = Generator(model, None, fast_decode=False)
    assert fast.fast is not None and slow.fast is None
    if fast.fast.small is not None:  # compiled kernels built: standard blocks run as one fused call each
        fused = [L.block is not None for L in fast.fast.layers]
        standard = name in ("mha", "gqa", "mqa", "learned_pos", "clip_bias", "untied_scale_embfrac", "3heads_softmax_scale")
        assert all(fused) if standard else not any(fused)
        assert (fast.fast.stack is not None) == standard  # and then all of them in one call per step
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (7, 3, 12)]
    # batch 1 step by step and batched slots: logits against the generic forward on an identical cache
    assert_decode_logits_agree(fast, slow, prompts)
    # greedy generation equals full recompute
    out = fast.generate([prompts[2]], SamplingParams(max_tokens=15))[0].token_ids
    seq = list(prompts[2])
    with torch.inference_mode():
        for t in out:
            assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == t
            seq.append(t)


def test_fast_decode_steps_aside_in_training_mode_and_restores_onednn():
    """In training mode the generic forward runs (dropout would apply); the oneDNN switch is restored."""
    model = tiny_model(spread=MATRICES)
    gen = Generator(model, None)
    assert gen.fast.usable()
    model.train()
    assert not gen.fast.usable()
    model.eval()
    before = torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
    gen.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    assert (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()) == before


@pytest.mark.parametrize("name", ["mha", "gqa", "clip_qkln_bias"])
def test_fp16_kv_cache(name):
    """kv_dtype="fp16" on an fp32 model: the cache stores fp16; the fast step (compiled kernels where built,
    which convert on the fly) matches the generic forward on its own fp16 cache — to fp16 rounding: a K/V value
    that differs in its last fp32 bit between the two paths may round to a neighbouring fp16 value — and the
    fp32 cache's logits likewise; greedy batched = unbatched. (The kernels' fp16 arithmetic itself is checked to
    1e-5 in tests/test_infer_kernels.py.)"""
    model = tiny_model(spread=MATRICES, **CONFIGS[name])
    fast = Generator(model, None, kv_dtype="fp16")
    slow = Generator(model, None, kv_dtype="fp16", fast_decode=False)
    ref = Generator(model, None)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (6, 2, 9)]
    with torch.inference_mode():
        caches = {id(x): x.new_cache(slots=3, capacity=8) for x in (fast, slow, ref)}
        assert caches[id(fast)].k[0].dtype == torch.float16 and caches[id(ref)].k[0].dtype == torch.float32
        for x in (fast, slow, ref):
            for i, p in enumerate(prompts):
                x.prefill(caches[id(x)], i, p)
        toks = [1, 2, 3]
        for _ in range(5):
            la, lb, lr = (x.decode(caches[id(x)], toks) for x in (fast, slow, ref))
            torch.testing.assert_close(la, lb, atol=3e-3, rtol=0)
            torch.testing.assert_close(la, lr, atol=3e-2, rtol=0)
            toks = [int(t) for t in lb.argmax(-1)]
    batched = fast.generate(prompts, SamplingParams(max_tokens=8))
    for p, out in zip(prompts, batched):
        assert fast.generate([p], SamplingParams(max_tokens=8))[0].token_ids == out.token_ids
    with pytest.raises(InferenceError, match="kv_dtype"):
        Generator(model, None, kv_dtype="int8")


def test_long_context_decode_with_key_skipping_equals_the_model():
    """Past the reach of a steep ALiBi head (here 8 heads: slope 1/2 reaches ~180 keys) the compiled attention
    skips the keys its bound proves irrelevant; the decode logits still match the model's own forward over
    the whole context, and the cache's bound covers every stored key (prefill and decode writes); a reset
    slot starts from 0."""
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_cfg(d_model=64, n_heads=8, max_seq_len=4096)).eval()
    fast = Generator(model, None)
    slow = Generator(model, None, fast_decode=False)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 211, (700,), generator=g).tolist()
    with torch.inference_mode():
        ca, cb = fast.new_cache(capacity=1024), slow.new_cache(capacity=1024)
        la, lb = fast.prefill(ca, 0, prompt), slow.prefill(cb, 0, prompt)
        for _ in range(4):
            t = int(lb.argmax())
            la, lb = fast.decode(ca, [t])[0], slow.decode(cb, [t])[0]
            torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)
    n = ca.lengths[0]
    for i in range(ca.n_layers):
        true = ca.k[i][0, :, :n].float().norm(dim=-1).amax(-1)
        assert (ca.kmax[i][0] >= true * (1 - 1e-6)).all() and (ca.kmax[i][0] <= true * (1 + 1e-5)).all()
    ca.reset_slot(0)
    assert all(float(km[0].abs().max()) == 0.0 for km in ca.kmax)


def test_long_prefill_with_key_skipping_matches_reading_every_key():
    """Prefill chunks past DecodeOptions.skip_min_past cached tokens leave out, head by head, the keys an ALiBi head gives
    weight 0 (below fp32's smallest denormal): the logits equal those of a cache that reads every key to float
    rounding, and at least one head really skipped keys."""
    from mptkit.infer.cache_attention import CacheAttention
    from mptkit.infer.options import DecodeOptions

    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_cfg(d_model=64, n_heads=8, max_seq_len=4096)).eval()
    gen = Generator(model, None, prefill_chunk=512)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 211, (DecodeOptions().skip_min_past + 700,), generator=g).tolist()
    calls = []
    orig = CacheAttention.prefill_skipping

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        calls.append(out is not None)
        return out

    CacheAttention.prefill_skipping = spy
    try:
        with torch.inference_mode():
            a, b = gen.new_cache(capacity=4096), gen.new_cache(capacity=4096)
            b.skip_far_keys = False
            la, lb = gen.prefill(a, 0, prompt), gen.prefill(b, 0, prompt)
    finally:
        CacheAttention.prefill_skipping = orig
    assert any(calls)  # the chunks past the threshold left keys out
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=2e-5)
    assert int(la.argmax()) == int(lb.argmax())


def test_two_threads_decoding_through_one_generator():
    """One generator, two threads, each with its own cache (the compiled step's layer table is shared and
    locked): every thread's greedy tokens equal its tokens alone."""
    import threading

    model = tiny_model(spread=MATRICES)
    gen = Generator(model, None)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    alone = [gen.generate([p], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids for p in prompts]
    got: dict[int, list[int]] = {}

    def work(i):
        for _ in range(3):
            got[i] = gen.generate([prompts[i]], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
            if got[i] != alone[i]:
                return

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert [got[i] for i in range(len(prompts))] == alone
