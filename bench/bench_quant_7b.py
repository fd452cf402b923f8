"""The 7B shape quantised on a small machine, beside llama.cpp on the same weights: build the mpt-7b recipe
with random weights on the meta device, quantised tensor by tensor
(``mptkit.io.quant_folder.random_quantized_model``: peak ≈ the quantised model + one fp32 tensor), save it as a
quantised folder (with a small byte-level BPE tokenizer: the GGUF file embeds one), write that folder's blocks
as a GGUF file (``mptkit export gguf FOLDER``: streamed, no fp32 weights), then decode batch-1 greedy in
mptkit (the folder) and in llama.cpp (the file: the very same q8_0 / q4_0 blocks). Each step runs in its own
process and reports its peak RSS (``ru_maxrss``; llama.cpp memory-maps its file, so its RSS counts the touched
pages of the file).

The folder (~7.9 GB for int8, ~4.3 GB for q4) and the file (about the same) go under ``--dir`` (default /tmp)
and are deleted at the end (``--keep`` keeps them). Free disk is checked first.

Run: python bench/bench_quant_7b.py [--quant int8|q4] [--new 8] [--threads N] [--no-llama]  (the decode steps
take /tmp/mptkit-bench.lock themselves; the build and the export, minutes of work not timed closely, do not)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB (10^9 bytes ≈)


def build(out: Path, quant: str, recipe: str) -> dict:
    from mptkit.io.quant_folder import random_quantized_model
    from mptkit.model.config import load_model_config

    cfg = load_model_config(recipe).replace(init_device="cpu")
    t0 = time.perf_counter()
    model = random_quantized_model(cfg, quant, seed=0)
    t1 = time.perf_counter()
    model.save_pretrained(out)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decode import tokenizer_folder

    tokenizer_folder(out)  # a 400-token byte-level BPE beside the weights (the vocab is padded past it)
    t2 = time.perf_counter()
    nbytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"step": "build", "build_s": t1 - t0, "save_s": t2 - t1, "folder_gb": nbytes / 1e9,
            "params": model.num_params(), "peak_rss_gb": peak_rss_gb()}


def export(folder: Path, out: Path) -> dict:
    from mptkit.export.gguf import export_gguf

    t0 = time.perf_counter()
    res = export_gguf(folder, out)
    return {"step": "gguf", "export_s": time.perf_counter() - t0, "dtype": res.dtype,
            "file_gb": out.stat().st_size / 1e9, "peak_rss_gb": peak_rss_gb()}


def prompt_ids() -> list[int]:
    import torch

    return torch.randint(2, 400, (16,), generator=torch.Generator().manual_seed(0)).tolist()  # the tokenizer's


def llama(path: Path, new: int, threads: int | None) -> dict:
    import os

    import llama_cpp

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decode import run_llama

    n = threads or len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=n, n_threads_batch=n, n_batch=64, verbose=False, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    load_s = time.perf_counter() - t0
    rate, ttft, out = run_llama(llm, prompt_ids(), new)
    return {"step": "llama.cpp", "load_s": load_s, "prefill_16_s": ttft, "decode_tok_s": rate, "tokens": out,
            "peak_rss_gb": peak_rss_gb(), "threads": n}


def decode(folder: Path, new: int, threads: int | None) -> dict:
    import torch

    from mptkit.infer import Generator, SamplingParams
    from mptkit.model import MPTForCausalLM

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = MPTForCausalLM.from_pretrained(folder)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_gb()
    gen = Generator(model, None)
    prompt = prompt_ids()
    o = gen.generate([prompt], SamplingParams(max_tokens=new, ignore_eos=True))[0]
    rate = (new - 1) / (o.elapsed - o.time_to_first_token)
    return {"step": "decode", "load_s": load_s, "peak_rss_after_load_gb": rss_loaded,
            "prefill_16_s": o.time_to_first_token, "decode_tok_s": rate, "tokens": list(o.token_ids),
            "kernel": gen.fast is not None and gen.fast.q8 is not None, "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--recipe", default="mpt-7b")
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--lock", default="/tmp/mptkit-bench.lock",
                    help="the decode steps (the timed ones) run under flock on this file; build and export do not")
    ap.add_argument("--no-llama", action="store_true", help="mptkit only (no GGUF file, no llama.cpp)")
    ap.add_argument("--step", choices=["build", "gguf", "decode", "llama.cpp"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = Path(a.folder) if a.folder else Path(a.dir) / f"mptkit-bench-{a.recipe}-{a.quant}"
    gguf_file = folder.with_suffix(".gguf")
    if a.step is not None:
        res = {"build": lambda: build(folder, a.quant, a.recipe), "gguf": lambda: export(folder, gguf_file),
               "decode": lambda: decode(folder, a.new, a.threads),
               "llama.cpp": lambda: llama(gguf_file, a.new, a.threads)}[a.step]()
        print(json.dumps(res))
        return
    free = shutil.disk_usage(a.dir).free / 1e9
    if free < 20:
        sys.exit(f"{a.dir}: {free:.1f} GB free; the 7B folder and its GGUF file need ~16 GB (use --dir)")
    shutil.rmtree(folder, ignore_errors=True)
    gguf_file.unlink(missing_ok=True)
    steps = ["build", "decode"] if a.no_llama else ["build", "gguf", "decode", "llama.cpp"]
    results = {}
    try:
        for step in steps:
            cmd = [sys.executable, __file__, "--step", step, "--folder", str(folder), "--quant", a.quant,
                   "--recipe", a.recipe, "--new", str(a.new)] + (["--threads", str(a.threads)] if a.threads else [])
            if step in ("decode", "llama.cpp") and a.lock:
                cmd = ["flock", a.lock, *cmd]
            r = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"step {step} failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            results[step] = res
            print(json.dumps(res), flush=True)
        if "llama.cpp" in results:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_decode import leading_match

            m, lc = results["decode"], results["llama.cpp"]
            same = leading_match(m["tokens"], lc["tokens"])
            print(f"decode tok/s: mptkit {m['decode_tok_s']:.2f} vs llama.cpp {lc['decode_tok_s']:.2f} "
                  f"({m['decode_tok_s'] / lc['decode_tok_s']:.2f}x); peak RSS {m['peak_rss_gb']:.2f} vs "
                  f"{lc['peak_rss_gb']:.2f} GB; greedy tokens equal for the first {same} of {len(m['tokens'])}")
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
            gguf_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
