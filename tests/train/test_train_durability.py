"""Nothing lost, nothing forged: one run per folder (an exclusive, heartbeat-refreshed lock), no overwriting
of checkpoints that could not be resumed, resumption refused on other data, corrupt token ids named, one
metrics line per step after a resume, no empty folders after a failed start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptkit.errors import TrainError
from mptkit.train import checkpoint as ck
from mptkit.train import lock as lock_mod
from mptkit.train.lock import LOCK_NAME, RunLock
from mptkit.train.trainer import Trainer
from tests.helpers import datasets, make_cfg

ROOT = Path(__file__).resolve().parents[2]


def _fit(cfg, **kw):
    tr, ev = datasets()
    t = Trainer(cfg, train_dataset=kw.pop("train_dataset", tr), eval_dataset=kw.pop("eval_dataset", ev), **kw)
    return t, t.fit()


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- item 1: one run per folder

TRAIN = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration=sys.argv[2], save_interval="20ba", autoresume=True, save_num_checkpoints_to_keep=2)
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def _train_proc(folder: Path, duration: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", TRAIN.format(root=str(ROOT)), str(folder), duration], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_run_on_a_live_folder_fails_fast_and_a_dead_runs_lock_is_taken_over(tmp_path):
    """Two real training processes on one save folder: the second (the same recipe started again, as a
    scheduler retry would) stops before touching anything, naming the first's pid, host, start time and the
    lock file, while the first keeps training and its in-flight temporary folder survives; once the first is
    killed (SIGKILL leaves its lock behind), the next start breaks the stale lock and resumes."""
    a = _train_proc(tmp_path, "100000ba")
    try:
        deadline = time.time() + 300  # a loaded 2-core machine: wait for the first checkpoint, however slow
        while time.time() < deadline and a.poll() is None:
            if (tmp_path / "ck" / LOCK_NAME).exists() and ck.list_checkpoints(tmp_path / "ck"):
                break
            time.sleep(0.05)
        assert a.poll() is None, a.stderr.read()[-3000:]
        assert ck.list_checkpoints(tmp_path / "ck"), "the first run wrote no checkpoint in 300 s"
        inflight = tmp_path / "ck" / ".ep0-ba99999.abc.tmp"  # what a save in progress looks like
        inflight.mkdir()
        (inflight / "part").write_bytes(b"x")
        info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert info["pid"] == a.pid and info["host"] == socket.gethostname()
        b = _train_proc(tmp_path, "100000ba")
        _, err = b.communicate(timeout=120)
        assert b.returncode != 0
        assert f"pid {a.pid} on host {socket.gethostname()}, started {info['started_at']}" in err, err[-3000:]
        assert str(tmp_path / "run" / LOCK_NAME) in err and "is in use by another training run" in err
        assert "resumed from" not in err and "Traceback" in err and "TrainError" in err
        assert inflight.is_dir() and a.poll() is None  # the second run touched nothing of the first's
    finally:
        a.kill()
        a.communicate(timeout=60)
    assert (tmp_path / "ck" / LOCK_NAME).exists()  # SIGKILL: the lock stays behind, naming a dead pid
    last = ck.find_latest_checkpoint(tmp_path / "ck")
    step = int(last.name.split("-ba")[1])
    c = _train_proc(tmp_path, f"{step + 2}ba")
    _, err = c.communicate(timeout=300)
    assert c.returncode == 0, err[-3000:]
    assert f"broke the stale lock {tmp_path / 'ck' / LOCK_NAME}" in err and f"process {a.pid} is no longer running" in err
    assert f"resumed from {last}" in err
    assert not (tmp_path / "ck" / LOCK_NAME).exists() and not (tmp_path / "run" / LOCK_NAME).exists()


@pytest.mark.slow
def test_every_rank_of_a_second_torchrun_job_fails_fast(tmp_path):
    """A 2-rank torchrun job on a save folder another (live) run holds: rank 0 cannot take the lock and
    raises its TrainError naming the holder; rank 1, told by rank 0, raises too at once (no wait for the
    process-group timeout); nothing is written, and the run folder rank 0 had created is gone again."""
    _fake_lock(tmp_path / "ck", host="node-b", pid=4242, age_s=1)
    script = tmp_path / "job.py"
    script.write_text(TRAIN.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), "8ba"], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "pid 4242 on host node-b" in out and "rank 0 could not take the run's folders" in out, out[-4000:]
    assert time.time() - t0 < 200
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [LOCK_NAME]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_any_failure_of_rank_0_to_take_the_folders_reaches_every_rank(tmp_path):
    """Rank 0 fails to take the folders with an ordinary OSError (a full disk while writing the lock), not an
    mptkit error: rank 1 is told by rank 0 and raises an error naming rank 0's failure (before, only mptkit's
    own errors were broadcast: rank 1 sat in the broadcast until torchrun tore the group down)."""
    script = tmp_path / "job.py"
    patch = ("import errno, os\nimport mptkit.train.lock as L\n"
             "def _full(self):\n    raise OSError(errno.ENOSPC, 'No space left on device', str(self.path))\n"
             "if os.environ.get('RANK') == '0':\n    L.RunLock.acquire = _full\n")
    script.write_text(TRAIN.format(root=str(ROOT)).replace("tmp = Path(sys.argv[1])", patch + "tmp = Path(sys.argv[1])"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), "8ba"], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 0 could not take the run's folders" in out and "No space left on device" in out, out[-4000:]
    assert time.time() - t0 < 200


def _fake_lock(folder: Path, *, host: str, pid: int, age_s: float = 0.0, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / LOCK_NAME
    p.write_text(json.dumps({"format": "mptkit-train-lock", "token": "someone-else", "pid": pid, "host": host,
                             "started_at": "2024-01-02 03:04:05 +0000", **extra}))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_locks_are_broken_and_live_ones_refused(tmp_path, caplog, monkeypatch):
    """A lock naming a dead pid of this host, a reused pid, an old heartbeat of another host, or an earlier
    restart of the same torchrun job is stale and taken over with a warning; another host's lock with a fresh
    heartbeat is refused, naming its holder; the holder's heartbeat refreshes the file; release removes it."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    here, ns = socket.gethostname(), lock_mod.pid_namespace()  # pids are compared only within one pid namespace
    cases = {
        "dead": ({"host": here, "pid": _dead_pid(), "pid_ns": ns}, "is no longer running"),
        "reused": ({"host": here, "pid": os.getppid(), "process_start": "1", "pid_ns": ns},
                   "now belongs to another process"),
        "old-heartbeat": ({"host": "node-b", "pid": 4242, "age_s": 1000}, "has not refreshed it for"),
    }
    for name, (kw, why) in cases.items():
        _fake_lock(tmp_path / name, **kw)
        caplog.clear()
        with RunLock(tmp_path / name, stale_s=300) as lk:
            assert json.loads(lk.path.read_text())["token"] == lk.token
        assert "broke the stale lock" in caplog.text and why in caplog.text, (name, caplog.text)
        assert not (tmp_path / name / LOCK_NAME).exists()
    # another host, heartbeat 10 s old: held; the message names holder, start time and the lock file
    p = _fake_lock(tmp_path / "live", host="node-b", pid=4242, age_s=10)
    with pytest.raises(TrainError, match="pid 4242 on host node-b, started 2024-01-02 03:04:05") as e:
        RunLock(tmp_path / "live", stale_s=300).acquire()
    assert str(p) in str(e.value) and "older than 300 s" in str(e.value)
    # torchrun restarted this job (same run id, higher restart count): its predecessor's lock is taken at once
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _fake_lock(tmp_path / "restart", host="node-b", pid=4242, job={"run_id": "job-7", "restart": 0})
    with RunLock(tmp_path / "restart", stale_s=300):
        pass
    _fake_lock(tmp_path / "other-job", host="node-b", pid=4242, job={"run_id": "job-8", "restart": 0})
    with pytest.raises(TrainError, match="torchrun job job-8"):
        RunLock(tmp_path / "other-job", stale_s=300).acquire()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    # a second lock in this very process on a held folder is refused too
    with RunLock(tmp_path / "mine", heartbeat_s=0.05) as lk:
        with pytest.raises(TrainError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "mine").acquire()
        os.utime(lk.path, (time.time() - 500, time.time() - 500))
        time.sleep(0.5)
        assert time.time() - lk.path.stat().st_mtime < 5  # the heartbeat refreshed it
        lk.check()
        # another run takes the folder over (say, our heartbeat had stalled): the holder notices
        _fake_lock(tmp_path / "other", host="node-c", pid=77)
        os.replace(tmp_path / "other" / LOCK_NAME, lk.path)
        deadline = time.time() + 10
        while not lk.lost and time.time() < deadline:  # two beats in a row must see it (a loaded machine: poll)
            time.sleep(0.05)
        assert lk.lost and "node-c" in lk.lost
        with pytest.raises(TrainError, match="stops without writing"):
            lk.check()
    assert (tmp_path / "mine" / LOCK_NAME).exists()  # not ours any more: release leaves the new holder's lock
    assert json.loads((tmp_path / "mine" / LOCK_NAME).read_text())["host"] == "node-c"


