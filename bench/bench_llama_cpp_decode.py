"""llama.cpp's batch-1 decode speed on an mptkit model exported to GGUF (the reference for mptkit's engine).

A random-init MPT model (default d_model 512, 8 layers, 8 heads, expansion 4, ALiBi) is exported with
``mptkit export gguf`` and run by llama-cpp-python: a 128-token prompt, then 256 greedy tokens. Prints
time-to-first-token, decode tokens/s, and the weight bytes streamed per second (batch-1 decode reads every
weight once per token). Needs ``pip install llama-cpp-python gguf``.

    flock /tmp/mptkit-bench.lock python bench/bench_llama_cpp_decode.py --vocab 50368 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _tokenizer(folder: Path) -> None:
    import inspect
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = inspect.getsource(_json) + inspect.getsource(inspect)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|padding|>").save_pretrained(str(folder))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50368)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from llama_cpp import Llama

    from mptkit.export.gguf import export_gguf
    from mptkit.model import MPTForCausalLM

    torch.manual_seed(0)
    cfg = {"d_model": args.d_model, "n_heads": args.n_heads, "n_layers": args.n_layers, "expansion_ratio": 4,
           "max_seq_len": 2048, "vocab_size": args.vocab, "attn_config": {"alibi": True}}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        model = MPTForCausalLM(cfg).eval()
        params = model.num_params()
        _tokenizer(td / "m")
        model.save_pretrained(td / "m")
        del model
        res = export_gguf(td / "m", td / "m.gguf", dtype=args.dtype)
        llm = Llama(str(td / "m.gguf"), n_ctx=args.prompt + args.new + 8, n_threads=args.threads,
                    n_threads_batch=args.threads, n_batch=512, verbose=False, seed=0)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(2, 400, (args.prompt,), generator=g).tolist()
        ttfts, rates = [], []
        for _ in range(args.repeats):
            llm.reset()
            t0 = time.perf_counter()
            t_first = None
            for n, _tok in enumerate(llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                                  reset=True), 1):
                if n == 1:
                    t_first = time.perf_counter()
                if n == args.new:
                    break
            t_end = time.perf_counter()
            ttfts.append(t_first - t0)
            rates.append((args.new - 1) / (t_end - t_first))
    rate = statistics.median(rates)
    torch.set_num_threads(args.threads)
    buf = torch.ones(256 * 2**20)  # 1 GiB of f32: the machine's read bandwidth, for the roofline
    bw = []
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        bw.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    del buf
    out = {
        "model": f"d{args.d_model}/{args.n_layers}L/{args.n_heads}H vocab {args.vocab}",
        "params": params, "gguf_dtype": args.dtype, "weight_bytes": res.n_bytes, "threads": args.threads,
        "prompt": args.prompt, "new_tokens": args.new,
        "ttft_ms_median": 1e3 * statistics.median(ttfts), "decode_tok_s_median": rate,
        "decode_tok_s_all": [round(r, 1) for r in rates],
        "weight_GB_s": res.n_bytes * rate / 1e9, "read_bandwidth_GB_s_best": max(bw),
        "decode_tok_s_bound": max(bw) * 1e9 / res.n_bytes, "load_avg_1m": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
