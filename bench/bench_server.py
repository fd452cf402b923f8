"""Server throughput: aggregate tokens/s of 8 concurrent streaming clients vs 1 client, p50/p99 latency.
Model d512/8L/8H (random init, vocab 8192), 64-token prompts, 64 new tokens each (ignore_eos).

Run: flock /tmp/mptkit-bench.lock python bench/bench_server.py [--clients 8] [--new 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time

import httpx
import torch
import uvicorn

from mptkit.infer.engine import Engine
from mptkit.infer.generate import Generator
from mptkit.infer.server import Server, ServerLimits
from mptkit.model import MPTForCausalLM


async def client(base: str, prompt: list[int], new: int) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    async with httpx.AsyncClient(timeout=600) as c:
        async with c.stream("POST", base + "/v1/completions", json={
                "model": "bench", "prompt": prompt, "max_tokens": new, "stream": True, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True}}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    n = json.loads(line[6:])["usage"]["completion_tokens"]
    return time.perf_counter() - t, n


async def wave(base: str, k: int, new: int) -> tuple[float, list[float], int]:
    prompts = [[(7 * i + j) % 8000 + 1 for j in range(64)] for i in range(k)]
    t = time.perf_counter()
    res = await asyncio.gather(*(client(base, p, new) for p in prompts))
    return time.perf_counter() - t, [r[0] for r in res], sum(r[1] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MPTForCausalLM({"d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 2048, "vocab_size": 8192,
                            "attn_config": {"alibi": True}}).eval()
    gen = Generator(model, None)
    eng = Engine(gen, max_batch=max(8, args.clients)).start()
    srv = Server(eng, model_name="bench", limits=ServerLimits(max_batch=max(8, args.clients)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    us = uvicorn.Server(uvicorn.Config(srv.app(), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=us.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    asyncio.run(wave(base, 1, 8))  # warm-up
    dt1, lat1, n1 = asyncio.run(wave(base, 1, args.new))
    dtk, latk, nk = asyncio.run(wave(base, args.clients, args.new))
    r1, rk = n1 / dt1, nk / dtk
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
    print(f"threads={torch.get_num_threads()}")
    print(f"1 client : {r1:7.1f} tokens/s  latency {lat1[0]:.2f}s")
    print(f"{args.clients} clients: {rk:7.1f} tokens/s aggregate  latency p50 {statistics.median(latk):.2f}s "
          f"p99 {q(latk, 0.99):.2f}s  decode steps {eng.steps}")
    print(f"ratio {args.clients} clients / 1 client = {rk / r1:.2f}x")
    us.should_exit = True
    th.join(10)
    eng.stop()


if __name__ == "__main__":
    main()