def test_a_run_without_a_save_folder_stops_writing_once_its_run_folder_is_taken_over(tmp_path, monkeypatch):
    """No save folder, so no checkpoint to notice at: the run folder's lock is taken over after step 2 (another
    run replaced the lock file) and the run stops before its next metrics line, naming the lock and the new
    holder; metrics.jsonl ends at step 2, nothing more is written (no export, no summary), and the new
    holder's lock stays."""
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    real = Trainer._train_step

    def step(self, batch):
        if self.step == 2:  # another run takes the folder over; wait until our heartbeat has seen it
            _fake_lock(tmp_path / "other", host="node-c", pid=77)
            os.replace(tmp_path / "other" / LOCK_NAME, self.run_folder / LOCK_NAME)
            deadline = time.time() + 10
            while not self._locks[0].lost and time.time() < deadline:
                time.sleep(0.02)
        return real(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", step)
    export = tmp_path / "hf"
    with pytest.raises(TrainError, match="taken over by pid 77 on host node-c") as e:
        _fit(make_cfg(tmp_path, save_folder=None, export_folder=str(export)))
    assert str(tmp_path / "run" / LOCK_NAME) in str(e.value)
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 2]
    assert not export.exists() and not (tmp_path / "run" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["host"] == "node-c"


def test_a_live_lock_from_another_container_on_this_host_is_judged_by_its_heartbeat(tmp_path, caplog):
    """Containers started with --network host share the hostname and the boot id but not the pids: a lock of
    this host and boot naming a pid that looks dead here, from another pid namespace (or one the lock does
    not record), is refused while its heartbeat is fresh and broken once it is old. A lock records its
    holder's pid namespace."""
    here, boot, ns = socket.gethostname(), lock_mod._boot_id(), lock_mod.pid_namespace()
    with RunLock(tmp_path / "mine") as lk:
        assert json.loads(lk.path.read_text())["pid_ns"] == ns
    if ns is not None:
        assert ns == os.stat("/proc/self/ns/pid").st_ino
    other = (ns or 0) + 1
    for name, extra in (("other-ns", {"pid_ns": other}), ("unknown-ns", {})):
        if name == "unknown-ns" and ns is None:
            continue  # neither side knows its namespace (no /proc): pids are compared as before
        p = _fake_lock(tmp_path / name, host=here, pid=_dead_pid(), boot_id=boot, age_s=5, **extra)
        with pytest.raises(TrainError, match="in use by another training run") as e:
            RunLock(tmp_path / name, stale_s=300).acquire()
        assert str(p) in str(e.value) and "older than 300 s" in str(e.value), (name, e.value)
        assert json.loads(p.read_text())["token"] == "someone-else"  # untouched
        _fake_lock(tmp_path / name, host=here, pid=_dead_pid(), boot_id=boot, age_s=1000, **extra)
        caplog.clear()
        with caplog.at_level("WARNING"), RunLock(tmp_path / name, stale_s=300) as lk:
            assert json.loads(lk.path.read_text())["token"] == lk.token
        assert "broke the stale lock" in caplog.text and "has not refreshed it for" in caplog.text, caplog.text


def test_a_lock_that_cannot_be_read_for_a_moment_is_not_lost(tmp_path, monkeypatch):
    """A read of the lock that fails (an NFS hiccup) or one missing beat (a contender moving it aside to judge
    it) is no verdict: the holder keeps its lock and goes on beating."""
    real = lock_mod._read
    with RunLock(tmp_path, heartbeat_s=0.05) as lk:
        monkeypatch.setattr(lock_mod, "_read", lambda path: (b"", None))  # OSError while reading
        time.sleep(0.5)
        gone = iter([True])  # exactly one beat finds the file missing
        monkeypatch.setattr(lock_mod, "_read", lambda path: (None, None) if next(gone, False) else real(path))
        time.sleep(0.5)
        monkeypatch.setattr(lock_mod, "_read", real)
        assert lk.lost is None
        os.utime(lk.path, (time.time() - 500, time.time() - 500))
        deadline = time.time() + 10
        while time.time() - lk.path.stat().st_mtime > 5 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - lk.path.stat().st_mtime < 5  # still beating
        lk.check()


def test_trainer_refuses_a_held_folder_without_touching_it(tmp_path):
    """A trainer whose save folder is locked by a live run of another host stops in set-up: no stale-temp
    cleanup, no resume, no write; once the holder's heartbeat is stale the same start goes ahead."""
    _fit(make_cfg(tmp_path, max_duration="4ba"))
    inflight = tmp_path / "ck" / ".ep0-ba8.xyz.tmp"
    inflight.mkdir()
    (inflight / "f").write_bytes(b"half")
    _fake_lock(tmp_path / "ck", host="node-b", pid=4242, age_s=5)
    before = _tree(tmp_path)
    with pytest.raises(TrainError, match="pid 4242 on host node-b"):
        _fit(make_cfg(tmp_path, max_duration="8ba", autoresume=True))
    assert _tree(tmp_path) == before
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # the run folder's lock, taken first, was released
    os.utime(tmp_path / "ck" / LOCK_NAME, (time.time() - 10_000,) * 2)
    t, s = _fit(make_cfg(tmp_path, max_duration="8ba", autoresume=True))
    assert t.resumed_from.name == "ep0-ba4" and s["steps"] == 8
    assert not inflight.exists()  # now that the folder is ours, the leftover temp folder is cleaned
    assert not (tmp_path / "ck" / LOCK_NAME).exists()


def test_a_live_holders_heartbeat_keeps_its_lock_and_a_stopped_one_loses_it(tmp_path, monkeypatch):
    """Seen from another host (where only the heartbeat tells), a holder whose heartbeat runs keeps its lock
    long past the stale timeout; once its heartbeat stops, the lock goes stale and is taken over. The shipped
    defaults leave a beat several times inside the timeout (a slow beat never looks dead)."""
    assert lock_mod.STALE_S >= 5 * lock_mod.HEARTBEAT_S
    holder = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    monkeypatch.setattr(lock_mod.socket, "gethostname", lambda: "node-z")  # the contender runs elsewhere
    time.sleep(1.2)
    with pytest.raises(TrainError, match="in use by another training run: pid"):
        RunLock(tmp_path, stale_s=0.5).acquire()
    holder._stop.set()  # the holder's node froze: no more beats
    time.sleep(1.2)
    with RunLock(tmp_path, stale_s=0.5) as taken:
        assert json.loads(taken.path.read_text())["token"] == taken.token


def test_an_error_in_training_releases_the_locks(tmp_path):
    """An error during training releases the folders' locks (the next start does not see a live lock)."""
    def boom(model, mb):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _fit(make_cfg(tmp_path), loss_fn=boom)
    assert not (tmp_path / "ck" / LOCK_NAME).exists() and not (tmp_path / "run" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------- item 13: small things


def test_a_failed_start_leaves_no_empty_folders(tmp_path):
    """A recipe that fails validation in set-up (here a microbatch that does not divide the batch) leaves
    neither the run folder nor the save folder it would have created; folders that existed stay as they were."""
    from mptkit.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        _fit(make_cfg(tmp_path / "new" / "deep", device_train_microbatch_size=3))
    assert not (tmp_path / "new").exists()
    (tmp_path / "old" / "run").mkdir(parents=True)
    (tmp_path / "old" / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not divisible"):
        _fit(make_cfg(tmp_path / "old", device_train_microbatch_size=3))
    assert _tree(tmp_path / "old") == {"run/notes.txt": b"mine"} and not (tmp_path / "old" / "ck").exists()


# ----------------------------------------------------------------------------------- item 4: no overwriting


def _flip_byte(p: Path, at: int = -10) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def test_autoresume_with_every_checkpoint_invalid_refuses_and_changes_nothing(tmp_path):
    """Every checkpoint corrupt (same size, one byte flipped): autoresume does not start from scratch over
    them; it stops, naming the save folder, each checkpoint and why it is invalid, and the ways out; every
    file is byte-identical afterwards."""
    from mptkit.errors import CheckpointError

    _fit(make_cfg(tmp_path, max_duration="8ba"))
    names = [p.name for p in ck.list_checkpoints(tmp_path / "ck")]
    assert names == ["ep0-ba8", "ep0-ba4"]
    _flip_byte(tmp_path / "ck" / "ep0-ba8" / "model" / "model.safetensors")
    _flip_byte(tmp_path / "ck" / "ep0-ba4" / "trainer_state.pt")
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as e:
        _fit(make_cfg(tmp_path, max_duration="12ba", autoresume=True))
    msg = str(e.value)
    assert str(tmp_path / "ck") in msg
    assert "ep0-ba8: model/model.safetensors checksum mismatch" in msg
    assert "ep0-ba4: trainer_state.pt checksum mismatch" in msg
    assert "autoresume=false" in msg and "save_folder" in msg and "move" in msg
    assert _tree(tmp_path) == before


def test_invalid_checkpoints_newer_than_the_resumed_one_are_moved_aside_not_overwritten(tmp_path):
    """The newest checkpoint corrupt, an older one valid: the run resumes from the valid one and, before it
    writes a checkpoint under the corrupt one's name, moves the corrupt one aside intact (ep0-ba8.invalid)."""
    _fit(make_cfg(tmp_path, max_duration="8ba"))
    _flip_byte(tmp_path / "ck" / "ep0-ba8" / "model" / "model.safetensors")
    bad = _tree(tmp_path / "ck" / "ep0-ba8")
    t, _ = _fit(make_cfg(tmp_path, max_duration="8ba", autoresume=True))
    assert t.resumed_from.name == "ep0-ba4"
    assert _tree(tmp_path / "ck" / "ep0-ba8.invalid") == bad
    assert ck.verify_checkpoint(tmp_path / "ck" / "ep0-ba8") is None  # the new one, written by the resumed run


def test_a_checkpoint_whose_replacement_was_interrupted_is_restored_not_deleted(tmp_path):
    """A save that replaces an existing checkpoint moves the old one to .NAME.old-PID before renaming the new
    one in; killed between the two renames, the old one is the only copy: the next start puts it back
    instead of deleting it with the temporary folders."""
    _fit(make_cfg(tmp_path, max_duration="8ba"))
    good = _tree(tmp_path / "ck" / "ep0-ba8")
    os.replace(tmp_path / "ck" / "ep0-ba8", tmp_path / "ck" / ".ep0-ba8.old-4242")
    t, _ = _fit(make_cfg(tmp_path, max_duration="8ba", autoresume=True))
    assert t.resumed_from.name == "ep0-ba8"
    assert _tree(tmp_path / "ck" / "ep0-ba8") == good and not (tmp_path / "ck" / ".ep0-ba8.old-4242").exists()


# ----------------------------------------------------------------------------------- item 5: resuming on other data


def test_resuming_on_other_data_is_refused_unless_accepted(tmp_path, caplog):
    """The checkpoint records what exact resumption depends on (the data's size and content, shuffle seed,
    global batch size). Resuming with any of them changed stops with a message naming the change and the
    recipe key that accepts it; with resume_accept_data_change=true the run continues, with a warning."""
    from mptkit.train.data import TensorDataset
    from tests.helpers import pattern_data

    _fit(make_cfg(tmp_path / "a", max_duration="4ba"))
    cases = {
        "more samples": ({"train_dataset": TensorDataset(pattern_data(72))}, {}, "samples 64 -> 72"),
        "same size, other content": ({"train_dataset": TensorDataset(pattern_data(64, seed=3))}, {},
                                     "dataset content sha256:"),
        "other shuffle seed": ({}, {"seed": 6}, "shuffle seed 5 -> 6"),
        "other batch": ({}, {"global_train_batch_size": 16}, "global_train_batch_size 8 -> 16"),
    }
    for name, (kw, over, change) in cases.items():
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        import shutil

        shutil.copytree(tmp_path / "a", folder)
        before = _tree(folder)
        with pytest.raises(TrainError) as e:
            _fit(make_cfg(folder, max_duration="8ba", autoresume=True, **over), **kw)
        msg = str(e.value)
        assert change in msg and "resume_accept_data_change=true" in msg and "ep0-ba4" in msg, (name, msg)
        assert _tree(folder) == before, name
        caplog.clear()
        t, s = _fit(make_cfg(folder, max_duration="8ba", autoresume=True, resume_accept_data_change=True, **over),
                    **kw)
        assert t.resumed_from.name == "ep0-ba4" and s["steps"] == 8
        assert change in caplog.text and "resume_accept_data_change" in caplog.text, name
    # the unchanged data resumes silently
    caplog.clear()
    t, _ = _fit(make_cfg(tmp_path / "a", max_duration="8ba", autoresume=True))
    assert t.resumed_from.name == "ep0-ba4" and "changed data" not in caplog.text


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tokenizer and two prepared corpora (the second with more documents), small shards."""
    from mptkit.data.prepare import prepare_dataset
    from mptkit.data.tokenizer import train_tokenizer

    base = tmp_path_factory.mktemp("durable-data")
    tok = train_tokenizer(None, 320, base / "tok", max_files=3)
    for name, n in (("a", 300), ("b", 330)):
        src = base / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": f"doc {i}: " + "word " * (i % 13 + 1)}) + "\n" for i in range(n)))
        prepare_dataset([str(src)], tok, base / name, 16, val_fraction=0.0, shard_bytes=16 * 2 * 37, progress=False)
    return base


def _data_cfg(tmp, data: Path, tok: Path, **over):
    from tests.helpers import TINY_MODEL

    return make_cfg(tmp, model={**TINY_MODEL, "vocab_size": 320, "max_seq_len": 16}, tokenizer={"name": str(tok)},
                    train_loader={"name": "text", "dataset": {"local": str(data), "split": "train", "shuffle": False}},
                    **over)


def test_resuming_on_re_prepared_data_is_refused(tmp_path, prepared):
    """The reported case: the corpus was prepared again with more documents under the same folder name;
    resuming names the change (samples, content) instead of silently continuing on another order."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared / "a", data)
    _fit_recipe(_data_cfg(tmp_path, data, prepared / "tok", max_duration="2ba"))
    n_a = len(_token_dataset(data))
    shutil.rmtree(data)
    shutil.copytree(prepared / "b", data)
    n_b = len(_token_dataset(data))
    assert n_b > n_a
    with pytest.raises(TrainError, match=f"samples {n_a:,} -> {n_b:,}; dataset content sha256:"):
        _fit_recipe(_data_cfg(tmp_path, data, prepared / "tok", max_duration="4ba", autoresume=True))


def test_resuming_on_the_same_data_prepared_again_goes_on(tmp_path, prepared):
    """Preparing the same corpus again (``force``: new shard files under a new generation folder) leaves the
    data stream as it was: the resume is not refused and continues from its checkpoint."""
    import shutil

    from mptkit.data.prepare import prepare_dataset

    data = tmp_path / "data"
    shutil.copytree(prepared / "a", data)
    _fit_recipe(_data_cfg(tmp_path, data, prepared / "tok", max_duration="2ba"))
    before = sorted(p.relative_to(data) for p in data.rglob("*.bin"))
    prepare_dataset([str(prepared / "a.jsonl")], prepared / "tok", data, 16, val_fraction=0.0,
                    shard_bytes=16 * 2 * 37, progress=False, force=True)
    assert sorted(p.relative_to(data) for p in data.rglob("*.bin")) != before  # rewritten under other names
    t, summary = _fit_recipe(_data_cfg(tmp_path, data, prepared / "tok", max_duration="4ba", autoresume=True))
    assert t.resumed_from is not None and summary["steps"] == 4


def _fit_recipe(cfg):
    t = Trainer(cfg)
    return t, t.fit()


def _token_dataset(folder):
    from mptkit.data.shards import TokenDataset

    return TokenDataset(folder)


def test_a_token_id_outside_the_vocabulary_is_a_data_error_naming_where_it_is(tmp_path, prepared):
    """A shard corrupted in place (same size, so only a full checksum would notice): the first batch that
    holds the bad id stops the run with a DataError naming the dataset folder, the shard file, the sample,
    its row in the shard and the id, instead of an IndexError deep in the embedding hours later."""
    import shutil

    import numpy as np

    from mptkit.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(prepared / "a", data)
    ds = _token_dataset(data)
    shard = data / ds.manifest["splits"]["train"]["shards"][1]["file"]
    first = ds.manifest["splits"]["train"]["shards"][0]["num_samples"]
    arr = np.memmap(shard, dtype=np.uint16, mode="r+")
    arr[1 * 16 + 5] = 60000  # sample `first + 1` (row 1 of the second shard), position 5
    arr.flush()
    del arr
    with pytest.raises(DataError) as e:
        _fit_recipe(_data_cfg(tmp_path, data, prepared / "tok", max_duration="1ep", global_train_batch_size=4,
                              device_train_microbatch_size=4))
    msg = str(e.value)
    assert str(data) in msg and shard.name in msg and f"sample {first + 1} " in msg and "row 1" in msg, msg
    assert "token id 60000" in msg and "vocab_size 320" in msg and "sha256" in msg, msg


def test_an_optimizer_change_across_a_resume_is_named_and_takes_effect(tmp_path, caplog):
    """Resuming with another lr, betas or weight_decay (e.g. a lower lr after a loss spike, as the spike
    monitor advises) warns naming each change, and the recipe's values are the ones used from then on
    (torch's load_state_dict would silently bring back the checkpoint's)."""
    _fit(make_cfg(tmp_path, max_duration="4ba"))
    caplog.clear()
    opt = {"name": "decoupled_adamw", "lr": 1e-3, "betas": [0.8, 0.95], "weight_decay": 0.1}
    t, _ = _fit(make_cfg(tmp_path, max_duration="6ba", autoresume=True, optimizer=opt))
    assert t.resumed_from.name == "ep0-ba4"
    assert "the optimizer changed since ep0-ba4" in caplog.text
    for change in ("lr 0.003 -> 0.001", "betas [0.9, 0.95] -> [0.8, 0.95]", "weight_decay 0.0 -> 0.1"):
        assert change in caplog.text, caplog.text
    g = t.optimizer.param_groups[0]
    assert g["initial_lr"] == 1e-3 and tuple(g["betas"]) == (0.8, 0.95) and g["weight_decay"] == 0.1
    caplog.clear()
    _fit(make_cfg(tmp_path, max_duration="8ba", autoresume=True, optimizer=opt))
    assert "the optimizer changed" not in caplog.text  # the same again: silent


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    """A run killed after step 12 with its last checkpoint at step 8 is resumed: metrics.jsonl drops the
    replayed steps 9-12 of the first attempt (and any line cut by the kill), so every step appears once
    and the curve `mptkit plot` draws is the resumed run's."""
    from mptkit.train.plot import read_metrics

    _fit(make_cfg(tmp_path, max_duration="12ba"))
    import shutil

    shutil.rmtree(tmp_path / "ck" / "ep1-ba12")  # as if killed between step 12 and its checkpoint
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train_lo')  # a line cut by the kill
    first = {r["step"]: r for r in read_metrics(tmp_path / "run") if "train_loss" in r}
    _fit(make_cfg(tmp_path, max_duration="12ba", autoresume=True))
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    recs = [json.loads(x) for x in text.splitlines()]  # every line parses
    steps = [r["step"] for r in recs if "train_loss" in r]
    assert steps == list(range(1, 13))
    by = {r["step"]: r for r in recs if "train_loss" in r}
    assert all(by[s] == first[s] for s in range(1, 9))  # the steps before the checkpoint are the first run's
    assert sum(1 for r in recs if r.get("event") == "start") == 2  # both starts are kept, the resume marked
    assert [r["start_step"] for r in recs if r.get("event") == "start"] == [0, 8]
    from mptkit.train.plot import plot_run

    assert plot_run(tmp_path / "run").read_bytes()[:4] == b"\x89PNG"  # `mptkit plot` reads it as it is


def test_generate_says_when_the_context_caps_max_new_tokens(tmp_path, make_tokenizer, caplog, capsys):
    """`mptkit generate --max-new-tokens 100000` on a 64-token context: one warning gives the cap (context
    minus prompt) and the way to raise it, and generation stops there as before; a request that fits is
    silent."""
    import logging

    import torch

    from mptkit.cli import main
    from mptkit.io import load_tokenizer
    from mptkit.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    tok = load_tokenizer(make_tokenizer())
    torch.manual_seed(0)
    d = tmp_path / "m"
    MPTForCausalLM(tiny_cfg(vocab_size=len(tok), max_seq_len=64)).save_pretrained(d, tokenizer=tok)
    n_prompt = len(tok.encode("def f(x):", add_special_tokens=False))
    caplog.set_level(logging.WARNING)
    args = ["generate", str(d), "--prompt", "def f(x):", "--ignore-eos"]
    assert main([*args, "--max-new-tokens", "100000"]) == 0
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, warns
    assert (f"--max-new-tokens 100000: the context holds 64 tokens and the prompt takes {n_prompt}, so at most "
            f"{64 - n_prompt} new tokens") in warns[0] and "--max-context" in warns[0]
    assert f"[{64 - n_prompt} tokens" in capsys.readouterr().err
    caplog.clear()
    assert main([*args, "--max-new-tokens", "5"]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
