"""The MPT-7B drill: a 2-rank gloo run under `torchrun --max-restarts` with injected failures (MPTKIT_FAULTS,
train/faults.py) finishes by itself, with final weights bitwise equal to an uninterrupted 2-rank run; each
fault really fired, and each recovery is in the logs. Also: SIGTERM to the torchrun agent of a 2-rank run
checkpoints and the rerun ends bitwise equal; a recipe typo under torchrun is not retried."""

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

from mptkit.errors import EXIT_NOT_RETRYABLE, EXIT_PREEMPTED
from mptkit.io.checkpoints import find_latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]

JOB = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.errors import TrainPreempted
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration=sys.argv[2], save_interval="2ba", autoresume=True, device="cpu",
               watchdog={{"timeout": 6, "checkpoint_timeout": 60}}, recovery={{"nonfinite": "rollback"}})
tr, ev = datasets()
try:
    Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
except TrainPreempted as e:
    print(f"{{e}} (exit code {{e.exit_code}})", file=sys.stderr)
    sys.exit(e.exit_code)
"""

DRILL_FAULTS = "kill@rank1:step3,hang@rank0:step5,ckpt_kill@rank0:step6,nan@rank0:step8"
NAN = "nan@rank0:step8"  # the uninterrupted reference run meets the same NaN (and skips the same batches)


def _env(faults: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("MPTKIT_FAULTS", None)
    if faults:
        env["MPTKIT_FAULTS"] = faults
    return env


def _cmd(folder: Path, restarts: int, duration: str = "12ba") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder.parent / f"{folder.name}-job.py"
    script.write_text(JOB.format(root=str(ROOT)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), "--monitor-interval", "0.1", str(script), str(folder), duration]


def _torchrun(folder: Path, restarts: int, faults: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(folder, restarts), env=_env(faults), capture_output=True, text=True, timeout=400,
                          check=False)


def _weights(folder: Path, step: int = 12) -> dict:
    last = find_latest_checkpoint(folder / "ck")
    assert last is not None and last.name.endswith(f"-ba{step}"), last
    return load_file(str(last / "model" / "model.safetensors"))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_the_drill_finishes_alone_and_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    clean = _torchrun(tmp_path / "clean", restarts=0, faults=NAN)
    assert clean.returncode == 0, clean.stderr[-3000:]
    drill = _torchrun(tmp_path / "drill", restarts=4, faults=DRILL_FAULTS)
    out = drill.stdout + drill.stderr
    assert drill.returncode == 0, out[-4000:]
    run = tmp_path / "drill" / "run"
    # each fault fired once, each in its own torchrun attempt (so each was recovered from by a restart)
    fired = {json.loads(p.read_text())["fault"]: json.loads(p.read_text()) for p in (run / "faults").glob("*.json")}
    assert sorted(fired) == sorted(DRILL_FAULTS.split(",")), fired
    assert [fired[f]["restart"] for f in DRILL_FAULTS.split(",")] == [0, 1, 2, 3]
    # the hang: rank 0's watchdog fired in attempt 1 after step 4, dumped the stacks (the main thread stuck in
    # the injected hang) and exited with EXIT_WATCHDOG; attempt 2 reported it
    ev = [r for r in _records(tmp_path / "drill") if r.get("event") == "watchdog"]
    assert any(r["rank"] == 0 and r["attempt"] == 1 and r["at_step"] == 4 and r["phase"] == "step" for r in ev), ev
    dump = (run / "failures" / "rank0-attempt1-step4.log").read_text()
    assert "step 5 did not finish" in dump and "faults.py" in dump and "in mid_step" in dump, dump[:3000]
    assert (run / "failures" / "rank0-attempt1-step4.reported.json").exists()
    # the restarts resumed: after the kill from step 2, after the hang from 4, after the killed save of 6 from 4;
    # the NaN at step 8 rolled back (in-process) to the checkpoint of step 6
    resumed = [line.split("resumed from ")[1].split(" at step")[0].rsplit("/", 1)[-1]
               for line in out.splitlines() if "resumed from " in line and "rank" not in line.split(":")[0]]
    assert sorted(set(resumed)) == ["ep0-ba2", "ep0-ba4", "ep0-ba6"], resumed
    recs = _records(tmp_path / "drill")
    nan = [r for r in recs if r.get("event") == "nonfinite"]
    assert len(nan) == 1 and nan[0]["action"] == "rollback" and nan[0]["rollback_to"] == 6, nan
    ref = [r for r in _records(tmp_path / "clean") if r.get("event") == "nonfinite"]
    assert [(r["step"], r["batches_skipped"]) for r in nan] == [(r["step"], r["batches_skipped"]) for r in ref]
    # the faults a restart recovered from are reported by the attempt after them (the NaN, in-process, above)
    faults_logged = {r["fault"] for r in _records(tmp_path / "drill") if r.get("event") == "fault"}
    assert faults_logged == set(DRILL_FAULTS.split(",")) - {NAN}
    summary = json.loads((run / "summary.json").read_text())
    assert {f["fault"] for f in summary["recoveries"]["faults"]} == set(DRILL_FAULTS.split(","))
    # one metrics line per step, and the weights of the run that never failed, bit for bit
    steps = [r["step"] for r in _records(tmp_path / "drill") if "train_loss" in r]
    assert steps == list(range(1, 13)), steps
    _assert_bitwise(_weights(tmp_path / "clean"), _weights(tmp_path / "drill"))


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_of_two_ranks_checkpoints_and_the_rerun_is_bitwise(tmp_path):
    clean = _torchrun(tmp_path / "clean", restarts=0)  # (the same recipe; no NaN: no rollback)
    assert clean.returncode == 0, clean.stderr[-3000:]
    folder = tmp_path / "term"
    p = subprocess.Popen(_cmd(folder, 0), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    metrics = folder / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and '"step": 5,' in metrics.read_text():
            p.send_signal(signal.SIGTERM)  # what SLURM / Kubernetes send the job step's main process
            break
        time.sleep(0.02)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0, err[-3000:]
    assert "stopped by SIGTERM at step" in err and f"(exit code {EXIT_PREEMPTED})" in err, err[-3000:]
    pre = [r for r in _records(folder) if r.get("event") == "preempted"]
    assert len(pre) == 1 and pre[0]["checkpoint"], pre
    saved = Path(pre[0]["checkpoint"])
    assert 5 <= int(saved.name.split("-ba")[1]) < 12, saved  # at the step boundary after the signal
    rerun = subprocess.run(_cmd(folder, 0), env=_env(), capture_output=True, text=True, timeout=400,
                           check=False)
    assert rerun.returncode == 0 and f"resumed from {saved}" in rerun.stderr, rerun.stderr[-3000:]
    _assert_bitwise(_weights(tmp_path / "clean"), _weights(folder))


@pytest.mark.slow
def test_a_recipe_typo_under_torchrun_is_not_retried(tmp_path):
    """torchrun restarts a failed group whatever its exit code; the restarted workers find the error recorded
    by the first attempt and stop at once with EXIT_NOT_RETRYABLE, saying so: the typo is reported once."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("global_train_batch_sise: 8\nmax_duration: 2ba\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "--max-restarts", "3", "--monitor-interval", "0.1", "-m", "mptkit.cli", "train", str(recipe)],
                       env=_env(), capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    first = [x for x in out.splitlines() if "did you mean 'global_train_batch_size'" in x and "not retried" not in x]
    again = [x for x in out.splitlines() if "mptkit train: error: not retried: attempt 0" in x]
    assert len(first) == 1, out[-4000:]  # reported once, by attempt 0
    assert len(again) == 3, out[-4000:]  # torchrun's 3 restarts each stop at once
    assert f"exitcode  : {EXIT_NOT_RETRYABLE}" in out or f"exitcode: {EXIT_NOT_RETRYABLE}" in out, out[-4000:]


