"""Batch-1 decode with quantised weights, side by side in one process: mptkit fp32, mptkit int8 (q8_0 blocks,
``from_pretrained(..., quant="int8")``), mptkit q4 (q4_0 blocks) and llama.cpp q8_0 / q4_0 on the same weights,
when ``llama_cpp`` is importable.

llama.cpp files per type: ``q8_0`` / ``q4_0`` (mptkit's f32 GGUF export quantised by llama.cpp's own
``llama_model_quantize``, llama.cpp's default for that type: the token embedding, which MPT ties to the LM head,
quantised too) and ``q8_0 mptkit-file`` / ``q4_0 mptkit-file`` (``mptkit export gguf --dtype q8_0|q4_0``: the very
blocks mptkit runs, the token embedding kept f32 — mptkit's policy: the same bytes per token as mptkit). llama.cpp also quantises the activations to q8_0 blocks for its integer dot
products; mptkit's kernel computes in fp32 on the dequantised weights, so their logits differ a little.

d_model 512, 8 layers, 8 heads, 128-token prompt, 256 new tokens, greedy, the same prompt ids and thread count
for every engine; rounds interleaved, each engine's best round reported (a noisy neighbour hurts all alike).
Prints tokens/s, weight bytes streamed per second against the measured read bandwidth, ratios, and greedy
agreement with mptkit fp32 / int8.

Run: flock /tmp/mptkit-bench.lock python bench/bench_quant_decode.py [--threads N] [--vocab 8192] [--rounds 3]
     [--shape 25m|1b]  (1b: the mpt-1b recipe's shape, random init; e.g. --vocab 50368 --prompt 32 --new 64)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import leading_match, read_bandwidth, run_llama, run_mptkit, tokenizer_folder

from mptkit.infer import Generator, SamplingParams
from mptkit.model import MPTForCausalLM


def tensor_bytes(model) -> int:
    """Weight bytes a decode step streams: the model's stored tensors (the tied head counted once), less the
    embedding tables a step reads one row of (``wte`` when the head is its own tensor: the quantised models'
    q8_0 ``quant_head``; ``wpe``)."""
    sd = model.state_dict()
    skip = {"transformer.wpe.weight"}
    if getattr(model, "quant_head", None) is not None or not model.config.tie_word_embeddings:
        skip.add("transformer.wte.weight")
    ts = {t.data_ptr(): t for k, t in sd.items() if k not in skip}
    return sum(t.numel() * t.element_size() for t in ts.values())


def gguf_bytes(path: Path) -> int:
    """The same for a GGUF file: its tensors' bytes, less ``token_embd`` when an ``output`` head is there."""
    import gguf

    ts = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in ts:
        ts.pop("token_embd.weight", None)
    ts.pop("position_embd.weight", None)
    return sum(ts.values())


