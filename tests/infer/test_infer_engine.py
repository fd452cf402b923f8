"""Continuous batching: requests that join and leave a running batch (more requests than slots, different
prompt lengths and max_tokens, chunked prefill) get exactly the greedy tokens each gets alone; a cancelled
request frees its slot."""

from __future__ import annotations

import time

import pytest
import torch

from mptkit.errors import InferenceError
from mptkit.infer import Generator, SamplingParams
from mptkit.infer.engine import Engine
from tests.helpers import MATRICES, tiny_model


def test_engine_equals_unbatched_and_cancel():
    gen = Generator(tiny_model(), None)
    eng = Engine(gen, max_batch=3, prefill_chunk=4).start()
    try:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 9)]
        res = {k: [] for k in range(len(prompts))}
        hs = [eng.submit(p, [SamplingParams(max_tokens=10 + k)], lambda ev, k=k: res[k].append(ev.token))
              for k, p in enumerate(prompts)]
        t = time.time()
        while not all(h.finished for h in hs) and time.time() - t < 30:
            time.sleep(0.01)
        for k, p in enumerate(prompts):
            assert res[k] == gen.generate([p], SamplingParams(max_tokens=10 + k))[0].token_ids
        h = eng.submit(prompts[0], [SamplingParams(max_tokens=50, ignore_eos=True)], lambda ev: None)
        eng.cancel(h)
        t = time.time()
        while (eng.num_running or eng.num_waiting) and time.time() - t < 10:
            time.sleep(0.01)
        assert eng.num_running == 0 and eng.num_waiting == 0 and h.finished
    finally:
        eng.stop()


def test_engine_restores_the_interpreter_switch_interval():
    """start() shortens the process-wide GIL switch interval for the engine thread; stop() puts it back."""
    import sys

    before = sys.getswitchinterval()
    gen = Generator(tiny_model(), None)
    eng = Engine(gen, max_batch=1).start()
    assert sys.getswitchinterval() == pytest.approx(min(before, eng.switch_interval))
    assert sys.getswitchinterval() < before
    eng.stop()
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("over", [{}, {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
                                  {"learned_pos_emb": True, "attn_config": {"alibi": False}}],
                         ids=["alibi", "gqa", "learned_pos"])
def test_packed_prefill_equals_one_prompt_at_a_time(over):
    """Several slots' prompt chunks in one forward (the engine's prefill) = each slot prefilled on its own:
    the last-position logits, the cache contents, and the decode steps that follow."""
    model = tiny_model(spread=MATRICES, **over)
    gen = Generator(model, None)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 45, 1)]  # a 41-token chunk too
    a, b = gen.new_cache(slots=3, capacity=8), gen.new_cache(slots=3, capacity=8)  # both grow
    with torch.inference_mode():
        gen.prefill(a, 1, prompts[1][:4])  # slot 1 continues a chunked prefill: it has cached keys already
        gen.prefill(b, 1, prompts[1][:4])
        packed = gen.prefill_packed(a, [(2, prompts[2]), (0, prompts[0]), (1, prompts[1][4:])])
        single = torch.stack([gen.prefill(b, 2, prompts[2]), gen.prefill(b, 0, prompts[0]),
                              gen.prefill(b, 1, prompts[1][4:])])
        torch.testing.assert_close(packed, single, rtol=1e-4, atol=1e-4)
        assert a.lengths == b.lengths == [5, 45, 1]
        for i in range(model.config.n_layers):
            for s, n in enumerate(a.lengths):
                torch.testing.assert_close(a.k[i][s, :, :n], b.k[i][s, :, :n], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a.v[i][s, :, :n], b.v[i][s, :, :n], rtol=1e-5, atol=1e-5)
        toks = [int(x) for x in single.argmax(-1)]
        toks = [toks[1], toks[2], toks[0]]  # slot order 0, 1, 2
        for _ in range(4):
            la, lb = gen.decode(a, toks), gen.decode(b, toks)
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
            toks = lb.argmax(-1).tolist()
    with pytest.raises(InferenceError, match="distinct slots"):
        a.begin_prefill_packed([(0, 2), (0, 3)])