@pytest.mark.slow
def test_a_rank_blocked_in_a_collective_is_caught_by_its_watchdog_while_its_peer_holds_the_gil(tmp_path):
    """Rank 1 hangs holding the GIL (``stall``: its own watchdog thread cannot run); rank 0, blocked in the
    step's all-reduce, is stopped by its watchdog (exit 70) with its stack in the collective; rank 1 ends by its
    faulthandler backstop; torchrun restarts both and the run finishes."""
    r = subprocess.run(_cmd(tmp_path / "run", 1, "6ba"), env=_env("stall@rank1:step3"), capture_output=True,
                       text=True, timeout=400, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    failures = tmp_path / "run" / "run" / "failures"
    rec = json.loads((failures / "rank0-attempt0-step2.reported.json").read_text())  # reported by attempt 1
    assert rec["phase"] == "step" and rec["exit_code"] == 70
    dump = (failures / "rank0-attempt0-step2.log").read_text()
    main = dump.split("Thread MainThread")[1]
    assert "all_reduce" in main, main[-2000:]  # the innermost frames: the collective
    assert not list(failures.glob("rank1-*.json"))  # rank 1's Python watchdog could not finish (GIL held) ...
    assert "Timeout (0:00:17)!" in out and "in mid_step" in out, out[-4000:]  # ... its backstop dumped and exited
    assert find_latest_checkpoint(tmp_path / "run" / "ck").name.endswith("-ba6")
