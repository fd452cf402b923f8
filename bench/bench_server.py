"""Server throughput: aggregate tokens/s of 8 concurrent streaming clients vs 1 client, p50/p99 latency.
Model d512/8L/8H (random init, vocab 8192); two request shapes by default: 64-token prompts with 64 new
tokens each (short generations: the 8 prompts' prefill is ~30% of a wave) and the decode benchmark's shape
(bench_decode.py: 128-token prompts, 256 new tokens); ignore_eos. ``--shapes 64/64`` runs one.

Also the same waves submitted straight to the engine (no HTTP), to separate batching from serving overhead.

Run: flock /tmp/mptkit-bench.lock python bench/bench_server.py [--clients 8] [--shapes 64/64,128/256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx
import torch

from mptkit.infer.engine import Engine
from mptkit.infer.generate import Generator
from mptkit.infer.sampling import SamplingParams
from mptkit.infer.server import BackgroundServer, Server, ServerLimits
from mptkit.model import MPTForCausalLM

CHUNKS = [0]  # SSE data chunks received (all clients)
PROMPT_LEN = [64]  # tokens per prompt (set from --prompt-len, in the client process too)
WAVE = [0]  # waves so far in this process: every wave gets prompts of its own
ROLE = [0]  # 1 in the client process: its waves and the server process's engine-only waves never share prompts


def _prompts(k: int) -> list[list[int]]:
    """``k`` prompts no earlier wave used (they differ from the first token): the engine's slots keep their
    last sequence's keys/values for prompt reuse, and a benchmark must prefill every prompt afresh."""
    WAVE[0] += 1
    first = (2 * WAVE[0] + ROLE[0]) % 8000 + 1  # a token no other wave of this run starts with
    return [[first] + [(WAVE[0] + 7 * i + j) % 8000 + 1 for j in range(PROMPT_LEN[0] - 1)] for i in range(k)]


async def client(c: httpx.AsyncClient, base: str, prompt: list[int], new: int) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    async with c.stream("POST", base + "/v1/completions", json={
            "model": "bench", "prompt": prompt, "max_tokens": new, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}) as r:
        async for line in r.aiter_lines():
            CHUNKS[0] += line.startswith("data: {")
            if line.startswith("data: {") and '"usage"' in line:
                n = json.loads(line[6:])["usage"]["completion_tokens"]
    return time.perf_counter() - t, n


def _dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, i = [], 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[j + 2 : j + 2 + size])
        i = j + 2 + size + 2


