"""Long context: a small ALiBi model (d128, 4 layers, 4 heads, max_seq_len 2048) generates to 84k total tokens
(prompt prefilled in chunks, then decode), reporting time and memory (KV cache bytes, peak RSS).

Run: flock /tmp/mptkit-bench.lock python bench/bench_generate_long.py [--total 84000] [--new 64]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=84000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = MPTForCausalLM({"d_model": 128, "n_heads": 4, "n_layers": 4, "max_seq_len": 2048, "vocab_size": 4096,
                            "attn_config": {"alibi": True}}).eval()
    gen = Generator(model, None, max_context=args.total, prefill_chunk=args.chunk)
    prompt = torch.randint(0, 4096, (args.total - args.new,)).tolist()
    t = time.perf_counter()
    out = gen.generate([prompt], SamplingParams(max_tokens=args.new, ignore_eos=True))[0]
    dt = time.perf_counter() - t
    total = len(prompt) + len(out.token_ids)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    kv = 2 * 4 * 4 * 32 * 4 * total
    print(f"total tokens {total} (max_seq_len 2048): prefill {out.time_to_first_token:.1f}s, "
          f"decode {(len(out.token_ids) - 1) / (dt - out.time_to_first_token):.1f} tokens/s at {total} context, "
          f"KV cache {kv / 1e6:.1f} MB, peak RSS {rss:.2f} GB, finish {out.finish_reason}")


if __name__ == "__main__":
    main()
