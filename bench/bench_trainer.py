"""Trainer overhead: `mptkit.train.Trainer` tokens/s vs a bare forward/backward/step loop, same model and batch.

One process. Both sides get an identical copy of the model (same init), the same optimizer
(DecoupledAdamW, fp32), the same batch shape and microbatching; the bare loop is just
``loss = model(x, labels=x, return_logits=False).loss; loss.backward(); opt.step(); opt.zero_grad()``.
The trainer runs its full loop (data stream, lr schedule, target counting, grad-norm, loss-spike monitor,
metrics.jsonl, progress bar off) with no eval and no checkpoints; its per-iteration time is the gap between
consecutive metrics.jsonl records. Rounds alternate (bare, trainer, bare, trainer, ...) so a noisy shared
machine disturbs both alike; the median step time of each side is compared (the first step of every round
is dropped on both sides).

    flock /tmp/mptkit-bench.lock python bench/bench_trainer.py
    flock /tmp/mptkit-bench.lock python bench/bench_trainer.py --d-model 512 --n-layers 8 --seq 512 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--microbatch", type=int, default=None, help="default: the whole batch")
    p.add_argument("--steps", type=int, default=6, help="steps per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from mptkit.model import MPTForCausalLM
    from mptkit.train.config import config_from_dict
    from mptkit.train.data import TensorDataset
    from mptkit.train.optim import build_optimizer
    from mptkit.train.trainer import Trainer

    mb = args.microbatch or args.batch
    mcfg = {"d_model": args.d_model, "n_heads": args.n_heads, "n_layers": args.n_layers, "expansion_ratio": 4,
            "max_seq_len": args.seq, "vocab_size": args.vocab, "learned_pos_emb": False,
            "attn_config": {"alibi": True}}
    torch.manual_seed(0)
    base = MPTForCausalLM(mcfg).to(args.device)
    n_samples = args.batch * (args.steps * args.rounds + 2)
    data = torch.randint(0, args.vocab, (n_samples, args.seq))
    opt_spec = {"name": "decoupled_adamw", "lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}

    # bare loop
    bare = copy.deepcopy(base)
    bare.train()
    bare_opt = build_optimizer(bare, opt_spec)
    bare_pos = [0]

    def bare_round(steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            i = bare_pos[0]
            x = data[i:i + args.batch].to(args.device)
            bare_pos[0] += args.batch
            for s in range(0, args.batch, mb):
                xm = x[s:s + mb]
                loss = bare(xm, labels=xm, return_logits=False).loss * (xm.shape[0] / args.batch)
                loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
            float(loss.detach())
            if args.device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out[1:]  # like the trainer side: the first step of a round has no predecessor

    # trainer
    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    tmodel = copy.deepcopy(base)
    ds = TensorDataset(data)
    done = [0]

    def trainer_round(steps: int) -> list[float]:
        done[0] += steps
        cfg = config_from_dict({
            "model": mcfg, "max_duration": f"{done[0]}ba", "global_train_batch_size": args.batch,
            "device_train_microbatch_size": mb, "optimizer": opt_spec,
            "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"}, "eval_interval": "0ba",
            "save_interval": "0ba", "save_folder": None, "run_folder": str(tmp / "run"), "progress_bar": False,
            "log_to_console": False, "run_name": "bench", "peak_tflops": 1.0, "device": args.device,
            "train_loader": None, "callbacks": {}, "loggers": {"jsonl": {}}})
        t = Trainer(cfg, model=tmodel, train_dataset=ds)
        t.setup()
        t.step = done[0] - steps  # continue where the previous round stopped (same data, fresh optimizer state)
        t.stream.load_state_dict({"epoch": 0, "offset": t.step * args.batch})
        t.fit()
        # per-iteration time of the trainer's loop = gaps between consecutive step records' wall-clock stamps
        # (everything in the loop: data, step, metrics, logging; not the run's one-off start and end work)
        recs = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        stamps = [r["time"] for r in recs if "train_loss" in r]
        return [b - a for a, b in itertools.pairwise(stamps)]

    bare_round(1)  # warm-up both
    trainer_round(1)
    bt, tt = [], []
    for r in range(args.rounds):
        b = bare_round(args.steps)
        t = trainer_round(args.steps)
        bt += b
        tt += t
        print(f"round {r}: bare {statistics.median(b) * 1e3:.1f} ms/step, trainer {statistics.median(t) * 1e3:.1f} "
              f"ms/step", flush=True)
    tok = args.batch * args.seq
    b_med, t_med = statistics.median(bt), statistics.median(tt)
    print(f"model d{args.d_model} x {args.n_layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq} "
          f"(microbatch {mb}), {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"bare loop: {tok / b_med:,.0f} tokens/s; trainer: {tok / t_med:,.0f} tokens/s; "
          f"ratio trainer/bare {b_med / t_med:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
