"""Completions as OpenAI and vLLM define them, for scoring: ``echo`` with ``logprobs`` returns the prompt tokens'
log-probabilities (equal to a full forward's fp32 ``log_softmax`` and to ``mptkit eval``'s scoring), ``max_tokens:
0`` scores only, prompts come as lists of strings or token ids, ``top_logprobs`` equal ``torch.topk`` of the
forward, ``best_of`` returns the best candidates, chat ``logprobs`` have OpenAI's shape, and bad input is a 400
naming the parameter. The server is tests/infer/test_server_api.py's (a tiny model, max_context 512)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.infer.engine import Engine
from mptkit.model import MPTForCausalLM
from tests.helpers import tiny_cfg
from tests.infer.test_server_api import server  # noqa: F401

TEXT = "def dumps(obj, *, skipkeys=False):\n    return obj"
OTHER = "import re\nclass JSONDecodeError(ValueError):"


def _client(base):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)


def _forward_logprobs(srv, ids):
    """(T, V) fp32 log_softmax of one full forward over ``ids`` (no cache)."""
    with torch.inference_mode():
        logits = srv.gen.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def _ids(srv, text):
    return srv.tok.encode(text, add_special_tokens=False)


def _top_dict(srv, lp_row, token, k):
    """OpenAI's top_logprobs entry built from the reference row: the top k, then the token itself."""
    v, i = torch.topk(lp_row, k)
    d = {srv.tok.decode([t]): x for t, x in zip(i.tolist(), v.tolist())}
    d.setdefault(srv.tok.decode([token]), float(lp_row[token]))
    return d


