"""Long context: peak memory and time of mptkit vs transformers' MptForCausalLM, each case in its own process.

Cases (2 layers, d_model 256, 4 heads, vocab 50368, batch 1, fp32, CPU):
  * train T=16384: forward + backward of the LM loss (ours: ``return_logits=False``, the fused chunked loss)
  * prefill T=65536: inference forward without grad (ours: ``logits_to_keep=1``, what generation uses;
    transformers computes every position's logits)
Each case runs in a fresh subprocess; its peak RSS (``ru_maxrss``) is the figure reported, so import and
model memory are included. The child's address space is capped (``--cap-gb``) so that a case which would
need tens of GB (transformers' T x T scores) fails fast instead of swapping a shared machine.

    flock /tmp/mptkit-bench.lock python bench/bench_long_context.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_case(who: str, mode: str, t: int, impl: str, vocab: int, threads: int) -> dict:
    import torch

    torch.set_flush_denormal(True)  # before the thread pool starts (see bench_train_step.py --no-ftz)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = {"d_model": 256, "n_heads": 4, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 2048,
           "vocab_size": vocab, "no_bias": True, "learned_pos_emb": False,
           "attn_config": {"alibi": True, "attn_impl": impl}}
    if who == "ours":
        from mptkit.model import MPTForCausalLM

        model = MPTForCausalLM(cfg)
    else:
        from transformers import MptConfig, MptForCausalLM

        # transformers refuses sequences past max_seq_len: give it the length (ours keeps 2048, ALiBi needs none)
        model = MptForCausalLM(MptConfig(d_model=256, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=t,
                                         vocab_size=vocab, attn_config={"alibi": True}))
    x = torch.randint(0, vocab, (1, t))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "train":
        model.train()
        out = model(x, labels=x, return_logits=False) if who == "ours" else model(x, labels=x)
        out.loss.backward()
        val = float(out.loss.detach())
    else:
        model.eval()
        with torch.no_grad():
            out = model(x, logits_to_keep=1) if who == "ours" else model(x, use_cache=False)
            val = float(out.logits[0, -1].float().logsumexp(-1))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "value": val, "rss_before_mb": rss0}


def child_main(args) -> int:
    if args.cap_gb:
        cap = int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        res = run_case(args.who, args.mode, args.t, args.impl, args.vocab, args.threads)
        res["ok"] = True
    except (RuntimeError, MemoryError, ValueError) as e:
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--who", default="ours")
    p.add_argument("--mode", default="train")
    p.add_argument("--t", type=int, default=16384)
    p.add_argument("--impl", default="auto", help="our attn_impl")
    p.add_argument("--vocab", type=int, default=50368)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each case's process")
    p.add_argument("--cases", default="ours:train:16384,hf:train:16384,ours:prefill:65536,hf:prefill:65536",
                   help="comma list of who:mode:T (who = ours | ours-blockwise | hf)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)

    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"fp32 CPU, 2 layers d_model 256 4 heads vocab {args.vocab}, batch 1, cap {args.cap_gb} GB per case")
    rows = []
    for spec in args.cases.split(","):
        who, mode, t = spec.split(":")
        impl = args.impl
        if who.startswith("ours-"):
            who, impl = "ours", who.split("-", 1)[1]
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--who", who, "--mode", mode, "--t", t,
               "--impl", impl, "--vocab", str(args.vocab), "--threads", str(args.threads),
               "--cap-gb", str(args.cap_gb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failing case is a result
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if line else {
            "ok": False, "error": f"process exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        res.update({"who": who if who == "hf" else f"ours({impl})", "mode": mode, "T": int(t)})
        rows.append(res)
        if res["ok"]:
            print(f"{res['who']:>16s} {mode:7s} T={t:>6s}: {res['seconds']:8.1f} s, peak RSS "
                  f"{res['peak_rss_mb']:7.0f} MB (value {res['value']:.4f})", flush=True)
        else:
            print(f"{res['who']:>16s} {mode:7s} T={t:>6s}: FAILED ({res['error']}), peak RSS "
                  f"{res.get('peak_rss_mb', float('nan')):.0f} MB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
