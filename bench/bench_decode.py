"""Batch-1 decode, side by side in one process: mptkit's KV-cache generator vs llama.cpp (same weights exported
with mptkit's own GGUF exporter, f32 file, f32 KV cache; when ``llama_cpp`` is importable) vs transformers'
``generate`` (same weights, HF folder). d_model 512, 8 layers, 8 heads, 128-token prompt, 256 new tokens, fp32
CPU, greedy, the same prompt token ids and the same thread count for every engine.

Rounds are interleaved (mptkit, llama.cpp, mptkit, llama.cpp, ...) and each engine's best round is reported, so
a noisy neighbour hurts both alike. Reports tokens/s (decode, after the first token), TTFT, whether greedy tokens
match mptkit's for the first N, ratios, and weight bytes streamed per second vs measured read bandwidth (DRAM:
a buffer larger than the L3 cache; cache-resident: a buffer the size of the weights, which fit in L3 here).

Run: flock /tmp/mptkit-bench.lock python bench/bench_decode.py [--threads N] [--vocab 8192] [--new 256] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM


def read_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Best read bandwidth (bytes/s) of a sum over an fp32 buffer of ``nbytes``."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t))
    return best


def tokenizer_folder(folder: Path) -> None:
    """A 400-token byte-level BPE (the GGUF file embeds a tokenizer; the model's vocab is padded past it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_llama_cpp_decode import _tokenizer

    _tokenizer(folder)


def run_mptkit(gen: Generator, prompt: list[int], new: int):
    o = gen.generate([prompt], SamplingParams(max_tokens=new, ignore_eos=True))[0]
    rate = (new - 1) / (o.elapsed - o.time_to_first_token)
    return rate, o.time_to_first_token, o.token_ids


def run_llama(llm, prompt: list[int], new: int):
    """Greedy through llama.cpp's own KV cache: eval the prompt, then one token at a time (argmax of the
    last logits row, as mptkit's greedy)."""
    import llama_cpp
    import numpy as np

    nv = llm.n_vocab()

    def last_argmax() -> int:  # the last evaluated token's logits, read in place (no logits_all copy)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(nv,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    out = [last_argmax()]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([out[-1]])
        out.append(last_argmax())
    t2 = time.perf_counter()
    return (new - 1) / (t2 - t1), t1 - t0, out


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch, llama.cpp and transformers threads")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--match", type=int, default=32, help="compare greedy tokens for the first N")
    ap.add_argument("--hf-new", type=int, default=32, help="tokens for transformers (slow); rate is per token")
    ap.add_argument("--compile", action="store_true", help="also time mptkit with torch.compile'd decode")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    cfg = {"d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 2048, "vocab_size": args.vocab,
           "attn_config": {"alibi": True}}
    model = MPTForCausalLM(cfg).eval()
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, min(400, args.vocab), (args.prompt,), generator=g).tolist()
    print(f"threads={threads} params={model.num_params()/1e6:.1f}M weights={wbytes/1e6:.1f} MB fp32 "
          f"prompt={args.prompt} new={args.new} load_avg_1m={os.getloadavg()[0]:.2f}")

    llm = None
    td = tempfile.TemporaryDirectory()
    folder = Path(td.name) / "m"
    llama_note = None
    if not args.no_llama:
        try:
            import llama_cpp

            from mptkit.export.gguf import export_gguf

            tokenizer_folder(folder)
            model.save_pretrained(folder)
            res = export_gguf(folder, Path(td.name) / "m.gguf", dtype="f32")
            llm = llama_cpp.Llama(str(res.path), n_ctx=args.prompt + args.new + 8, n_threads=threads,
                                  n_threads_batch=threads, n_batch=512, verbose=False, seed=0,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            run_llama(llm, prompt[:16], 4)  # warm-up
        except Exception as e:  # noqa: BLE001 - optional engine
            llama_note = f"{type(e).__name__}: {e}"
            llm = None
    if not folder.exists():
        model.save_pretrained(folder)

    engines: dict[str, Generator] = {"mptkit": Generator(model, None)}
    if args.compile:
        t = time.perf_counter()
        cg = Generator(model, None, compile=True)
        cg.generate([prompt], SamplingParams(max_tokens=args.new, ignore_eos=True))  # compiles (excluded)
        print(f"torch.compile warm-up (excluded from rates): {time.perf_counter() - t:.1f} s")
        engines["mptkit+compile"] = cg
    for gen in engines.values():
        gen.generate([prompt], SamplingParams(max_tokens=8))  # warm-up

    best: dict[str, tuple[float, float, list[int]]] = {}
    for _ in range(args.rounds):
        for name, gen in engines.items():
            r = run_mptkit(gen, prompt, args.new)
            if name not in best or r[0] > best[name][0]:
                best[name] = r
        if llm is not None:
            r = run_llama(llm, prompt, args.new)
            if "llama.cpp" not in best or r[0] > best["llama.cpp"][0]:
                best["llama.cpp"] = r
    _, _, ours_ids = best["mptkit"]
    bw_dram = read_bandwidth(1 << 30)
    bw_l3 = read_bandwidth(max(wbytes, 1 << 20))
    print(f"read bandwidth: DRAM (1 GiB buffer) {bw_dram/1e9:.1f} GB/s; weights-sized buffer "
          f"({wbytes/1e6:.0f} MB, cache-resident) {bw_l3/1e9:.1f} GB/s")

    def line(name: str, rate: float, ttft: float, ids: list[int] | None, wb: int) -> None:
        s = (f"{name:16s}: {rate:8.1f} tokens/s  TTFT {ttft*1000:7.1f} ms  weights {wb*rate/1e9:5.2f} GB/s "
             f"({100*wb*rate/bw_dram:.0f}% of DRAM, {100*wb*rate/bw_l3:.0f}% of cache-resident)")
        if ids is not None and name != "mptkit":
            n = min(args.match, len(ids), len(ours_ids))
            s += f"  greedy first {n} equal to mptkit's: {ids[:n] == ours_ids[:n]} (leading match {leading_match(ids, ours_ids)})"
        print(s)

    for name in engines:
        line(name, *best[name], wbytes)
    if "llama.cpp" in best:
        line("llama.cpp (f32)", *best["llama.cpp"], res.n_bytes)
    else:
        print(f"llama.cpp        : skipped ({llama_note or 'disabled'})")

    hf_rate = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            hf_ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.hf_new, do_sample=False, min_new_tokens=args.hf_new)
            dt = time.perf_counter() - t
        hf_rate = (args.hf_new - 1) / max(dt - hf_ttft, 1e-9)
        line("transformers", hf_rate, hf_ttft, out[0, args.prompt:].tolist(), wbytes)

    for name in engines:
        rate = best[name][0]
        if "llama.cpp" in best:
            print(f"ratio {name} / llama.cpp = {rate / best['llama.cpp'][0]:.2f}x (target >= 0.8x)")
        if hf_rate:
            print(f"ratio {name} / transformers = {rate / hf_rate:.1f}x")
    td.cleanup()


if __name__ == "__main__":
    main()
