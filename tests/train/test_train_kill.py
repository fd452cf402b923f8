"""SIGKILL mid-run, then autoresume: the final weights equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.train import checkpoint as ck
from tests.helpers import kill_after_checkpoint

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration="150ba", save_interval="5ba", autoresume=True, save_num_checkpoints_to_keep=3)
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def _run(folder: Path, kill_after_step: int | None = None) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), str(folder)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_step is None:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        return p.returncode, err.decode()
    kill_after_checkpoint(p, folder / "ck", kill_after_step)
    _, err = p.communicate(timeout=60)
    return p.returncode, err.decode()


@pytest.mark.slow
def test_sigkill_then_autoresume_is_bitwise_identical(tmp_path):
    """Kill -9 a training process after its step-10 checkpoint, rerun the same command (autoresume):
    the resumed run finishes with exactly the uninterrupted run's weights."""
    _run(tmp_path / "full")
    rc, _ = _run(tmp_path / "killed", kill_after_step=10)
    assert rc == -signal.SIGKILL, "the process finished before it could be killed: make the run longer"
    before = ck.find_latest_checkpoint(tmp_path / "killed" / "ck")
    assert before is not None and int(before.name.split("-ba")[1]) < 150
    _, log = _run(tmp_path / "killed")
    assert f"resumed from {before}" in log, log[-2000:]  # it continued, it did not start over
    a = load_file(str(tmp_path / "full" / "ck" / ck.list_checkpoints(tmp_path / "full" / "ck")[0].name / "model" /
                      "model.safetensors"))
    last = ck.find_latest_checkpoint(tmp_path / "killed" / "ck")
    assert last.name.endswith("-ba150")
    b = load_file(str(last / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
