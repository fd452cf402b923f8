"""Generation core: the KV cache equals full recompute, batched equals unbatched, sampling rules, stops."""

from __future__ import annotations

import pytest
import torch

from mptkit.errors import InferenceError
from mptkit.infer import Generator, SamplingParams, generate_text
from mptkit.io import load_tokenizer
from tests.helpers import tiny_model


def _greedy_recompute(model, ids, n):
    """Reference: step-by-step greedy decoding re-running the whole sequence each step (no cache)."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
    return out


CONFIGS = {
    "alibi_mha": {},
    "alibi_gqa": {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    "alibi_mqa": {"attn_config": {"attn_type": "multiquery_attention"}},
    "learned_pos": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "alibi_3heads_clip": {"d_model": 48, "n_heads": 3, "attn_config": {"clip_qkv": 4.0}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_greedy_equals_full_recompute(name):
    """Proves the cache: greedy tokens with the KV cache equal re-running the full sequence each step,
    and cached logits match full-recompute logits at every step (MHA, GQA, MQA, learned positions)."""
    model = tiny_model(**CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 211, (9,), generator=g).tolist()
    gen = Generator(model, None, prefill_chunk=4)  # chunked prefill exercised too
    out = gen.generate([prompt], SamplingParams(max_tokens=20))[0]
    assert out.token_ids == _greedy_recompute(model, prompt, 20)
    # logits equality along the way
    cache = gen.new_cache(capacity=8)  # forces growth
    logits = gen.prefill(cache, 0, prompt)
    seq = list(prompt)
    with torch.inference_mode():
        for t in out.token_ids[:10]:
            ref = model(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            seq.append(t)
            logits = gen.decode(cache, [t])[0]
    assert cache.capacity > 8


@pytest.mark.parametrize("name", ["alibi_mha", "alibi_gqa", "learned_pos"])
def test_batched_equals_unbatched(name):
    """Batched generation of prompts of different lengths (per-sequence positions, finishing at different
    times) gives exactly the tokens each prompt gets alone."""
    model = tiny_model(**CONFIGS[name])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    params = [SamplingParams(max_tokens=m) for m in (12, 5, 16, 9)]
    gen = Generator(model, None)
    batched = gen.generate(prompts, params)
    for p, sp, b in zip(prompts, params, batched):
        alone = gen.generate([p], sp)[0]
        assert b.token_ids == alone.token_ids
        assert len(b.token_ids) == sp.max_tokens


def test_learned_positions_refuse_past_table_alibi_grows():
    """A learned-position model refuses a context past max_seq_len; an ALiBi model generates past it."""
    learned = tiny_model(**CONFIGS["learned_pos"])
    with pytest.raises(InferenceError, match="max_seq_len"):
        Generator(learned, None, max_context=100)
    gen = Generator(learned, None)
    out = gen.generate([[1] * 60], SamplingParams(max_tokens=50))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # stopped at max_seq_len=64
    alibi = tiny_model()
    gen = Generator(alibi, None, max_context=300)
    out = gen.generate([[1] * 60], SamplingParams(max_tokens=200))[0]
    assert len(out.token_ids) == 200  # 260 tokens > max_seq_len 64


def test_generate_text_and_stops(make_tokenizer):
    """generate_text returns text; stop strings cut the text before the stop; stop ids end generation;
    same seed gives the same sample, different seeds differ."""
    tok = load_tokenizer(make_tokenizer())
    model = tiny_model(vocab_size=len(tok))
    greedy = generate_text(model, tok, "def load(fp):", max_new_tokens=16)
    assert isinstance(greedy, str) and len(greedy) > 0
    gen = Generator(model, tok)
    full = gen.generate(["def load(fp):"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert full.text == tok.decode(full.token_ids)
    stop = full.text[len(full.text) // 2 :][:3]
    if stop.strip():
        cut = gen.generate(["def load(fp):"], SamplingParams(max_tokens=16, stop=[stop], ignore_eos=True))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    sid = full.token_ids[3]
    o = gen.generate(["def load(fp):"], SamplingParams(max_tokens=16, stop_token_ids=[sid], ignore_eos=True))[0]
    assert o.token_ids[-1] == sid and o.finish_reason == "stop" and sid not in o.token_ids[:-1]
    a = generate_text(model, tok, "x", max_new_tokens=12, temperature=1.0, seed=5)
    b = generate_text(model, tok, "x", max_new_tokens=12, temperature=1.0, seed=5)
    c = generate_text(model, tok, "x", max_new_tokens=12, temperature=1.0, seed=6)
    assert a == b and a != c


def test_detokenizer_deltas_join_to_the_decoded_text(make_tokenizer):
    """The incremental detokenizer (through the fast tokenizer's backend) emits deltas that join to exactly
    what the tokenizer's own decode gives, for random token sequences including multi-byte pieces."""
    import random

    from mptkit.infer.generate import Detokenizer

    tok = load_tokenizer(make_tokenizer())
    assert tok.backend_tokenizer is not None  # the fast path is the one under test
    rnd = random.Random(0)
    for _ in range(50):
        ids = [rnd.randrange(len(tok)) for _ in range(rnd.randint(1, 30))]
        d = Detokenizer(tok)
        text = "".join(d.add(t) for t in ids) + d.flush()
        assert text == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
