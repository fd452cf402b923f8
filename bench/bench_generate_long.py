"""Long context: a small ALiBi model (d128, 4 layers, 4 heads, max_seq_len 2048; or --model FOLDER, e.g. the
StoryWriter recipe's export) generates to 84k total tokens (prompt prefilled in chunks, then decode), reporting
time and memory (KV cache bytes, peak RSS).

``--compare-skip``: prefill and decode the same context again with every key read (ALiBi key skipping switched
off: the prefill's per-head key ranges and the compiled decode attention's) and print both times / rates and
the ratios; the greedy tokens must be the same.

Run: flock /tmp/mptkit-bench.lock python bench/bench_generate_long.py [--total 84000] [--new 64] [--model DIR]
     [--compare-skip]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mptkit.infer import Generator
from mptkit.model import MPTForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=84000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--model", default=None, help="an ALiBi model folder instead of the random-init d128 model")
    ap.add_argument("--compare-skip", action="store_true",
                    help="decode again reading every key (no ALiBi key skipping) and print the ratio")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model:
        from mptkit.model import MPTForCausalLM as M

        model = M.from_pretrained(args.model).eval()
    else:
        model = MPTForCausalLM({"d_model": 128, "n_heads": 4, "n_layers": 4, "max_seq_len": 2048,
                                "vocab_size": 4096, "attn_config": {"alibi": True}}).eval()
    cfg = model.config
    gen = Generator(model, None, max_context=args.total, prefill_chunk=args.chunk)
    prompt = torch.randint(0, cfg.vocab_size, (args.total - args.new,)).tolist()
    cache = gen.new_cache(capacity=args.total)
    t = time.perf_counter()
    logits = gen.prefill(cache, 0, prompt)
    prefill_s = time.perf_counter() - t
    kv = cache.nbytes()

    def decode(c) -> tuple[list[int], float]:
        toks, lg = [], logits
        t0 = time.perf_counter()
        for _ in range(args.new):
            toks.append(int(lg.argmax()))
            lg = gen.decode(c, [toks[-1]])[0]
        return toks, args.new / (time.perf_counter() - t0)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    base = cache.lengths[0]
    toks, rate = decode(cache)
    total = base + len(toks)
    print(f"total tokens {total} (model max_seq_len {cfg.max_seq_len}, {cfg.n_heads} heads): prefill "
          f"{prefill_s:.1f}s, decode {rate:.1f} tokens/s at {total} context, KV cache {kv / 1e6:.1f} MB, "
          f"peak RSS {rss:.2f} GB")
    if args.compare_skip:
        del cache
        full = gen.new_cache(capacity=args.total)
        full.skip_far_keys = False
        t = time.perf_counter()
        logits_full = gen.prefill(full, 0, prompt)
        prefill_full = time.perf_counter() - t
        same_first = int(logits_full.argmax()) == int(logits.argmax())
        logits = logits_full
        toks2, rate2 = decode(full)
        print(f"every key read: prefill {prefill_full:.1f}s, decode {rate2:.1f} tokens/s; with ALiBi key skipping: "
              f"prefill {prefill_s:.1f}s ({prefill_full / prefill_s:.2f}x), decode {rate:.1f} tokens/s "
              f"({rate / rate2:.2f}x); greedy tokens identical: {same_first and toks == toks2}")


if __name__ == "__main__":
    main()
