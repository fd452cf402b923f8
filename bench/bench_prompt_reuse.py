"""Prompt reuse in the serving engine: time to first token of the turns of a conversation whose every prompt is
the conversation so far (a 1500-token start, then each reply and 20 new tokens), with the engine's prompt reuse
and without (``Engine(prefix_reuse=False)``), side by side in one process; d512/8L/8H random init, fp32.

Run: flock /tmp/mptkit-bench.lock python bench/bench_prompt_reuse.py [--history 1500] [--turns 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from mptkit.infer.engine import Engine
from mptkit.infer.generate import Generator
from mptkit.infer.sampling import SamplingParams
from mptkit.model import MPTForCausalLM


def turn(eng: Engine, prompt: list[int], new: int) -> tuple[float, list[int]]:
    first: list[float] = []
    out: list[int] = []
    done = threading.Event()
    t = time.perf_counter()

    def cb(ev) -> None:  # engine thread
        if ev.token is not None:
            out.append(ev.token)
            if not first:
                first.append(time.perf_counter() - t)
        if ev.finished:
            done.set()

    eng.submit(prompt, [SamplingParams(max_tokens=new, ignore_eos=True)], cb)
    done.wait()
    return first[0], out


def conversation(gen: Generator, reuse: bool, history: int, turns: int, seed: int) -> tuple[list[float], list, int]:
    eng = Engine(gen, max_batch=1, prefix_reuse=reuse).start()
    try:
        g = torch.Generator().manual_seed(seed)
        conv = torch.randint(1, 8000, (history,), generator=g).tolist()
        ttfts, replies = [], []
        for _ in range(turns):
            ttft, out = turn(eng, conv, 16)
            ttfts.append(ttft)
            replies.append(out)
            conv = conv + out + torch.randint(1, 8000, (20,), generator=g).tolist()
        return ttfts, replies, eng.prompt_tokens_cached
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", type=int, default=1500)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = MPTForCausalLM({"d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 2048, "vocab_size": 8192,
                            "attn_config": {"alibi": True}}).eval()
    gen = Generator(model, None)
    later: dict[bool, list[float]] = {True: [], False: []}
    replies_of: dict[tuple[bool, int], list] = {}
    for r in range(args.rounds):
        for reuse in (True, False) if r % 2 == 0 else (False, True):
            ttfts, replies, cached = conversation(gen, reuse, args.history, args.turns, seed=r)
            later[reuse] += ttfts[1:]
            print(f"round {r} prompt reuse {'on ' if reuse else 'off'}: TTFT per turn "
                  f"{', '.join(f'{x * 1e3:.0f}' for x in ttfts)} ms; prompt tokens not prefilled {cached}")
            replies_of[(reuse, r)] = replies
    same = all(replies_of[(True, r)] == replies_of[(False, r)] for r in range(args.rounds))
    on, off = statistics.median(later[True]), statistics.median(later[False])
    print(f"turns after the first: TTFT {on * 1e3:.0f} ms with prompt reuse vs {off * 1e3:.0f} ms without "
          f"({off / on:.1f}x); greedy replies identical: {same}")


if __name__ == "__main__":
    main()
