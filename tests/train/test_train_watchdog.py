"""The step watchdog (train/watchdog.py) and fault injection (train/faults.py), in process: the watchdog's stack
dump shows where the main thread is stuck, a checkpoint that keeps growing does not trip it, the derived
timeout follows the step time; MPTKIT_FAULTS is checked and fires each fault once per run folder."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from mptkit.errors import EXIT_WATCHDOG, ConfigError
from mptkit.train.faults import FaultInjector, parse_faults
from mptkit.train.sections import WatchdogConfig
from mptkit.train.watchdog import StepWatchdog
from tests.helpers import make_cfg


def _dog(tmp_path, **kw):
    fired = threading.Event()
    codes = []

    def exit_fn(code):
        codes.append(code)
        fired.set()

    dog = StepWatchdog(WatchdogConfig.from_dict(kw), rank=3, run_folder=tmp_path, exit_fn=exit_fn)
    return dog, fired, codes


def _wedged_read(fired: threading.Event) -> None:
    fired.wait(120)  # the main thread stuck, as in a read from a dead mount


def test_a_hang_dumps_every_stack_records_the_event_and_exits_with_the_watchdog_code(tmp_path):
    dog, fired, codes = _dog(tmp_path, timeout=0.3)
    dog.start(step=7)
    try:
        _wedged_read(fired)
    finally:
        dog.stop()
    assert codes == [EXIT_WATCHDOG]
    log = (tmp_path / "failures" / "rank3-attempt0-step7.log").read_text()
    assert log.startswith("mptkit step watchdog: rank 3") and "step 8 did not finish" in log
    assert "in _wedged_read" in log and "Thread MainThread" in log and "mptkit-step-watchdog" in log
    rec = json.loads((tmp_path / "failures" / "rank3-attempt0-step7.json").read_text())
    assert rec["event"] == "watchdog" and rec["rank"] == 3 and rec["step"] == 7 and rec["phase"] == "step"
    assert rec["exit_code"] == EXIT_WATCHDOG and rec["idle_s"] > 0.3


def test_a_checkpoint_that_keeps_growing_does_not_trip_it_one_that_stalls_does(tmp_path):
    dog, fired, _ = _dog(tmp_path, timeout=0.2, checkpoint_timeout=2.0)
    size = [0]
    dog.start(step=4)
    try:
        with dog.phase("checkpoint", progress=lambda: size[0]):
            for _ in range(60):  # 3 s of writing: longer than the timeout, never 2 s without growth
                size[0] += 1
                time.sleep(0.05)
            assert not fired.is_set()
            assert fired.wait(120)  # the save stalls
    finally:
        dog.stop()
    rec = json.loads((tmp_path / "failures" / "rank3-attempt0-step4.json").read_text())
    assert rec["phase"] == "checkpoint" and rec["timeout_s"] == 2.0
    assert "no progress writing the checkpoint of step 4" in (tmp_path / "failures" / "rank3-attempt0-step4.log").read_text()


def test_the_derived_timeout_follows_the_slowest_step_with_a_floor(tmp_path):
    dog, _, _ = _dog(tmp_path, min_timeout=30, step_multiplier=10, first_step_timeout=900)
    assert dog.timeout() == 900  # before the first step of the attempt
    dog.step_done(1, 0.5)
    assert dog.timeout() == 30  # the floor
    dog.step_done(2, 12.0)
    dog.step_done(3, 1.0)
    assert dog.timeout() == 120  # 10 x the slowest
    with dog.phase("eval"):
        assert dog.timeout() is None  # paused
    with dog.phase("checkpoint", progress=lambda: 0):
        assert dog.timeout() == 600


def test_recipe_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'watchdog.timeout'"):
        make_cfg(tmp_path, watchdog={"timout": 5})
    with pytest.raises(ConfigError, match="watchdog.timeout: expected a positive number"):
        make_cfg(tmp_path, watchdog={"timeout": 0})
    assert make_cfg(tmp_path, watchdog=False).watchdog.enabled is False


def test_faults_are_parsed_and_fire_once_per_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'hang'"):
        parse_faults("hnag@rank0:step3")
    with pytest.raises(ConfigError, match="KIND@rankR:stepN"):
        parse_faults("kill@1:3")
    faults = parse_faults("nan@rank0:step2, kill@rank1:step3")
    assert [f.name for f in faults] == ["nan@rank0:step2", "kill@rank1:step3"]
    a = FaultInjector(faults, rank=0, run_folder=tmp_path)
    assert a.loss(1, 2.5) == 2.5
    assert math.isnan(a.loss(2, 2.5))  # fires
    assert a.loss(2, 2.5) == 2.5  # once
    b = FaultInjector(faults, rank=0, run_folder=tmp_path)  # a restarted worker: the fault fired already
    assert b.loss(2, 2.5) == 2.5
    rec = json.loads((tmp_path / "faults" / "nan@rank0:step2.json").read_text())
    assert rec["fault"] == "nan@rank0:step2" and rec["restart"] == 0
    assert not (tmp_path / "faults" / "kill@rank1:step3.json").exists()  # rank 1's: not this rank's to fire
