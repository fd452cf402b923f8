"""Preemption: SIGTERM (a scheduler's, a spot instance's) stops a run at the next step boundary with a
checkpoint and the documented exit code (``mptkit.errors.EXIT_PREEMPTED``); rerunning the same command resumes
from it, and the finished weights equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.errors import EXIT_PREEMPTED
from mptkit.io.checkpoints import find_latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.errors import TrainPreempted
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration="120ba", save_interval="50ba", autoresume=True)
tr, ev = datasets()
try:
    Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
except TrainPreempted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def _steps(folder: Path) -> list[dict]:
    f = folder / "run" / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _run(folder: Path, term_after_step: int | None = None) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), str(folder)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if term_after_step is not None:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if any(r.get("step", 0) >= term_after_step for r in _steps(folder)):
                p.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
    _, err = p.communicate(timeout=300)
    return p.returncode, err.decode()


@pytest.mark.slow
def test_sigterm_checkpoints_exits_with_the_documented_code_and_resumes_bitwise(tmp_path):
    rc, err = _run(tmp_path / "full")
    assert rc == 0, err[-2000:]
    rc, err = _run(tmp_path / "term", term_after_step=7)
    assert rc == EXIT_PREEMPTED, err[-2000:]
    saved = find_latest_checkpoint(tmp_path / "term" / "ck")
    step = int(saved.name.split("-ba")[1])
    assert 7 <= step < 50, saved  # a checkpoint at the step boundary after the signal, not a periodic one
    assert f"stopped by SIGTERM at step {step}/120" in err and str(saved) in err
    events = [r for r in _steps(tmp_path / "term") if r.get("event") == "preempted"]
    assert events == [{**events[0], "step": step, "signal": "SIGTERM", "checkpoint": str(saved)}]
    rc, err = _run(tmp_path / "term")  # the same command again
    assert rc == 0 and f"resumed from {saved}" in err, err[-2000:]
    a_ck = list_checkpoints(tmp_path / "full" / "ck")[0]
    b_ck = find_latest_checkpoint(tmp_path / "term" / "ck")
    assert a_ck.name == b_ck.name and a_ck.name.endswith("-ba120")
    a = load_file(str(a_ck / "model" / "model.safetensors"))
    b = load_file(str(b_ck / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_cli_exits_with_the_preempted_code_and_a_one_line_message(monkeypatch, capsys):
    """`mptkit train` turns TrainPreempted into its exit code (no traceback, not the error code 2)."""
    import argparse

    from mptkit.cli import main
    from mptkit.errors import TrainPreempted

    def stopped(args):
        raise TrainPreempted("stopped by SIGTERM at step 3/10: checkpoint X; run the same command again")

    real = argparse.ArgumentParser.parse_args

    def parse(self, argv=None, namespace=None):
        ns = real(self, argv, namespace)
        if getattr(ns, "command", None) == "train":
            ns.func = stopped
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    assert main(["train", "quickstart"]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert err.strip() == "mptkit train: stopped by SIGTERM at step 3/10: checkpoint X; run the same command again"
