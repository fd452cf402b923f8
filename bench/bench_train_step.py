"""Training-step throughput: mptkit's MPTForCausalLM vs transformers' MptForCausalLM, side by side.

One process, same weights, same data, same optimizer (torch AdamW, ``--optimizer``: the fused implementation by
default, for both), fp32 on CPU. Steps of the two models are interleaved (ours, theirs, ours, …) so that a
noisy shared machine disturbs both alike. Prints tokens/s, the ratio, and MFU with llm-foundry's formula
(3 * B * (2 * N * T + n_layers * 4 * d_model * T^2) FLOPs per batch, ``model.flops_per_batch``) against a
measured matmul peak of this machine: the best of n^3 matmuls (n = 2048, 3072, 4096, 5 runs each, same thread
count), measured at the start and after each length; the highest figure seen is used.

    flock /tmp/mptkit-bench.lock python bench/bench_train_step.py --seq 512 2048

On a GPU: ``--device cuda --dtype bf16`` runs both under bf16 autocast (ours picks flash-attn when it is
installed, else SDPA); pass ``--peak-tflops`` for the card's datasheet peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch


def measure_matmul_peak(
    device: str, dtype: torch.dtype, sizes=(2048, 3072, 4096), reps: int = 5
) -> tuple[float, dict]:
    """The machine's practical matmul peak: best FLOP/s over ``reps`` runs of n x n x n matmuls for each n in
    ``sizes``, into a preallocated output (so page faults of a fresh result do not count against the peak), at
    the thread count already set. Returns (best FLOP/s, {n: best FLOP/s})."""
    per = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.mm(a, b)
        best = 0.0
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        per[n] = best
        del a, b, out
    return max(per.values()), per


def cache_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse (no mmap per large tensor, no trimming), so big
    activations are not page-faulted in afresh every step. Process-wide: applies to both models alike."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # tensors up to 1 GiB come from the heap
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
        ok &= libc.mallopt(m_top_pad, 256 << 20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def build_models(args):
    from transformers import MptConfig
    from transformers import MptForCausalLM as HFMpt

    from mptkit.model import MPTForCausalLM

    cfg = {
        "d_model": args.d_model, "n_heads": args.n_heads, "n_layers": args.n_layers, "expansion_ratio": 4,
        "max_seq_len": max(args.seq), "vocab_size": args.vocab, "no_bias": True, "learned_pos_emb": False,
        "attn_config": {"alibi": True, "attn_impl": args.impl},
    }
    ours = MPTForCausalLM(cfg).to(args.device)
    hf = None
    if not args.no_hf:
        hcfg = MptConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, expansion_ratio=4,
                         max_seq_len=max(args.seq), vocab_size=args.vocab, attn_config={"alibi": True})
        hf = HFMpt(hcfg).to(args.device)
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied head
    return ours, hf


def make_step(model, opt, kind, device, autocast_dtype):
    def step(x):
        ctx = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
               else torch.autocast(device_type=device, enabled=False))
        with ctx:
            if kind == "ours":
                loss = model(x, labels=x, return_logits=False).loss
            else:
                loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4),  # torch's default implementation choice
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
}


def profile_step(step, x) -> None:
    """One profiled step: where the time goes, by op (self time), for the first length."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        step(x)
        dt = time.perf_counter() - t0
    print(f"profiled step (T={x.shape[1]}): {dt:.2f} s")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50, max_shapes_column_width=60))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50368, help="llm-foundry's 125m vocab (GPT-NeoX, padded)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", default="auto", help="our attn_impl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--peak-tflops", type=float, default=None, help="use this peak instead of measuring")
    p.add_argument("--no-hf", action="store_true", help="only time mptkit")
    p.add_argument("--hf-seq-max", type=int, default=None, help="skip transformers above this length")
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--no-ftz", action="store_true",
                   help="keep denormal floats (default: flush them to zero for both models, set before the "
                        "thread pool starts; ALiBi's far-away keys otherwise give denormal probabilities that "
                        "slow the CPU attention backward ~4x)")
    p.add_argument("--optimizer", default="adamw-fused", choices=list(OPTIMIZERS),
                   help="torch AdamW implementation, the same for both models (fused: one vectorised kernel per "
                        "tensor, ~0.04 s vs ~0.25 s per step for the default per-parameter loop on 2 CPU threads)")
    p.add_argument("--malloc-cache", action="store_true",
                   help="keep freed memory in glibc's heap (mallopt) for both models: large tensors are then not "
                        "page-faulted in afresh each step (off by default: the plain process environment)")
    p.add_argument("--profile", action="store_true", help="after timing, print our step's top ops (torch.profiler)")
    args = p.parse_args(argv)

    if not args.no_ftz:
        torch.set_flush_denormal(True)
    malloc_cached = cache_freed_memory() if args.malloc_cache else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    peak_dtype = autocast_dtype or torch.float32
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}, flush denormals {not args.no_ftz}, "
          f"malloc cache {malloc_cached}, optimizer {args.optimizer} (both models)")

    peaks: list[float] = []

    def report_peak(when: str) -> None:
        if args.peak_tflops:
            return
        best, per = measure_matmul_peak(args.device, peak_dtype)
        peaks.append(best)
        print(f"matmul peak {when} ({args.dtype}, {torch.get_num_threads()} threads, best of 5 per size, "
              f"preallocated output): " + ", ".join(f"{n}^3 {v / 1e9:.1f}" for n, v in per.items())
              + f" GFLOP/s -> {best / 1e9:.1f}", flush=True)

    def peak_flops() -> float:  # the highest seen so far: the MFU never gains from a slow peak measurement
        return args.peak_tflops * 1e12 if args.peak_tflops else max(peaks)

    report_peak("at start")

    ours, hf = build_models(args)
    n_params = ours.num_params()
    print(f"model: d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M params; batch {args.batch}; our attn_impl {args.impl}")
    ours.train()
    opt_o = OPTIMIZERS[args.optimizer](ours.parameters())
    runners = {"ours": make_step(ours, opt_o, "ours", args.device, autocast_dtype)}
    if hf is not None:
        hf.train()
        opt_h = OPTIMIZERS[args.optimizer](hf.parameters())
        runners["hf"] = make_step(hf, opt_h, "hf", args.device, autocast_dtype)

    results = []
    for t in args.seq:
        x = torch.randint(0, args.vocab, (args.batch, t), device=args.device)
        names = [n for n in runners if not (n == "hf" and args.hf_seq_max and t > args.hf_seq_max)]
        times: dict[str, list[float]] = {n: [] for n in names}
        losses: dict[str, float] = {}
        failed: dict[str, str] = {}
        for i in range(args.warmup + args.steps):
            for n in names:
                if n in failed:
                    continue
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    losses[n] = runners[n](x)
                except (RuntimeError, MemoryError) as e:  # e.g. out of memory
                    failed[n] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[n].append(dt)
                print(f"  T={t} {n:4s} step {i}: {dt:7.2f} s loss {losses[n]:.4f}", flush=True)
        report_peak(f"after T={t}")
        peak = peak_flops()
        flops = ours.flops_per_batch(args.batch, t)  # llm-foundry: B * T * (6 N + 12 n_layers d_model T)
        assert flops == 3 * args.batch * (2 * n_params * t + args.n_layers * 4 * args.d_model * t * t)
        row = {"seq": t, "batch": args.batch, "flops_per_batch": flops, "peak_flops": peak}
        for n in names:
            if n in failed:
                row[n] = {"error": failed[n]}
                continue
            med = statistics.median(times[n])
            best = min(times[n])
            row[n] = {"step_s": med, "tokens_per_s": args.batch * t / med, "mfu": flops / med / peak,
                      "best_step_s": best, "best_tokens_per_s": args.batch * t / best,
                      "best_mfu": flops / best / peak, "steps": times[n]}
        results.append(row)
        line = f"T={t} (peak {peak / 1e9:.1f} GFLOP/s): ours " \
               f"{row['ours'].get('tokens_per_s', float('nan')):.0f} tok/s " \
               f"(MFU {100 * row['ours'].get('mfu', float('nan')):.1f}% of measured peak)"
        if "hf" in row:
            if "error" in row["hf"]:
                line += f"; transformers FAILED ({row['hf']['error']})"
            else:
                line += (f"; transformers {row['hf']['tokens_per_s']:.0f} tok/s "
                         f"(MFU {100 * row['hf']['mfu']:.1f}%); ratio ours/transformers "
                         f"{row['ours']['tokens_per_s'] / row['hf']['tokens_per_s']:.2f}x")
        print(line, flush=True)
        if "hf" in row and "error" not in row["hf"] and "error" not in row["ours"]:
            print(f"T={t} best steps (least disturbed): ours {row['ours']['best_step_s']:.2f} s "
                  f"(MFU {100 * row['ours']['best_mfu']:.1f}%), transformers {row['hf']['best_step_s']:.2f} s "
                  f"(MFU {100 * row['hf']['best_mfu']:.1f}%), ratio "
                  f"{row['hf']['best_step_s'] / row['ours']['best_step_s']:.2f}x", flush=True)
    if args.profile:
        profile_step(runners["ours"], torch.randint(0, args.vocab, (args.batch, args.seq[0]), device=args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
