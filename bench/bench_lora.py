"""LoRA vs full finetuning on the same model and batch: step time and peak memory side by side.

Each mode runs in its own process (peak RSS is per process): the model built (MPT init), full finetuning trains
every weight with decoupled AdamW, LoRA (r, default target modules Wqkv/out_proj/up_proj/down_proj) trains the
adapters only; the same batch, the same number of steps, mptkit's fused-loss forward (``return_logits=False``).
Prints the median step time, the peak RSS and its increase over the built model, and the ratio LoRA/full.

``--table`` prints the static memory table of docs/finetuning.md (trainable parameters, gradients and AdamW
state, weights) for the 125m and 7b shapes, computed on the meta device (nothing allocated).

    flock /tmp/mptkit-bench.lock python bench/bench_lora.py --model mpt-125m --batch 2 --seq 256 --steps 4
    python bench/bench_lora.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(mode: str, model_name: str, batch: int, seq: int, steps: int, r: int, threads: int) -> dict:
    import torch

    from mptkit.model import MPTForCausalLM
    from mptkit.model.lora import LoraSettings, apply_lora, param_counts
    from mptkit.train.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MPTForCausalLM(model_name).train()
    if mode == "lora":
        apply_lora(model, LoraSettings.from_dict({"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05}))
    opt = build_optimizer(model, {"name": "decoupled_adamw", "lr": 1e-4})
    trainable, total = param_counts(model)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    built = _rss_mb()
    times = []
    for _ in range(steps + 1):  # the first step (optimizer state allocated) is not timed
        t0 = time.perf_counter()
        loss = model(x, labels=x, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "trainable": trainable, "total": total, "step_s": statistics.median(times[1:]),
            "peak_rss_mb": _rss_mb(), "built_rss_mb": built, "loss": float(loss)}


def table() -> str:
    """Trainable parameters, grads + AdamW state, weights: full vs LoRA r=8 (default targets), fp32 / bf16 base."""
    from mptkit.model import MPTForCausalLM
    from mptkit.model.lora import LoraSettings, apply_lora, param_counts

    gb = 1024**3
    rows = ["| model | mode | trainable params | grads + AdamW state (fp32) | weights | total before activations |",
            "|---|---|---|---|---|---|"]
    for name in ("mpt-125m", "mpt-7b"):
        full = MPTForCausalLM(name, device="meta")
        n = full.num_params()
        lora = MPTForCausalLM(name, device="meta")
        apply_lora(lora, LoraSettings.from_dict({"r": 8}))
        t, _ = param_counts(lora)
        # base_dtype: bf16 holds the wrapped Linears' weights in bf16; embeddings and norms stay fp32
        in_targets = sum(p.numel() for k, p in lora.named_parameters() if ".base_layer." in k)
        state_full, state_lora = n * 4 * 3, t * 4 * 3  # grad + exp_avg + exp_avg_sq, fp32
        for mode, tr, st, w in (
            ("full (fp32)", n, state_full, n * 4),
            ("LoRA r=8, fp32 base", t, state_lora, n * 4 + t * 4),
            ("LoRA r=8, base_dtype bf16", t, state_lora, in_targets * 2 + (n - in_targets) * 4 + t * 4),
        ):
            rows.append(f"| {name} | {mode} | {tr:,} ({100 * tr / n:.2f}%) | {st / gb:.2f} GiB | {w / gb:.2f} GiB | "
                        f"{(st + w) / gb:.2f} GiB |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mpt-125m", help="a bundled model recipe (mpt-tiny, mpt-125m, ...)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--table", action="store_true", help="print the meta-device memory table and exit")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    a = ap.parse_args()
    if a.table:
        print(table())
        return 0
    if a.one:
        print(json.dumps(run_one(a.one, a.model, a.batch, a.seq, a.steps, a.r, a.threads)))
        return 0
    res = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--model", a.model, "--batch", str(a.batch),
                              "--seq", str(a.seq), "--steps", str(a.steps), "--r", str(a.r),
                              "--threads", str(a.threads)], capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    f, lo = res["full"], res["lora"]
    print(f"{a.model}, batch {a.batch} x {a.seq} tokens, {a.steps} timed steps, {a.threads} threads, fp32, "
          f"decoupled AdamW; LoRA r={a.r} on Wqkv/out_proj/up_proj/down_proj")
    print("| mode | trainable params | step time (median) | peak RSS | RSS over the built model |")
    print("|---|---|---|---|---|")
    for m in (f, lo):
        print(f"| {m['mode']} | {m['trainable']:,} of {m['total']:,} | {m['step_s']:.2f} s | "
              f"{m['peak_rss_mb']:.0f} MB | {m['peak_rss_mb'] - m['built_rss_mb']:.0f} MB |")
    print(f"LoRA / full: step time {lo['step_s'] / f['step_s']:.2f}x, peak RSS {lo['peak_rss_mb'] / f['peak_rss_mb']:.2f}x, "
          f"RSS over the model {(lo['peak_rss_mb'] - lo['built_rss_mb']) / (f['peak_rss_mb'] - f['built_rss_mb']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