def test_packed_prefill_of_equal_length_prompts():
    """Concurrent new prompts of one length (slots out of order, plus a prompt of another length) packed in one
    forward: the same logits and cache contents as one prompt at a time."""
    gen = Generator(tiny_model(), None)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (6, 9, 6, 6)]
    slots = [3, 1, 0, 2]
    a, b = gen.new_cache(slots=4, capacity=16), gen.new_cache(slots=4, capacity=16)
    with torch.inference_mode():
        packed = gen.prefill_packed(a, list(zip(slots, prompts)))
        single = torch.stack([gen.prefill(b, s, p) for s, p in zip(slots, prompts)])
    torch.testing.assert_close(packed, single, rtol=1e-4, atol=1e-4)
    for i in range(gen.config.n_layers):
        for s in range(4):
            n = a.lengths[s]
            torch.testing.assert_close(a.k[i][s, :, :n], b.k[i][s, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.v[i][s, :, :n], b.v[i][s, :, :n], rtol=1e-5, atol=1e-5)


def test_wakers_run_before_each_forward_and_before_idling():
    """``add_waker``: called on the engine thread as every forward pass starts (so a consumer buffering the
    events can deliver them while the engine computes) and before the engine idles — no event is left
    undelivered once a request is done."""
    gen = Generator(tiny_model(), None)
    log = []
    forwards = []
    for name in ("prefill_packed", "decode"):
        f = getattr(gen, name)
        setattr(gen, name, lambda *a, _f=f, **k: (forwards.append(len(log)), _f(*a, **k))[1])
    eng = Engine(gen, max_batch=2)
    eng.add_waker(lambda: log.append(("wake", len(events))))
    events = []
    eng.start()
    try:
        h = eng.submit([1, 2, 3], [SamplingParams(max_tokens=6, ignore_eos=True)], events.append)
        t = time.time()
        while not (h.finished and log and log[-1] == ("wake", 6)) and time.time() - t < 30:
            time.sleep(0.01)
        assert len(events) == 6 and events[-1].finished
        assert log[-1] == ("wake", 6)  # after the last event, before idling
        # every forward pass was preceded by a wake that saw all events emitted so far
        assert len(forwards) == 6  # one prefill, five decode steps
        for n_log in forwards:
            assert n_log >= 1 and log[n_log - 1][0] == "wake"
        wakes_at_forward = [log[n - 1][1] for n in forwards]
        assert wakes_at_forward == [0, 1, 2, 3, 4, 5]
    finally:
        eng.stop()


def _run(eng, prompt, n):
    out = []
    h = eng.submit(prompt, [SamplingParams(max_tokens=n, ignore_eos=True)], lambda ev: out.append(ev.token))
    t = time.time()
    while not h.finished and time.time() - t < 30:
        time.sleep(0.005)
    assert h.finished
    return h, out


def test_prefix_reuse_prefills_only_what_is_new():
    """A slot keeps its last sequence's keys/values: the next turn of a conversation (prompt = last prompt +
    its answer + new tokens) is placed in that slot and prefills only the tokens it does not hold; its greedy
    tokens equal a fresh generation's; usage counts the cached tokens; ``prefix_reuse=False`` prefills all."""
    gen = Generator(tiny_model(), None)
    fed = []
    orig = gen.prefill_packed
    gen.prefill_packed = lambda cache, segs: (fed.append([len(ids) for _, ids in segs]), orig(cache, segs))[1]
    g = torch.Generator().manual_seed(4)
    p1 = torch.randint(0, 211, (20,), generator=g).tolist()
    extra = torch.randint(0, 211, (3,), generator=g).tolist()
    for reuse in (True, False):
        eng = Engine(gen, max_batch=2, prefix_reuse=reuse).start()
        try:
            fed.clear()
            _h, out1 = _run(eng, p1, 6)
            p2 = p1 + out1 + extra
            h2, out2 = _run(eng, p2, 5)
            held = len(p1) + len(out1) - 1  # the last answer token was sampled, never fed
            assert fed[0] == [len(p1)]
            assert fed[1] == ([len(p2) - held] if reuse else [len(p2)])
            assert h2.cached_tokens == (held if reuse else 0) and eng.prompt_tokens_cached == h2.cached_tokens
            assert out2 == gen.generate([p2], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
            # an unrelated prompt reuses nothing and still generates what it would alone
            fed.clear()
            p3 = torch.randint(0, 211, (9,), generator=g).tolist()
            h3, out3 = _run(eng, p3, 4)
            assert h3.cached_tokens == 0 and fed[0] == [9]
            assert out3 == gen.generate([p3], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
        finally:
            eng.stop()


def test_prefix_reuse_picks_the_slot_holding_the_longest_prefix():
    gen = Generator(tiny_model(), None)
    eng = Engine(gen, max_batch=3).start()
    try:
        g = torch.Generator().manual_seed(5)
        a, b = (torch.randint(0, 211, (12,), generator=g).tolist() for _ in range(2))
        ha = eng.submit(a, [SamplingParams(max_tokens=3, ignore_eos=True)], lambda ev: None)
        hb = eng.submit(b, [SamplingParams(max_tokens=3, ignore_eos=True)], lambda ev: None)
        t = time.time()
        while not (ha.finished and hb.finished) and time.time() - t < 30:
            time.sleep(0.005)
        h, out = _run(eng, b[:10] + [7, 7], 3)
        assert h.cached_tokens == 10  # b's slot, not a's (which shares nothing) nor the empty one
        assert out == gen.generate([b[:10] + [7, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids
    finally:
        eng.stop()


def test_a_waker_returning_false_is_dropped():
    gen = Generator(tiny_model(), None)
    eng = Engine(gen, max_batch=1)
    calls = []
    eng.add_waker(lambda: calls.append("gone") or False)
    eng.add_waker(lambda: calls.append("kept"))
    eng._wake()
    eng._wake()
    assert calls == ["gone", "kept", "kept"] and len(eng._wakers) == 1
