"""Bounded, seeded fuzz of the API: 150 random malformed/odd bodies to both generation endpoints never give a
5xx and never kill the server (it still answers /health and a real request afterwards)."""

from __future__ import annotations

import json
import random

import httpx

from tests.infer.test_server_api import server  # noqa: F401


def _value(rng, depth=0):
    kinds = ["int", "float", "str", "none", "bool", "list", "dict", "big", "neg"]
    k = rng.choice(kinds if depth < 2 else kinds[:5])
    return {"int": lambda: rng.randint(-5, 5), "float": lambda: rng.uniform(-3, 3), "str": lambda: "x" * rng.randint(0, 5),
            "none": lambda: None, "bool": lambda: rng.random() < 0.5, "big": lambda: 10**rng.randint(3, 30),
            "neg": lambda: -rng.random(),
            "list": lambda: [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {"role": _value(rng, depth + 1), "content": _value(rng, depth + 1)}}[k]()


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "logprobs", "stream", "presence_penalty", "frequency_penalty", "min_p", "max_completion_tokens",
          "top_logprobs", "stream_options", "echo"]


def test_fuzz_never_5xx(server):  # noqa: F811
    base, _ = server
    rng = random.Random(0)
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(150):
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            body = {"model": "tiny", "max_tokens": 2}
            for f in rng.sample(FIELDS, rng.randint(1, 5)):
                body[f] = _value(rng)
            raw = json.dumps(body).encode()
            if i % 10 == 0:
                raw = raw[: rng.randint(0, len(raw))]  # truncated JSON
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, raw, r.status_code, r.text[:300])
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200
