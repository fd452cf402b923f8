"""Zero human intervention: a worker that dies mid-run (SIGKILL, as on a hardware fault) under
`torchrun --max-restarts` is restarted by torchrun itself, autoresumes from the newest valid checkpoint, and
finishes with exactly the weights of a run that never failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, os, signal, sys, threading, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train import checkpoint as ck
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1]); crash_at = int(sys.argv[2])
marker = tmp / "crashed-once"

def fault():  # one simulated hardware fault: kill -9 this worker once a checkpoint >= crash_at exists
    while True:
        cks = ck.list_checkpoints(tmp / "ck") if (tmp / "ck").exists() else []
        if cks and int(cks[0].name.split("-ba")[1]) >= crash_at:
            marker.write_text(os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)

if crash_at > 0 and not marker.exists():
    threading.Thread(target=fault, daemon=True).start()
cfg = make_cfg(tmp, max_duration="40ba", save_interval="5ba", autoresume=True, save_num_checkpoints_to_keep=2)
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def _torchrun(folder: Path, crash_at: int) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "--max-restarts", "2", "--monitor-interval", "0.1", str(script), str(folder), str(crash_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _final_weights(folder: Path) -> dict:
    last = ck.find_latest_checkpoint(folder / "ck")
    assert last is not None and last.name.endswith("-ba40"), last
    return load_file(str(last / "model" / "model.safetensors"))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_finishes_bitwise_identical(tmp_path):
    clean = _torchrun(tmp_path / "clean", crash_at=0)
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = _torchrun(tmp_path / "faulty", crash_at=5)  # the first checkpoint: 35 steps left to be killed in
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    # the fault really happened, in the first attempt, and torchrun (not a person) restarted the worker
    assert (tmp_path / "faulty" / "crashed-once").read_text() == "0"
    # ... and the restarted worker continued from a checkpoint instead of starting over
    assert "resumed from" in faulty.stderr and "resumed from" not in clean.stderr, faulty.stderr[-3000:]
    a, b = _final_weights(tmp_path / "clean"), _final_weights(tmp_path / "faulty")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
