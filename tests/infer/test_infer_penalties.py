"""Repetition / presence / frequency penalties (issue 6's bug: "Inplace update to inference tensor outside
InferenceMode"): they run through ``Generator.generate``, the continuous-batching engine and the HTTP server
without error, choose exactly what a from-scratch reference of the documented rules chooses, and leave the
model's raw logits (what ``logprobs`` reports) untouched."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.infer.engine import Engine
from mptkit.infer.sampling import SequenceSampler
from tests.helpers import tiny_model

PENALTIES = {
    "repetition": {"repetition_penalty": 1.7},
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.7},
    "all": {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.9},
}


def _reference(model, prompt, n, *, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """Greedy with penalties, written out from the documented rules, full recompute each step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = model(torch.tensor([seq])).logits[0, -1].clone()
            for t in set(seq):
                x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
            for t in set(out):
                x[t] -= frequency_penalty * out.count(t) + presence_penalty
            tok = int(x.argmax())
            out.append(tok)
            seq.append(tok)
    return out


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_generate_with_penalties_equals_reference(name):
    """Proves the fix on the generate path: no in-place write into the inference-mode logits, and the
    penalised greedy tokens equal the reference; sampling (temperature > 0) with penalties runs too."""
    model = tiny_model()
    prompt = [5, 9, 5, 17, 3, 9]
    gen = Generator(model, None)
    out = gen.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, **PENALTIES[name]))[0]
    assert out.token_ids == _reference(model, prompt, 12, **PENALTIES[name])
    sampled = gen.generate([prompt], SamplingParams(max_tokens=8, temperature=0.9, seed=3, **PENALTIES[name]))[0]
    assert len(sampled.token_ids) == 8


def test_penalties_do_not_touch_raw_logits_and_logprobs_are_raw():
    """Proves ``process`` writes nothing into its input (inside or outside inference mode) and the reported
    logprob is the raw distribution's, not the penalised one."""
    model = tiny_model()
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    before = logits.clone()
    s = SequenceSampler(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0),
                        [1, 2, 3], 211)
    s.observe(int(logits.argmax()))
    s.choose(logits)  # outside inference mode: used to raise
    with torch.inference_mode():
        s.observe(4)
        s.choose(logits)
    assert torch.equal(logits, before)
    gen = Generator(model, None)
    o = gen.generate([[1, 2, 3]], SamplingParams(max_tokens=1, repetition_penalty=3.0, logprobs=0))[0]
    raw = torch.log_softmax(before.float(), -1)
    assert o.logprobs[0].logprob == pytest.approx(float(raw[o.token_ids[0]]), abs=1e-5)


def test_engine_with_penalties_equals_generate():
    """Proves the engine path (sampler state created on a request thread, used on the engine thread)."""
    gen = Generator(tiny_model(), None)
    eng = Engine(gen, max_batch=2, prefill_chunk=4).start()
    try:
        prompts = [[5, 9, 5, 17], [3, 3, 3], [7, 1, 7, 1, 7]]
        params = [SamplingParams(max_tokens=10, ignore_eos=True, **PENALTIES[k]) for k in ("repetition", "presence", "all")]
        res = {k: [] for k in range(3)}
        hs = [eng.submit(p, [sp], lambda ev, k=k: res[k].append((ev.token, ev.error)))
              for k, (p, sp) in enumerate(zip(prompts, params))]
        t = time.time()
        while not all(h.finished for h in hs) and time.time() - t < 30:
            time.sleep(0.01)
        assert eng.error is None
        for k in range(3):
            assert [e for _, e in res[k]] == [None] * 10
            assert [t for t, _ in res[k]] == gen.generate([prompts[k]], params[k])[0].token_ids
    finally:
        eng.stop()


def test_server_with_penalties(tmp_path):
    """Proves the HTTP path: a greedy completion with all three penalties (plain and streaming) answers 200
    with exactly the reference's penalised tokens (not the unpenalised ones); and serve's --kv-dtype fp16
    reaches the engine's cache: the reported (raw) logprobs are those of a generator with an fp16 cache,
    not of an fp32 one."""
    pytest.importorskip("uvicorn")
    import httpx

    from mptkit.infer.server import BackgroundServer, ServerLimits, build_server

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    prompt = [5, 9, 5, 17]
    pen = {"repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    want = _reference(model, prompt, 8, **pen)
    assert want != _reference(model, prompt, 8)  # the penalties change the greedy choice here
    sp = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0, **pen)
    fp16 = [x.logprob for x in Generator(model, None, kv_dtype="fp16").generate([prompt], sp)[0].logprobs]
    fp32 = [x.logprob for x in Generator(model, None).generate([prompt], sp)[0].logprobs]
    assert max(abs(a - b) for a, b in zip(fp16, fp32)) > 1e-4  # the cache's dtype shows in the logprobs
    srv = build_server(str(tmp_path / "m"), model_name="tiny", limits=ServerLimits(max_tokens=16, max_batch=2),
                       kv_dtype="fp16")
    with BackgroundServer(srv) as bg:
        base = bg.base_url
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logprobs": 0, **pen}
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        lp = r.json()["choices"][0]["logprobs"]  # no tokenizer: each token is reported as its id
        assert [int(t) for t in lp["tokens"]] == want
        assert lp["token_logprobs"] == pytest.approx(fp16, abs=2e-5)
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]" and "error" not in "".join(lines)
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        streamed = [int(t) for c in chunks for ch in c["choices"]
                    for t in (ch.get("logprobs") or {}).get("tokens", [])]
        assert streamed == want
