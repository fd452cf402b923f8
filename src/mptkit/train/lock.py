"""One training run per folder: an exclusive lock file in the run folder and the save folder.

Two ``mptkit train`` processes on one save folder (the same recipe started twice, e.g. by a scheduler retry)
would otherwise resume from each other's checkpoints, write the same checkpoint names and interleave one
metrics.jsonl. The trainer's rank 0 takes :class:`RunLock` on each folder before it writes anything there
(the other ranks of its job are told the outcome); a second job fails at once, naming the holder.

The lock is a file, ``<folder>/.mptkit-train.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local file
systems and on NFSv3 and later), holding the holder's pid, pid namespace, host, boot id, process start time, torchrun job
and a random token. The holder refreshes the file's mtime every ``heartbeat_s`` seconds from a daemon
thread and removes the file when it releases the lock (at the end of ``fit``, on an error, or at exit). A
lock left behind by a process that died (SIGKILL, power cut) is *stale* and is broken, with a warning, by
the next run that wants the folder:

* same host (same hostname and boot id) and same pid namespace: the pid no longer runs, or it now belongs
  to another process (its start time differs from the recorded one);
* the host rebooted: at once;
* another host, or another (or an unrecorded) pid namespace on this host (containers started with
  ``--network host`` share the hostname and boot id, not the pids): the heartbeat is older than
  ``stale_s`` (measured against the file system's own clock, so clock skew between nodes does not matter);
* the same torchrun job (``TORCHELASTIC_RUN_ID``) at an earlier restart count: torchrun only restarts a job
  after its previous workers are gone, so the new incarnation takes its predecessor's lock at once.

The holder checks on every heartbeat that the file still holds its token; a run whose lock was taken from
it (its heartbeat stalled past ``stale_s``, e.g. a suspended process) notices at two beats in a row, and the
trainer stops before its next write: rank 0 checks before every metrics line and before the export, and all
ranks together before every checkpoint (:meth:`RunLock.check`, :attr:`RunLock.lost`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

from mptkit.errors import TrainError
from mptkit.utils.env import env_number
from mptkit.utils.fs import fsync_dir

log = logging.getLogger(__name__)

LOCK_NAME = ".mptkit-train.lock"


HEARTBEAT_S = env_number("MPTKIT_LOCK_HEARTBEAT_S", 30.0, float)  # how often the holder refreshes the lock's mtime
STALE_S = env_number("MPTKIT_LOCK_STALE_S", 300.0, float)  # a lock of another host not refreshed for this long is stale
_UNREADABLE_GRACE_S = 30.0  # an empty/unreadable lock younger than this is being written: held

_HELD: dict[str, str] = {}  # lock path -> token, for the locks this process holds now
_HELD_MU = threading.Lock()


# ----------------------------------------------------------------------------------- who is holding it


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """This process's pid namespace (the inode of ``/proc/self/ns/pid``), None where unreadable. Containers
    started with ``--network host`` share the hostname and the boot id but each has its own pids: a pid is
    only meaningful within the namespace that recorded it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc/PID/stat`` field 22);
    None where unknown. Together with the boot id it tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    try:
        return stat[stat.rindex(")") + 2:].split()[19]
    except (ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _job() -> dict | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    try:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        restart = 0
    return {"run_id": run_id, "restart": restart}


def holder_info(token: str) -> dict:
    """What the lock file says about its holder (this process)."""
    now = time.time()
    return {"format": "mptkit-train-lock", "version": 1, "token": token, "pid": os.getpid(),
            "host": socket.gethostname(), "boot_id": _boot_id(), "process_start": process_start(os.getpid()),
            "pid_ns": pid_namespace(),
            "started": now, "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
            "job": _job(), "argv": " ".join(sys.argv)[:500]}


def describe_holder(info: dict | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    s = f"pid {info.get('pid')} on host {info.get('host')}"
    if info.get("started_at"):
        s += f", started {info['started_at']}"
    if info.get("job"):
        s += f" (torchrun job {info['job'].get('run_id')}, restart {info['job'].get('restart')})"
    return s


def _read(path: Path) -> tuple[bytes | None, dict | None]:
    """(raw bytes or None if missing, parsed info or None if unreadable)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError:
        return b"", None
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw, None
    return raw, info if isinstance(info, dict) else None


def fs_now(folder: Path) -> float:
    """The file system's current time as seen in ``folder`` (the mtime of a file created there now): lock
    ages are measured in the clock that stamped the heartbeat, so skew between nodes does not count."""
    try:
        fd, p = tempfile.mkstemp(prefix=".mptkit-clock-", dir=folder)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(p)


def same_pid_namespace(info: dict) -> bool:
    """Whether the lock's pid can be looked up here: it was recorded in this process's pid namespace (or
    neither side can tell its namespace: no ``/proc``, where containers do not share a hostname this way). A
    lock of another or an unrecorded namespace (another container on this host, an older mptkit) is judged
    by its heartbeat, as one of another host."""
    mine, theirs = pid_namespace(), info.get("pid_ns")
    if mine is None and theirs is None:
        return True
    return mine is not None and theirs == mine


def why_stale(info: dict | None, age_s: float, *, stale_s: float, path: Path | None = None) -> str | None:
    """Why a lock whose file says ``info`` and whose heartbeat is ``age_s`` old is stale; None if it is held."""
    if info is None:
        if age_s > _UNREADABLE_GRACE_S:
            return f"the lock file is unreadable and {age_s:.0f} s old"
        return None
    job, mine = info.get("job"), _job()
    if job and mine and job.get("run_id") == mine["run_id"] and int(job.get("restart", 0)) < mine["restart"]:
        return (f"it was taken by restart {job.get('restart')} of this torchrun job (now restart "
                f"{mine['restart']}): torchrun restarts a job only after its workers have exited")
    same_host = info.get("host") == socket.gethostname()
    boot = _boot_id()
    if same_host and info.get("boot_id") and boot and info["boot_id"] != boot:
        return f"host {info.get('host')} has rebooted since the lock was taken"
    if same_host and same_pid_namespace(info):
        pid = info.get("pid")
        if not isinstance(pid, int):
            return "the lock file names no pid"
        if pid == os.getpid():
            with _HELD_MU:
                live = path is not None and _HELD.get(str(path)) == info.get("token")
            return None if live else "it was left by this process, which no longer holds it"
        if not pid_alive(pid):
            return f"process {pid} is no longer running"
        st = process_start(pid)
        if st is not None and info.get("process_start") is not None and st != str(info["process_start"]):
            return f"pid {pid} now belongs to another process (it was reused)"
        return None
    if age_s > stale_s:
        where = f"host {info.get('host')}" + (" (another pid namespace: another container)" if same_host else "")
        return f"its holder on {where} has not refreshed it for {age_s:.0f} s (> {stale_s:.0f} s)"
    return None


# ----------------------------------------------------------------------------------- the lock


class _State:
    def __init__(self) -> None:
        self.lost: str | None = None


def _beat(path: Path, token: str, every: float, stop: threading.Event, state: _State) -> None:
    """Refresh the lock's mtime every ``every`` seconds. A read that fails (an NFS hiccup) or a file caught
    mid-write is not a verdict: the lock counts as lost only when two beats in a row find it missing or
    another run's (a contender judging it stale moves it aside and back within one beat)."""
    misses = 0
    while not stop.wait(every):
        raw, info = _read(path)
        if raw is not None and info is None:
            continue  # unreadable just now: no verdict, try again at the next beat
        if raw is None or info.get("token") != token:
            misses += 1
            if misses < 2:
                continue
            state.lost = (f"the lock {path} was removed" if raw is None else
                          f"the lock {path} was taken over by {describe_holder(info)}")
            log.error("%s: this run no longer owns its folder and stops before its next write there (metrics line, "
                      "checkpoint or export)", state.lost)
            return
        misses = 0
        with contextlib.suppress(OSError):
            os.utime(path)  # the heartbeat: the file system stamps the time


def _release(path: Path, token: str, stop: threading.Event) -> None:
    stop.set()
    with _HELD_MU:
        if _HELD.get(str(path)) == token:
            del _HELD[str(path)]
    _, info = _read(path)
    if (info or {}).get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class RunLock:
    """An exclusive, heartbeat-refreshed lock on a run or save folder (see the module docstring).

    ``RunLock(folder).acquire()`` creates the folder if needed and takes the lock, or raises
    :class:`TrainError` naming the holder (pid, host, start time) and the lock file. ``release()`` (also
    on garbage collection and at interpreter exit) removes it."""

    def __init__(self, folder: str | os.PathLike, *, heartbeat_s: float | None = None, stale_s: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s = float(HEARTBEAT_S if heartbeat_s is None else heartbeat_s)
        self.stale_s = float(STALE_S if stale_s is None else stale_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._state = _State()
        self._held = False
        self._finalizer = None

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, held={self._held})"

    @property
    def held(self) -> bool:
        return self._held

    @property
    def lost(self) -> str | None:
        """Why this lock is no longer ours (taken over or removed), else None."""
        return self._state.lost

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(holder_info(self.token), indent=1) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.folder)
        return True

    def _break(self, raw: bytes, reason: str, info: dict | None) -> None:
        """Move a stale lock file aside, unless it changed since it was judged stale (then put it back)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{self.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        got, _ = _read(aside)
        if got != raw:  # a new holder took it between our read and the rename: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                log.error("lock %s: a fresh lock was moved aside by mistake and another one appeared meanwhile; "
                          "its owner will notice at its next heartbeat", self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    if not self.path.exists():
                        os.rename(aside, self.path)
            with contextlib.suppress(OSError):
                aside.unlink()
            return
        with contextlib.suppress(OSError):
            aside.unlink()
        log.warning("broke the stale lock %s held by %s: %s", self.path, describe_holder(info), reason)

    def acquire(self) -> RunLock:
        if self._held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(8):
            if self._create():
                break
            raw, info = _read(self.path)
            if raw is None:
                continue  # released meanwhile: try again
            try:
                age = max(0.0, fs_now(self.folder) - self.path.stat().st_mtime)
            except FileNotFoundError:
                continue
            reason = why_stale(info, age, stale_s=self.stale_s, path=self.path)
            if reason is None:
                raise TrainError(self._held_message(info, age))
            self._break(raw, reason, info)
        else:
            raise TrainError(f"could not take the lock {self.path}: other processes keep creating and breaking it")
        _, info = _read(self.path)
        if (info or {}).get("token") != self.token:  # paranoia for file systems whose O_EXCL is not atomic
            raise TrainError(self._held_message(info, 0.0))
        self._held = True
        with _HELD_MU:
            _HELD[str(self.path)] = self.token
        t = threading.Thread(target=_beat, args=(self.path, self.token, self.heartbeat_s, self._stop, self._state),
                             name=f"mptkit-lock-heartbeat:{self.folder.name}", daemon=True)
        t.start()
        self._finalizer = weakref.finalize(self, _release, self.path, self.token, self._stop)
        return self

    def _held_message(self, info: dict | None, age: float) -> str:
        same_host = (info or {}).get("host") == socket.gethostname() and same_pid_namespace(info or {})
        how = ("wait for it to finish or stop it" if same_host else
               f"if that run is dead, this lock becomes stale and is taken over once its heartbeat is older than "
               f"{self.stale_s:.0f} s (now {age:.0f} s)")
        return (f"{self.folder} is in use by another training run: {describe_holder(info)} holds the lock "
                f"{self.path}. Two runs on one folder would resume from and overwrite each other's checkpoints; "
                f"{how}, or choose another save_folder / run_folder. Delete the lock file only if you are sure that "
                "run is gone.")

    def check(self) -> None:
        """Raise :class:`TrainError` if the lock was taken over or removed since it was acquired."""
        if self._state.lost:
            raise TrainError(f"{self._state.lost}: another process now owns {self.folder}; this run stops "
                             "without writing more there")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._finalizer is not None:
            self._finalizer()  # _release, once
        else:
            _release(self.path, self.token, self._stop)

    def __enter__(self) -> RunLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