async def raw_client(base: str, prompt: list[int], new: int) -> tuple[float, int]:
    """A minimal streaming client on a bare asyncio socket: it reads the SSE stream as it arrives (so the
    server streams to it token by token) but parses it only once, at the end — a load generator should cost
    the machine as little as possible; httpx's per-line parsing costs ~0.1 ms of CPU per chunk here."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new, "stream": True, "ignore_eos": True,
                       "temperature": 0, "stream_options": {"include_usage": True}}).encode()
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
    await writer.drain()
    parts = []
    while data := await reader.read(65536):
        parts.append(data)
    writer.close()
    dt = time.perf_counter() - t
    raw = b"".join(parts)
    head, _, rest = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"server answered {head[:200]!r}")
    events = [ln[6:] for ln in _dechunk(rest).split(b"\n") if ln.startswith(b"data: {")]
    CHUNKS[0] += len(events)
    return dt, json.loads(events[-1])["usage"]["completion_tokens"]


async def wave(base: str, k: int, new: int, raw: bool = True) -> tuple[float, list[float], int]:
    """``k`` clients, each with its own connection. httpx clients are made before the clock starts: building
    an ``httpx.AsyncClient`` costs ~60 ms of CPU (it sets up an SSL context even for http://), client-side
    work that would otherwise be counted against the server, 8 times over in an 8-client wave."""
    prompts = _prompts(k)
    if raw:
        t = time.perf_counter()
        res = await asyncio.gather(*(raw_client(base, p, new) for p in prompts))
        return time.perf_counter() - t, [r[0] for r in res], sum(r[1] for r in res)
    clients = [httpx.AsyncClient(timeout=600) for _ in range(k)]
    try:
        t = time.perf_counter()
        res = await asyncio.gather(*(client(c, base, p, new) for c, p in zip(clients, prompts)))
        return time.perf_counter() - t, [r[0] for r in res], sum(r[1] for r in res)
    finally:
        for c in clients:
            await c.aclose()


def _client_process(conn) -> None:
    """The load generator in a process of its own: real clients are other programs, so their Python (httpx,
    SSE parsing) must not share the server's GIL — it still shares the two cores. Receives (base, k, new),
    answers with wave()'s result and the SSE chunk count; None ends it."""
    ROLE[0] = 1
    while True:
        msg = conn.recv()
        if msg is None:
            return
        base, k, new, raw, PROMPT_LEN[0] = msg
        CHUNKS[0] = 0
        res = asyncio.run(wave(base, k, new, raw))
        conn.send((*res, CHUNKS[0]))


class Clients:
    """``run(k, new)`` -> (seconds, per-client latencies, completion tokens, SSE chunks); clients in a separate
    process by default, or in this one (``in_process``: the setting of the first measurements)."""

    def __init__(self, base: str, in_process: bool, raw: bool):
        self.base, self.in_process, self.raw = base, in_process, raw
        if not in_process:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_client_process, args=(child,), daemon=True)
            self.proc.start()

    def run(self, k: int, new: int):
        if self.in_process:
            CHUNKS[0] = 0
            return (*asyncio.run(wave(self.base, k, new, self.raw)), CHUNKS[0])
        self.conn.send((self.base, k, new, self.raw, PROMPT_LEN[0]))
        return self.conn.recv()

    def close(self) -> None:
        if not self.in_process:
            self.conn.send(None)
            self.proc.join(10)