def test_openai_client_echo_scores_the_prompt_as_a_full_forward(server):  # noqa: F811
    """completions.create(echo=True, logprobs=1, max_tokens=0) through the official client: the prompt back,
    its tokens' log-probabilities equal to a full forward's (first None), nothing generated; a second identical
    request (a slot now holds the prompt's keys/values) scores every token again, the same."""
    base, srv = server
    c = _client(base)
    ids = _ids(srv, TEXT)
    ref = _forward_logprobs(srv, ids)
    for _ in range(2):
        r = c.completions.create(model="tiny", prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
        ch = r.choices[0]
        assert ch.text == TEXT and ch.finish_reason == "length"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
        lp = ch.logprobs
        assert "".join(lp.tokens) == TEXT and len(lp.tokens) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
        for t in range(1, len(ids)):  # logprobs=1: the most likely token and the prompt's own
            top = lp.top_logprobs[t]
            assert top == pytest.approx(_top_dict(srv, ref[t - 1], ids[t], 1), abs=1e-4)
    r = c.completions.create(model="tiny", prompt=TEXT, echo=True, max_tokens=0)  # the prompt back, unscored
    assert r.choices[0].text == TEXT and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


def test_server_scoring_equals_mptkit_eval(server):  # noqa: F811
    """The per-token log-probabilities the server returns for a text equal mptkit eval's scorer
    (mptkit.eval.scoring.next_token_logprobs) on the same tokens."""
    from mptkit.eval.scoring import next_token_logprobs

    base, srv = server
    for text in (TEXT, OTHER):
        ids = _ids(srv, text)
        r = httpx.post(
            base + "/v1/completions",
            json={"model": "tiny", "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0},
            timeout=60,
        )
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        logp, _ = next_token_logprobs(srv.gen.model, torch.tensor([ids]))
        assert got[0] is None and got[1:] == pytest.approx(logp.tolist(), abs=1e-4)


def test_echo_logprobs_with_generation_and_top_k(server):  # noqa: F811
    """echo + logprobs=5 + max_tokens=4 (greedy): the prompt's tokens then the 4 new ones, each position's
    top_logprobs the forward's top 5 (and the token itself), over the full text (prompt + generated) forward."""
    base, srv = server
    ids = _ids(srv, OTHER)
    body = {
        "model": "tiny",
        "prompt": OTHER,
        "echo": True,
        "logprobs": 5,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    ch = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 and ch["text"].startswith(OTHER)
    gen_text = ch["text"][len(OTHER) :]
    full = ids + [int(torch.argmax(_forward_logprobs(srv, ids)[-1]))]  # the first greedy token
    for _ in range(3):
        full.append(int(torch.argmax(_forward_logprobs(srv, full)[-1])))
    assert srv.tok.decode(full[len(ids) :]) == gen_text
    ref = _forward_logprobs(srv, full)
    assert lp["token_logprobs"][1:] == pytest.approx(
        [float(ref[t - 1, full[t]]) for t in range(1, len(full))], abs=1e-4
    )
    for t in range(1, len(full)):
        assert lp["top_logprobs"][t] == pytest.approx(_top_dict(srv, ref[t - 1], full[t], 5), abs=1e-4)
        assert len(lp["top_logprobs"][t]) <= 6
    # streamed: the first chunk carries the prompt and its scores; the chunks add up to the same answer
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        import json

        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    chs = [x["choices"][0] for x in chunks]
    assert chs[0]["text"].startswith(OTHER) and chs[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(x["text"] for x in chs) == ch["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for x in chs for v in x["logprobs"][key]] == lp[key], key
    assert chs[-1]["finish_reason"] == "length"


def test_list_prompts_and_token_ids(server):  # noqa: F811
    """A list of strings, a list of token-id lists and one token list: one choice per prompt x n at index
    i * n + j, each prompt scored as its own full forward, usage summed over the prompts (each once)."""
    base, srv = server
    c = _client(base)
    a, b = _ids(srv, TEXT), _ids(srv, OTHER)
    r = c.completions.create(
        model="tiny",
        prompt=[TEXT, OTHER],
        n=2,
        echo=True,
        logprobs=0,
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(a) + len(b) and r.usage.completion_tokens == 8
    for ch in r.choices:
        text, ids = (TEXT, a) if ch.index // 2 == 0 else (OTHER, b)
        assert ch.text.startswith(text) and len(ch.logprobs.tokens) == len(ids) + 2
        ref = _forward_logprobs(srv, ids)
        assert ch.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(
            [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4
        )
    alone = c.completions.create(
        model="tiny", prompt=OTHER, max_tokens=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[2].text == OTHER + alone.choices[0].text == r.choices[3].text
    streamed = {}  # the same request streamed: each chunk's index is its prompt's i * n + j
    for chunk in c.completions.create(
        model="tiny",
        prompt=[TEXT, OTHER],
        n=2,
        echo=True,
        logprobs=0,
        max_tokens=2,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {ch.index: ch.text for ch in r.choices}
    ids_prompts = [[5, 17, 200, 3, 3, 9], [42, 7]]
    r = httpx.post(
        base + "/v1/completions",
        json={"model": "tiny", "prompt": ids_prompts, "echo": True, "logprobs": 2, "max_tokens": 0},
        timeout=60,
    ).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1] and r["usage"]["prompt_tokens"] == 8
    for ids, ch in zip(ids_prompts, r["choices"]):
        ref = _forward_logprobs(srv, ids)
        assert ch["text"] == srv.tok.decode(ids) and ch["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4
        )
    one = httpx.post(
        base + "/v1/completions",
        json={"model": "tiny", "prompt": ids_prompts[0], "echo": True, "logprobs": 2, "max_tokens": 0},
        timeout=60,
    ).json()
    one_lp, lp0 = one["choices"][0]["logprobs"], r["choices"][0]["logprobs"]  # alone, not packed with another
    assert one_lp["tokens"] == lp0["tokens"] and one_lp["text_offset"] == lp0["text_offset"]
    assert one_lp["token_logprobs"][1:] == pytest.approx(lp0["token_logprobs"][1:], abs=1e-5)
    # the whole context is scored when nothing is generated; one token more does not fit
    u = base + "/v1/completions"
    full = {"model": "tiny", "prompt": [7] * 512, "echo": True, "logprobs": 0, "max_tokens": 0}
    r = httpx.post(u, json=full, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 512
    r = httpx.post(u, json={**full, "prompt": [7] * 513}, timeout=60)
    assert (
        r.status_code == 400
        and r.json()["error"]["param"] == "prompt"
        and "512" in r.json()["error"]["message"]
    )


def test_best_of_returns_the_best_candidates(server):  # noqa: F811
    """best_of=3, n=2 (sampled, seeded): the 2 of the 3 candidates (the same as n=3 with that seed) with the
    highest mean log-probability per token, best first; every candidate's tokens in usage; no logprobs asked,
    none returned."""
    base, _ = server
    c = _client(base)
    kw = {
        "model": "tiny",
        "prompt": "def load(",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
        "extra_body": {"ignore_eos": True},
    }
    cands = c.completions.create(n=3, logprobs=0, **kw)
    means = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in cands.choices]
    order = sorted(range(3), key=lambda i: -means[i])
    assert len({ch.text for ch in cands.choices}) > 1  # the test means something: the candidates differ
    r = c.completions.create(n=2, best_of=3, **kw)
    assert [ch.text for ch in r.choices] == [cands.choices[i].text for i in order[:2]]
    assert [ch.index for ch in r.choices] == [0, 1] and all(ch.logprobs is None for ch in r.choices)
    assert r.usage.completion_tokens == 18
    r1 = c.completions.create(n=1, best_of=3, logprobs=1, **kw)
    assert r1.choices[0].text == cands.choices[order[0]].text and len(r1.choices[0].logprobs.tokens) == 6
    r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a", "best_of": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_chat_logprobs_in_openais_shape(server):  # noqa: F811
    """Chat logprobs=True, top_logprobs=3 through the client: choices[].logprobs.content[] with token, logprob,
    bytes and 3 top_logprobs each (greedy: the chosen token is the first of the top); top_logprobs without
    logprobs is a 400 naming it."""
    base, _ = server
    c = _client(base)
    r = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=3,
        max_completion_tokens=4,
        temperature=0,
    )
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for e in content:
        assert isinstance(e.token, str) and e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert all(t.bytes == list(t.token.encode()) for t in e.top_logprobs)
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_chat_logprobs_equal_mptkit_eval_scoring(server):  # noqa: F811
    """Chat logprobs=True, top_logprobs=4 (greedy) through the client, plain and streamed: the generated tokens are
    a greedy loop of full forwards over the conversation's ChatML ids, each token's logprob equals mptkit eval's
    scorer (next_token_logprobs) on conversation + generated ids, its top_logprobs torch.topk of the forward."""
    from mptkit.eval.scoring import next_token_logprobs

    base, srv = server
    c = _client(base)
    msgs = [{"role": "user", "content": "def dumps(obj):"}]
    ids = srv.chat_ids(msgs)
    gen: list[int] = []
    stops = {srv.tok.eos_token_id, *srv.chat_format.stop_ids}
    while len(gen) < 6 and (not gen or gen[-1] not in stops):
        gen.append(int(torch.argmax(_forward_logprobs(srv, ids + gen)[-1])))
    full = torch.tensor([ids + gen])
    select = torch.zeros(1, full.shape[1] - 1, dtype=torch.bool)
    select[0, len(ids) - 1 :] = True
    want, _ = next_token_logprobs(srv.gen.model, full, select)
    ref = _forward_logprobs(srv, ids + gen)
    kw = {"model": "tiny", "messages": msgs, "logprobs": True, "top_logprobs": 4, "max_completion_tokens": 6}
    plain = c.chat.completions.create(**kw, temperature=0).choices[0].logprobs.content
    streamed = [e for ch in c.chat.completions.create(**kw, temperature=0, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    for content in (plain, streamed):
        assert [e.token for e in content] == [srv.token_str(t) for t in gen]
        assert [e.logprob for e in content] == pytest.approx(want.tolist(), abs=1e-4)
        for i, e in enumerate(content):
            v, ix = torch.topk(ref[len(ids) - 1 + i], 4)
            assert [t.token for t in e.top_logprobs] == [srv.token_str(t) for t in ix.tolist()]
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(v.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logprobs": 21, "echo": True, "max_tokens": 0}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 5]}, "prompt"),
        ({"prompt": [[1, 2], "a"]}, "prompt"),
        ({"prompt": [[1, 2], [3, "x"]]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ({"best_of": 0}, "best_of"),
        ({"chat_top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_inputs_name_the_parameter(server, body, param):  # noqa: F811
    base, _ = server
    if "chat_top_logprobs" in body:
        r = httpx.post(
            base + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": body["chat_top_logprobs"],
            },
        )
    else:
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize(
    "over", [{}, {"learned_pos_emb": True, "attn_config": {"alibi": False}}], ids=["alibi", "learned_pos"]
)
def test_engine_scores_prompts_in_packed_chunks(over):
    """The engine's prompt scores (prompt_logprobs, max_tokens 0 or not) over several prompts prefilled together
    in chunks smaller than the prompts equal a full forward's log_softmax and torch.topk, for both prefill paths
    (packed for ALiBi, one slot at a time for learned positions); Generator.generate scores them the same."""
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_cfg(**over)).eval()
    gen = Generator(model, None, prefill_chunk=4)
    eng = Engine(gen, max_batch=3, prefill_chunk=5).start()
    try:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 9)]
        h = eng.submit_batch(
            [(p, [SamplingParams(max_tokens=k % 2 * 3, prompt_logprobs=3)]) for k, p in enumerate(prompts)],
            lambda ev: None,
        )
        t = time.time()
        while not h.finished and time.time() - t < 30:
            time.sleep(0.01)
        assert h.finished and h.prompt_tokens == sum(map(len, prompts))
        for k, (s, p) in enumerate(zip(h.seqs, prompts)):
            with torch.inference_mode():
                ref = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
            assert len(s.prompt_logprobs) == len(p) and s.prompt_logprobs[0] is None
            assert len(s.output_ids) == k % 2 * 3 and s.finish_reason == "length"
            for i, e in enumerate(s.prompt_logprobs[1:]):
                assert e.token == p[i + 1] and e.logprob == pytest.approx(float(ref[i, p[i + 1]]), abs=1e-5)
                v, ix = torch.topk(ref[i], 3)
                assert [t for t, _ in e.top] == ix.tolist()
                assert [x for _, x in e.top] == pytest.approx(v.tolist(), abs=1e-5)
        outs = gen.generate(prompts, [s.params for s in h.seqs])
        for s, o in zip(h.seqs, outs):
            assert o.token_ids == s.output_ids and len(o.prompt_logprobs) == len(s.prompt_logprobs)
            assert [e.token for e in o.prompt_logprobs[1:]] == [e.token for e in s.prompt_logprobs[1:]]
            got = [e.logprob for e in o.prompt_logprobs[1:]]
            assert got == pytest.approx([e.logprob for e in s.prompt_logprobs[1:]], abs=1e-5)
    finally:
        eng.stop()


def test_lm_eval_loglikelihood_request_shape(server):  # noqa: F811
    """The request lm-eval's local-completions sends for log-likelihoods (token-id prompts = context +
    continuation, echo, logprobs 1, max_tokens 1, greedy) read as lm-eval reads it (the continuation's
    token_logprobs [ctxlen:-1] summed, greedy if each equals its position's top logprob) equals mptkit eval's
    scorer on the continuation tokens."""
    from mptkit.eval.scoring import next_token_logprobs

    base, srv = server
    pairs = [
        (_ids(srv, "def load(fp"), _ids(srv, ", *, cls=None):")),
        (_ids(srv, "import"), _ids(srv, " json")),
    ]
    body = {
        "model": "tiny",
        "prompt": [c + x for c, x in pairs],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
        "seed": 1234,
    }
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    for (ctx, cont), ch in zip(pairs, r.json()["choices"]):
        lps = ch["logprobs"]["token_logprobs"][len(ctx) : -1]
        tops = ch["logprobs"]["top_logprobs"][len(ctx) : -1]
        ids = torch.tensor([ctx + cont])
        select = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        select[0, len(ctx) - 1 :] = True
        logp, am = next_token_logprobs(srv.gen.model, ids, select, greedy=True)
        assert len(lps) == len(cont) and sum(lps) == pytest.approx(float(logp.sum()), abs=1e-4)
        is_greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops))
        assert is_greedy == bool((am == torch.tensor(cont)).all())


def test_sampling_params_bound_prompt_logprobs():
    """prompt_logprobs, like logprobs, is None or 0..MAX_LOGPROBS (20); outside that an error naming it."""
    from mptkit.errors import InferenceError
    from mptkit.infer.sampling import MAX_LOGPROBS

    assert SamplingParams(prompt_logprobs=MAX_LOGPROBS).prompt_logprobs == 20
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InferenceError, match=name):
            SamplingParams(**{name: MAX_LOGPROBS + 1})
        with pytest.raises(InferenceError, match=name):
            SamplingParams(**{name: -1})
