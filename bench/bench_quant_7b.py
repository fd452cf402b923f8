"""The 7B shape quantised on a small machine: build the mpt-7b recipe with random weights on the meta device,
quantised tensor by tensor (``mptkit.io.quant_folder.random_quantized_model``: peak ≈ the quantised model + one
fp32 tensor), save it as a quantised folder, then load that folder in a fresh process and decode batch-1
greedy. Each step runs in its own process and reports its peak RSS (``ru_maxrss``).

The folder (~7.7 GB for int8, ~4.3 GB for q4) goes under ``--dir`` (default /tmp) and is deleted at the end
(``--keep`` keeps it). Free disk is checked first.

Run: python bench/bench_quant_7b.py [--quant int8|q4] [--new 8] [--threads N]  (the decode step takes
/tmp/mptkit-bench.lock itself; the build, minutes of work that is not timed closely, does not)
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
    t2 = time.perf_counter()
    nbytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"step": "build", "build_s": t1 - t0, "save_s": t2 - t1, "folder_gb": nbytes / 1e9,
            "params": model.num_params(), "peak_rss_gb": peak_rss_gb()}


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
    prompt = torch.randint(0, 50000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
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
                    help="the decode step (the timed one) runs under flock on this file; the build does not")
    ap.add_argument("--step", choices=["build", "decode"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step == "build":
        print(json.dumps(build(Path(a.folder), a.quant, a.recipe)))
        return
    if a.step == "decode":
        print(json.dumps(decode(Path(a.folder), a.new, a.threads)))
        return
    free = shutil.disk_usage(a.dir).free / 1e9
    if free < 12:
        sys.exit(f"{a.dir}: {free:.1f} GB free; the 7B folder needs ~8 GB (use --dir)")
    folder = Path(a.dir) / f"mptkit-bench-{a.recipe}-{a.quant}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        for step in ("build", "decode"):
            cmd = [sys.executable, __file__, "--step", step, "--folder", str(folder), "--quant", a.quant,
                   "--recipe", a.recipe, "--new", str(a.new)] + (["--threads", str(a.threads)] if a.threads else [])
            if step == "decode" and a.lock:
                cmd = ["flock", a.lock, *cmd]
            r = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps(res), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