def _tokenizer(vocab: int):
    """A byte-level BPE trained on standard-library sources, up to ``vocab`` tokens (no network)."""
    import importlib
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = []
    for name in ("json", "inspect", "argparse", "asyncio.base_events", "email.message", "http.client",
                 "logging", "pathlib", "typing", "dataclasses", "collections", "difflib", "textwrap", "unittest.case"):
        text += inspect.getsource(importlib.import_module(name)).splitlines()
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def engine_wave(eng: Engine, k: int, new: int) -> float:
    """The same wave submitted straight to the engine; the caller sleeps on an event until the last token."""
    import threading

    prompts = _prompts(k)
    left = [k]
    done = threading.Event()

    def cb(ev) -> None:  # engine thread
        if ev.finished:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    t = time.perf_counter()
    for p in prompts:
        eng.submit(p, [SamplingParams(max_tokens=new, ignore_eos=True)], cb)
    done.wait()
    return k * new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--shapes", default="64/64,128/256",
                    help="comma-separated PROMPT/NEW token counts, one measurement each")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "fp16"],
                    help="KV cache storage (default: the model's fp32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="paired rounds per shape (default: 7 for generations up to 64 tokens, else 4)")
    ap.add_argument("--clients-in-process", action="store_true", help="run the HTTP clients in the server's "
                    "process (sharing its GIL), as the first measurements did")
    ap.add_argument("--httpx-clients", action="store_true", help="stream with httpx (parsing every SSE line as "
                    "it arrives, ~0.1 ms of CPU per chunk) instead of the bare-socket load generator")
    ap.add_argument("--no-tokenizer", action="store_true", help="token ids only: text deltas are empty, so "
                    "only the final SSE chunk is sent (the setting of the first measurements)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = [tuple(int(v) for v in sh.split("/")) for sh in args.shapes.split(",")]
        if any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
            raise ValueError
    except ValueError:
        ap.error(f"--shapes: expected PROMPT/NEW pairs like 64/64,128/256, got {args.shapes!r}")
    torch.manual_seed(0)
    model = MPTForCausalLM({"d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 2048, "vocab_size": 8192,
                            "attn_config": {"alibi": True}}).eval()
    tok = None
    if not args.no_tokenizer:  # per-token text: every token becomes an SSE chunk, as in real serving
        tok = _tokenizer(model.config.vocab_size)
        print(f"tokenizer: byte-level BPE, {len(tok)} tokens (model vocab {model.config.vocab_size})")
    gen = Generator(model, tok, kv_dtype=args.kv_dtype)
    eng = Engine(gen, max_batch=max(8, args.clients)).start()
    srv = Server(eng, model_name="bench", limits=ServerLimits(max_batch=max(8, args.clients)))
    bg = BackgroundServer(srv)
    base = bg.base_url
    clients = Clients(base, args.clients_in_process, raw=not args.httpx_clients)
    clients.run(1, 8)  # warm-up
    print(f"threads={torch.get_num_threads()} load_avg_1m={os.getloadavg()[0]:.2f} kv={gen.kv_dtype} "
          f"clients: {'httpx' if args.httpx_clients else 'bare asyncio sockets'}, "
          f"{'in the server process' if args.clients_in_process else 'in a separate process'}")
    summary = []
    for prompt_len, new in shapes:
        rounds = args.rounds or (7 if new <= 64 else 4)
        summary.append(measure(clients, eng, args.clients, prompt_len, new, rounds))
    if len(summary) > 1:
        print("summary: " + "; ".join(summary))
    print(f"prompt tokens reused from slots (prefix reuse; every wave's prompts are new, so 0): "
          f"{eng.prompt_tokens_cached}")
    clients.close()
    bg.stop()
    eng.stop()


def measure(clients: Clients, eng: Engine, k: int, prompt_len: int, new: int, rounds: int) -> str:
    PROMPT_LEN[0] = prompt_len
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, round(p * (len(xs) - 1)))]
    print(f"--- prompt {prompt_len} tokens, {new} new tokens, {rounds} paired rounds")
    chunks = 0
    # Rounds of paired waves (1 client, then k clients, back to back): this VM's speed drifts by 2x within
    # minutes, so each round's ratio compares two waves run under the same conditions; the median of the
    # per-round ratios is the figure, the best round of each kind is shown beside it.
    r1s, rks, ratios, lat1s, latks, steps = [], [], [], [], [], 0
    for _ in range(rounds):
        dt1, lat1, n1, c1 = clients.run(1, new)
        s0 = eng.steps
        dtk, latk, nk, ck = clients.run(k, new)
        chunks += c1 + ck
        steps = eng.steps - s0
        r1s.append(n1 / dt1)
        rks.append(nk / dtk)
        ratios.append(rks[-1] / r1s[-1])
        lat1s += lat1
        latks += latk
    med = statistics.median
    print(f"HTTP  1 client : {med(r1s):7.1f} tokens/s median (best {max(r1s):.1f})  latency p50 {med(lat1s):.2f}s")
    print(f"HTTP  {k} clients: {med(rks):7.1f} tokens/s aggregate median (best {max(rks):.1f})  "
          f"latency p50 {med(latks):.2f}s p99 {q(latks, 0.99):.2f}s  decode steps per wave {steps}")
    print(f"ratio {k} clients / 1 client = {med(ratios):.2f}x median of {rounds} paired rounds "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 4x); ratio of the best rounds "
          f"{max(rks) / max(r1s):.2f}x; SSE chunks received {chunks} for {rounds * (1 + k) * new} tokens")
    # the same waves straight into the engine (no HTTP, no event loop): what the batching alone gives
    e = [(engine_wave(eng, 1, new), engine_wave(eng, k, new)) for _ in range(rounds)]
    print(f"engine only: 1 sequence {med([a for a, _ in e]):7.1f} tokens/s, {k} sequences "
          f"{med([b for _, b in e]):7.1f} tokens/s, ratio {med([b / a for a, b in e]):.2f}x median")
    return f"{prompt_len}/{new}: {med(ratios):.2f}x (min {min(ratios):.2f}) over HTTP, engine {med([b / a for a, b in e]):.2f}x"


if __name__ == "__main__":
    main()
