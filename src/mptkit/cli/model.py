"""`mptkit info`: a model's size, FLOPs per token and a timed forward pass."""

from __future__ import annotations

import argparse
import time

import torch


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def model_info(spec: str, *, seq_len: int | None = None, batch: int = 1, time_forward: bool = True) -> dict:
    """Build (or load) a model and report parameters, FLOPs/token, and a forward-pass timing."""
    from pathlib import Path

    from mptkit.model import MPTForCausalLM, load_model_config

    cfg = load_model_config(spec)
    meta = not time_forward
    if Path(str(spec)).is_dir() and (Path(str(spec)) / "config.json").exists() and time_forward:
        model = MPTForCausalLM.from_pretrained(spec)
    else:
        model = MPTForCausalLM(cfg, device="meta" if meta else "cpu")
    t = seq_len or (min(cfg.max_seq_len, 256) if time_forward else cfg.max_seq_len)
    out = {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "flops_per_token": model.flops_per_token(t),
        "seq_len": t,
        "config": cfg,
    }
    if time_forward:
        torch.manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, t))
        model.eval()
        with torch.inference_mode():
            model(x)  # warm-up
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < 1.0:
                model(x)
                n += 1
            dt = (time.perf_counter() - t0) / n
        fwd_flops = batch * t * out["flops_per_token"] / 3  # forward is a third of fwd+bwd
        out.update(forward_s=dt, forward_tokens_per_s=batch * t / dt, forward_gflops=fwd_flops / dt / 1e9)
    return out


def _info(args: argparse.Namespace) -> int:
    r = model_info(args.model, seq_len=args.seq_len, batch=args.batch, time_forward=not args.no_time)
    c = r["config"]
    print(f"model            {args.model}")
    print(f"shape            d_model={c.d_model} n_heads={c.n_heads} kv_heads={c.kv_n_heads} n_layers={c.n_layers} "
          f"vocab={c.vocab_size} max_seq_len={c.max_seq_len} alibi={c.alibi}")
    print(f"parameters       {r['params']:,} ({_fmt(r['params'])}; {r['params_non_embedding']:,} without embeddings)")
    print(f"FLOPs/token      {r['flops_per_token']:,} ({_fmt(r['flops_per_token'])}, train fwd+bwd at seq {r['seq_len']})")
    if "forward_s" in r:
        print(f"forward          batch {args.batch} x {r['seq_len']} tokens: {r['forward_s'] * 1e3:.1f} ms "
              f"({r['forward_tokens_per_s']:,.0f} tokens/s, {r['forward_gflops']:.1f} GFLOP/s, "
              f"{torch.get_num_threads()} threads)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="size, FLOPs per token and forward timing of a model",
                       description="Build a model from a recipe name (configs/model), YAML, config.json or "
                                   "a model folder, and report its size, FLOPs per token and forward speed.")
    p.add_argument("model", nargs="?", default="mpt-tiny", help="recipe name, YAML, config.json or folder")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-time", action="store_true", help="do not allocate or run it (meta device)")
    p.set_defaults(func=_info)