def llama_quantize(src: Path, out: Path, *, embd_f32: bool, threads: int, ftype: str = "q8_0") -> Path:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
               "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]
    p.nthread = threads
    if embd_f32:
        p.token_embedding_type = llama_cpp.GGML_TYPE_F32
        p.output_tensor_type = llama_cpp.GGML_TYPE_F32
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed (rc={rc})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--shape", choices=("25m", "1b"), default="25m")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    shapes = {  # the ~25M bench shape, and the mpt-1b recipe's (configs/pretrain/mpt-1b.yaml: 1.3B parameters)
        "25m": {"d_model": 512, "n_heads": 8, "n_layers": 8},
        "1b": {"d_model": 2048, "n_heads": 16, "n_layers": 24},
    }
    cfg = {**shapes[args.shape], "max_seq_len": 2048, "vocab_size": args.vocab, "attn_config": {"alibi": True}}
    model = MPTForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, min(400, args.vocab), (args.prompt,), generator=g).tolist()
    td = tempfile.TemporaryDirectory()
    folder = Path(td.name) / "m"
    tokenizer_folder(folder)
    model.save_pretrained(folder)
    q8 = MPTForCausalLM.from_pretrained(folder, quant="int8")
    q4 = MPTForCausalLM.from_pretrained(folder, quant="q4")
    sizes = {"mptkit fp32": tensor_bytes(model), "mptkit int8": tensor_bytes(q8), "mptkit q4": tensor_bytes(q4)}
    print(
        f"threads={threads} params={model.num_params() / 1e6:.1f}M prompt={args.prompt} new={args.new} "
        f"load_avg_1m={os.getloadavg()[0]:.2f}"
    )
    print("weight bytes per token: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))

    from mptkit.infer import DecodeOptions

    # the default: llama.cpp's arithmetic (activations rounded to q8_0 blocks, integer dot products); "exact":
    # quant_int_dot=False, the dequantise-then-matmul arithmetic
    exact = DecodeOptions(quant_int_dot=False)
    engines = {"mptkit fp32": Generator(model, None), "mptkit int8": Generator(q8, None),
               "mptkit q4": Generator(q4, None), "mptkit int8 exact": Generator(q8, None, decode_options=exact),
               "mptkit q4 exact": Generator(q4, None, decode_options=exact)}
    assert engines["mptkit q4"].fast.q8 is None or engines["mptkit q4"].fast.q8.int_dot
    sizes["mptkit int8 exact"], sizes["mptkit q4 exact"] = sizes["mptkit int8"], sizes["mptkit q4"]
    print(
        f"mptkit int8 decode: q8 kernel {'on' if engines['mptkit int8'].fast.q8 is not None else 'OFF (torch)'}"
        + (
            f", vector width {engines['mptkit int8'].fast.q8.vector_width}"
            if engines["mptkit int8"].fast.q8
            else ""
        )
    )
    llamas = {}
    note = None
    if not args.no_llama:
        try:
            import llama_cpp

            from mptkit.export.gguf import export_gguf

            f32 = export_gguf(folder, Path(td.name) / "m-f32.gguf", dtype="f32").path
            for name, ft, own in (("llama.cpp q8_0", "q8_0", False), ("llama.cpp q8_0 mptkit-file", "q8_0", True),
                                  ("llama.cpp q4_0", "q4_0", False), ("llama.cpp q4_0 mptkit-file", "q4_0", True)):
                path = Path(td.name) / f"{name.replace(' ', '_')}.gguf"
                if own:
                    export_gguf(folder, path, dtype=ft)
                else:
                    llama_quantize(f32, path, embd_f32=False, threads=threads, ftype=ft)
                llm = llama_cpp.Llama(
                    str(path),
                    n_ctx=args.prompt + args.new + 8,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_batch=512,
                    verbose=False,
                    seed=0,
                    type_k=llama_cpp.GGML_TYPE_F32,
                    type_v=llama_cpp.GGML_TYPE_F32,
                )
                run_llama(llm, prompt[:16], 4)  # warm-up
                llamas[name] = llm
                sizes[name] = gguf_bytes(path)
        except Exception as e:  # noqa: BLE001 - an optional engine
            note = f"{type(e).__name__}: {e}"
    for gen in engines.values():
        gen.generate([prompt], SamplingParams(max_tokens=8))  # warm-up

    best: dict[str, tuple[float, float, list[int]]] = {}
    for _ in range(args.rounds):
        for name, gen in engines.items():
            r = run_mptkit(gen, prompt, args.new)
            if name not in best or r[0] > best[name][0]:
                best[name] = r
        for name, llm in llamas.items():
            r = run_llama(llm, prompt, args.new)
            if name not in best or r[0] > best[name][0]:
                best[name] = r
    print("weight bytes per token: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    bw = read_bandwidth(1 << 30)
    print(f"read bandwidth (1 GiB buffer, DRAM): {bw / 1e9:.1f} GB/s")
    ref32 = best["mptkit fp32"][2]
    for name, (rate, ttft, ids) in best.items():
        wb = sizes[name]
        s = (
            f"{name:24s}: {rate:8.1f} tokens/s  TTFT {ttft * 1000:6.1f} ms  weights {wb * rate / 1e9:5.2f} GB/s "
            f"({100 * wb * rate / bw:.0f}% of DRAM)"
        )
        if name != "mptkit fp32":
            s += f"  greedy vs fp32: leading {leading_match(ids, ref32)}/{len(ids)}"
        if name.startswith("llama"):
            mine = best["mptkit q4" if "q4_0" in name else "mptkit int8"][2]
            s += f", vs mptkit {'q4' if 'q4_0' in name else 'int8'}: leading {leading_match(ids, mine)}"
        print(s)
    if not llamas:
        print(f"llama.cpp: skipped ({note or 'disabled'})")
    r8, r4 = best["mptkit int8"][0], best["mptkit q4"][0]
    print(f"ratio mptkit int8 / mptkit fp32 = {r8 / best['mptkit fp32'][0]:.2f}x, "
          f"mptkit q4 / mptkit fp32 = {r4 / best['mptkit fp32'][0]:.2f}x")
    for name in llamas:
        for mine in (("mptkit q4", "mptkit q4 exact") if "q4_0" in name else ("mptkit int8", "mptkit int8 exact")):
            print(f"ratio {mine} / {name} = {best[mine][0] / best[name][0]:.2f}x (target >= 1.0x)")
    td.cleanup()


if __name__ == "__main__":
    main()
