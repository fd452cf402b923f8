"""`mptkit plot RUN`: loss (train and eval), learning rate and throughput curves from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mptkit.errors import TrainError


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        raise TrainError(f"{p}: no metrics.jsonl (is this a run folder written by `mptkit train`?)")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
    return out


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a PNG with train/eval loss, lr and tokens/s vs step; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("mptkit plot needs matplotlib: pip install 'mptkit[plot]' (or pip install matplotlib)") from None
    recs = read_metrics(run)
    train = [r for r in recs if "train_loss" in r and "step" in r]
    ev = [r for r in recs if "eval_loss" in r and "step" in r and "event" not in r]  # not the end event's summary
    if not train and not ev:
        raise TrainError(f"{run}: metrics.jsonl holds no training steps yet")
    # one point per step (a resume drops the replayed steps' lines; a rerun of a finished run evaluates again)
    by_step = {r["step"]: r for r in train}
    train = [by_step[s] for s in sorted(by_step)]
    ev_by_step = {r["step"]: r for r in ev}
    ev = [ev_by_step[s] for s in sorted(ev_by_step)]
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r.get("lr", 0) for r in train])
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train], label="tokens/s")
    ax.set_xlabel("step")
    ax.set_title("throughput (tokens/s)")
    if any("mfu" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [100 * r.get("mfu", 0) for r in train], color="tab:orange", alpha=0.6)
        ax2.set_ylabel("MFU %")
    ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    from mptkit.utils.fs import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
