"""Training-step throughput: mptkit's MPTForCausalLM vs transformers' MptForCausalLM, side by side.

One process, same weights, same data, same optimizer (torch AdamW), fp32 on CPU. Steps of the two models
are interleaved (ours, theirs, ours, …) so that a noisy shared machine disturbs both alike. Prints tokens/s,
the ratio, and MFU with llm-foundry's formula (3 * B * (2 * N * T + n_layers * 4 * d_model * T^2) FLOPs per
batch) against a measured fp32 matmul peak of this machine.

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


def measure_matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, reps: int = 6) -> float:
    """Best observed FLOP/s of an n x n x n matmul (the machine's practical fp32 peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    torch.mm(a, b)
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


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
    args = p.parse_args(argv)

    if not args.no_ftz:
        torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    peak_dtype = autocast_dtype or torch.float32
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measure_matmul_peak(args.device, peak_dtype)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}, flush denormals {not args.no_ftz}")
    print(f"matmul peak ({args.dtype}, 4096^3, best of 6): {peak / 1e9:.1f} GFLOP/s")

    ours, hf = build_models(args)
    n_params = ours.num_params()
    print(f"model: d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M params; batch {args.batch}; our attn_impl {args.impl}")
    ours.train()
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    runners = {"ours": make_step(ours, opt_o, "ours", args.device, autocast_dtype)}
    if hf is not None:
        hf.train()
        opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4)
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
        flops = 3 * args.batch * (2 * n_params * t + args.n_layers * 4 * args.d_model * t * t)
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
        line = f"T={t}: ours {row['ours'].get('tokens_per_s', float('nan')):.0f} tok/s " \
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
