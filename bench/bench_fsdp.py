"""FSDP2 vs DDP, side by side: per-rank parameter and AdamW-state memory, peak RSS and time per step of the same
recipe on the same ranks (``torchrun --standalone``, gloo on CPU; NCCL on GPUs when run there).

Model d_model 512, 4 layers, 8 heads, vocabulary 8192 (16.8M parameters; --layers / --d-model change it), 256-token samples, global batch 8,
decoupled AdamW; each mode runs ``--steps`` steps in its own torchrun launch. Prints, per mode, what one rank
holds and the ratios FSDP / DDP. On 2 CPU cores FSDP is expected to be slower (an all-gather per block and a
reduce-scatter per microbatch over gloo); what it buys is memory per rank.

Run: flock /tmp/mptkit-bench.lock python bench/bench_fsdp.py [--nproc 2] [--steps 6] [--layers 4] [--d-model 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, resource, sys, time
import torch
sys.path.insert(0, {root!r})
from mptkit.train.config import config_from_dict
from mptkit.train.data import TensorDataset
from mptkit.train.trainer import Trainer

out, mode, steps, layers, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = {{
    "model": {{"d_model": d, "n_heads": 8, "n_layers": layers, "expansion_ratio": 4, "max_seq_len": 256,
              "vocab_size": 8192, "attn_config": {{"alibi": True}}}},
    "max_duration": f"{{steps}}ba", "global_train_batch_size": 8, "device_train_microbatch_size": 4,
    "optimizer": {{"name": "decoupled_adamw", "lr": 1e-3}}, "eval_interval": "0ba", "save_interval": "0ba",
    "run_folder": os.path.join(out, mode), "progress_bar": False, "log_to_console": False, "run_name": mode,
    "peak_tflops": 1.0, "seed": 1,
}}
if mode == "fsdp":
    cfg["fsdp_config"] = {{"sharding_strategy": "FULL_SHARD"}}
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randint(0, 8192, (64, 256), generator=g))
tr = Trainer(config_from_dict(cfg), train_dataset=data)
t0 = time.perf_counter()
summary = tr.fit()
wall = time.perf_counter() - t0

def local(t):
    return t.to_local() if hasattr(t, "to_local") else t

params = sum(local(p).numel() * local(p).element_size() for p in tr.model.parameters())
opt = sum(local(v).numel() * local(v).element_size() for st in tr.optimizer.state.values()
          for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
rank = int(os.environ.get("RANK", 0))
rec = {{"rank": rank, "param_bytes": params, "optimizer_bytes": opt, "steps": summary["steps"],
        "train_wall_s": summary["train_wall_s"], "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}
with open(os.path.join(out, f"{{mode}}-rank{{rank}}.json"), "w") as f:
    json.dump(rec, f)
"""


def run(mode: str, out: Path, nproc: int, steps: int, layers: int, d_model: int) -> list[dict]:
    script = out / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), str(out), mode, str(steps), str(layers), str(d_model)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-rank{i}.json").read_text()) for i in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {m: run(m, Path(tmp), args.nproc, args.steps, args.layers, args.d_model) for m in ("ddp", "fsdp")}
    mb = 1 / 2**20
    print(f"ranks={args.nproc} steps={args.steps} layers={args.layers} d_model={args.d_model} (vocab 8192, T=256, global batch 8)")
    row = {}
    for m, recs in res.items():
        p = max(r["param_bytes"] for r in recs)
        o = max(r["optimizer_bytes"] for r in recs)
        rss = max(r["peak_rss_bytes"] for r in recs)
        step = max(r["train_wall_s"] / max(1, r["steps"]) for r in recs)
        row[m] = (p, o, rss, step)
        print(f"{m:4s}: per rank weights {p * mb:7.1f} MB  AdamW state {o * mb:7.1f} MB  peak RSS {rss * mb:7.0f} MB  "
              f"{step:6.3f} s/step")
    d, f = row["ddp"], row["fsdp"]
    print(f"FSDP / DDP: weights {f[0] / d[0]:.2f}x  AdamW state {f[1] / d[1]:.2f}x  peak RSS {f[2] / d[2]:.2f}x  "
          f"time per step {f[3] / d[3]:.2f}x")


if __name__ == "__main__":
    main()
