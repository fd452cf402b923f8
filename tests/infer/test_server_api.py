"""The OpenAI-compatible server: the official openai client (plain and streaming) works against it, and bad
input gets the documented status codes without killing the server. Starts its own 127.0.0.1 server."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.helpers import bpe_tokenizer, model_folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("uvicorn")
    from mptkit.infer.server import BackgroundServer, ServerLimits, build_server

    folder = tmp_path_factory.mktemp("m")
    fast = bpe_tokenizer(300, sources=("json",))
    model_folder(folder, fast, spread=None, vocab_size=len(fast), max_seq_len=512)
    srv = build_server(str(folder), model_name="tiny", limits=ServerLimits(max_tokens=64, max_body_bytes=20000,
                                                                         max_batch=4, max_queue=8))
    bg = BackgroundServer(srv)
    yield bg.base_url, srv
    bg.stop()


def test_openai_client_plain_and_streaming(server):
    """The official openai client: completions and chat, non-streaming and streaming; usage reported;
    streamed text equals the non-streamed text (greedy)."""
    openai = pytest.importorskip("openai")
    base, _ = server
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="def load(", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="def load(", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    cr = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                   max_completion_tokens=6, temperature=0)
    assert cr.choices[0].message.role == "assistant" and cr.usage.total_tokens > 6
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=6, temperature=0,
        stream=True) if ch.choices]
    assert "".join(parts) == cr.choices[0].message.content
    r2 = c.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0.9, seed=3, n=2, logprobs=2)
    assert len(r2.choices) == 2 and len(r2.choices[0].logprobs.token_logprobs) == 5
    # a second chat turn re-sends the first: a slot still holds its keys/values (usage says how many)
    turn1 = [{"role": "user", "content": "def load(fp, *, cls=None):"}]
    a1 = c.chat.completions.create(model="tiny", messages=turn1, max_completion_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                     {"role": "user", "content": "and dumps?"}]
    a2 = c.chat.completions.create(model="tiny", messages=turn2, max_completion_tokens=6, temperature=0)
    assert 0 < a2.usage.prompt_tokens_details.cached_tokens < a2.usage.prompt_tokens
    m = httpx.get(base + "/metrics").text  # the counter of prompt tokens not prefilled includes this turn's
    cached = int(next(ln.split()[1] for ln in m.splitlines() if ln.startswith("mptkit_prompt_tokens_cached_total ")))
    assert cached >= a2.usage.prompt_tokens_details.cached_tokens
    assert a1.usage.prompt_tokens_details.cached_tokens < a1.usage.prompt_tokens


def test_sse_framing_ends_with_done(server):
    """Raw SSE: every event is `data: {...}` and the last is `data: [DONE]`."""
    base, _ = server
    with httpx.stream("POST", base + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3,
                                                                 "stream": True}, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_bad_inputs(server):
    """Unknown model 404; invalid field 400 naming it; prompt too long 400 with numbers; body too large 413;
    malformed JSON 400; and the server still answers afterwards."""
    base, _ = server
    u = base + "/v1/completions"
    r = httpx.post(u, json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404
    r = httpx.post(u, json={"model": "tiny", "prompt": "a", "temperature": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(u, json={"model": "tiny", "prompt": [5] * 600})
    assert r.status_code == 400 and "600" in r.json()["error"]["message"] and "512" in r.json()["error"]["message"]
    r = httpx.post(u, json={"model": "tiny", "prompt": "a", "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(u, content=b"{" + b"x" * 30000)
    assert r.status_code == 413
    for body in (b"{", b"[]", b"null", b'{"prompt": {}}', b"\xff\xfe", b'{"model": 1, "prompt": 2}'):
        r = httpx.post(u, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (body, r.status_code)
    assert httpx.get(base + "/health").json()["status"] == "ok"
    m = httpx.get(base + "/metrics").text
    assert "mptkit_requests_total" in m and "mptkit_queue_depth" in m



def test_metrics_label_requests_by_the_apps_routes(server):
    """/metrics counts each request under the path of the app's route that matches it (a route added to the
    app gets its own label, a parametrised one its template; a wrong method counts under its route) and every
    path that no route matches under the one label 'other' (unbounded paths make no new series)."""
    from starlette.testclient import TestClient

    from mptkit.infer.server import Server

    _, srv = server
    fresh = Server(srv.engine, model_name="tiny")  # its own counters, the running engine
    asgi = inner = fresh.app()
    while not hasattr(inner, "add_api_route"):  # the FastAPI app inside the middleware
        inner = inner.app
    inner.add_api_route("/v1/extra", lambda: {"ok": True}, methods=["GET"])
    with TestClient(asgi) as c:
        assert c.get("/v1/extra").json() == {"ok": True}
        assert c.get("/v1/models/tiny").status_code == 200
        assert c.get("/v1/completions").status_code == 405
        for path in ("/nope", "/v1/nope", "/v1/extra/x", "/health/"):
            assert c.get(path, follow_redirects=False).status_code in (404, 307), path
        m = c.get("/metrics").text
    found = re.findall(r'mptkit_requests_total\{endpoint="([^"]*)",status="(\d+)"\} (\d+)', m)
    counts = {(ep, st): n for ep, st, n in found}
    assert counts == {("/v1/extra", "200"): "1", ("/v1/models/{name:path}", "200"): "1",
                      ("/v1/completions", "405"): "1", ("other", "404"): "3", ("other", "307"): "1"}, m


def test_unimplemented_completion_fields_are_refused_by_name(server):
    """A non-empty suffix, best_of below n and best_of streamed are a 400 naming the field, never a 200 that
    answers something else; their no-op values, echo alone and logprobs alone are served. (echo with
    logprobs, best_of above n: tests/infer/test_server_logprobs.py.)"""
    base, _ = server
    u = base + "/v1/completions"
    req = {"model": "tiny", "prompt": "def load(", "max_tokens": 3, "temperature": 0}
    for extra, param in (({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
                         ({"suffix": "return x"}, "suffix")):
        r = httpx.post(u, json={**req, **extra})
        assert r.status_code == 400, (extra, r.status_code)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", extra
    plain = httpx.post(u, json=req).json()["choices"][0]["text"]
    for extra in ({"best_of": 1}, {"best_of": None}, {"suffix": ""}, {"suffix": None}):
        r = httpx.post(u, json={**req, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain, extra
    echoed = httpx.post(u, json={**req, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "def load(" + plain and echoed["logprobs"] is None
    lp = httpx.post(u, json={**req, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 3 and "".join(lp["tokens"]) == plain


def test_disconnect_frees_slot(server):
    """A client that disconnects mid-stream has its sequence removed from the running batch."""
    base, srv = server
    with httpx.stream("POST", base + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 64,
                                                                 "stream": True, "ignore_eos": True}, timeout=30) as r:
        next(r.iter_lines())
    t = time.time()
    while srv.engine.num_running and time.time() - t < 10:
        time.sleep(0.05)
    assert srv.engine.num_running == 0
