"""The recovery drill as a benchmark: time from each injected fault to the first new step, and goodput.

Runs an uninterrupted 2-rank gloo run and the drill (the same run under `torchrun --max-restarts 4` with
MPTKIT_FAULTS kill@rank1, hang@rank0 (the step watchdog fires), ckpt_kill@rank0 and a NaN handled by
rollback), on the tiny test model, and prints for each fault: when it fired, when it was detected (torchrun's
report of the failed worker or the watchdog's event), and the first step any attempt finished after it; then
the goodput of both runs (useful step time: the step_s of the steps in the final metrics.jsonl / wall time).

    flock /tmp/mptkit-bench.lock python bench/bench_faults.py [--steps 24] [--watchdog-timeout 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration=sys.argv[2], save_interval="2ba", autoresume=True, device="cpu",
               watchdog={{"timeout": float(sys.argv[3]), "checkpoint_timeout": 60}}, recovery={{"nonfinite": "rollback"}})
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def run(folder: Path, faults: str, steps: int, timeout: float, restarts: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "job.py"
    script.write_text(JOB.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPTKIT_FAULTS": faults,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           str(restarts), "--monitor-interval", "0.1", str(script), str(folder), f"{steps}ba", str(timeout)]
    seen: dict[tuple, float] = {}  # (attempt-visible step line) -> its time; polled, since resumes rewrite the file
    metrics = folder / "run" / "metrics.jsonl"
    t0 = time.time()
    with open(folder / "torchrun.log", "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None:
            _poll(metrics, seen)
            time.sleep(0.02)
    wall = time.time() - t0
    _poll(metrics, seen)
    if p.returncode != 0:
        raise SystemExit(f"{folder.name}: torchrun exited {p.returncode}; see {folder / 'torchrun.log'}")
    final = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    useful = sum(r["step_s"] for r in final if "train_loss" in r)
    return {"wall": wall, "useful": useful, "t0": t0, "seen": seen, "final": final, "folder": folder}


def _poll(metrics: Path, seen: dict) -> None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return
    for x in lines:
        try:
            r = json.loads(x)
        except ValueError:
            continue
        if "train_loss" in r:
            seen.setdefault((r["step"], r["time"]), r["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--watchdog-timeout", type=float, default=6.0)
    a = ap.parse_args()
    faults = "kill@rank1:step3,hang@rank0:step7,ckpt_kill@rank0:step10,nan@rank0:step14"
    with tempfile.TemporaryDirectory() as tmp:
        clean = run(Path(tmp) / "clean", "nan@rank0:step14", a.steps, a.watchdog_timeout, 0)
        drill = run(Path(tmp) / "drill", faults, a.steps, a.watchdog_timeout, 4)
        run_folder = drill["folder"] / "run"
        fired = sorted((json.loads(p.read_text()) for p in (run_folder / "faults").glob("*.json")),
                       key=lambda r: r["time"])
        dog = [json.loads(p.read_text()) for p in (run_folder / "failures").glob("*.json")]
        step_times = sorted(drill["seen"].values())
        print(f"drill: {a.steps} steps, 2 gloo ranks, watchdog.timeout {a.watchdog_timeout:g} s, faults {faults}")
        print(f"{'fault':28s} {'attempt':>7s} {'detected after':>15s} {'first new step after':>21s}")
        for f in fired:
            nxt = next((t for t in step_times if t > f["time"]), None)
            det = ""
            if f["kind"] == "hang":
                w = [d for d in dog if d["rank"] == f["rank"]]
                det = f"{min(d['time'] for d in w) - f['time']:.1f} s (watchdog)" if w else "?"
            after = f"{nxt - f['time']:.1f} s" if nxt else "-"
            print(f"{f['fault']:28s} {f['restart']:>7d} {det:>15s} {after:>21s}")
        for name, r in (("uninterrupted", clean), ("drill", drill)):
            print(f"{name:14s} wall {r['wall']:6.1f} s, useful step time {r['useful']:5.2f} s, goodput "
                  f"{100 * r['useful'] / r['wall']:5.2f}%")
        print(f"drill overhead: {drill['wall'] - clean['wall']:.1f} s more wall time than the uninterrupted run")


if __name__ == "__main__":
    main()
