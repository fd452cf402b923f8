"""The step watchdog: a daemon thread in every rank that ends a run which makes no progress.

Progress is a completed optimizer step, or, while a checkpoint is being written, the checkpoint's temporary
folder growing (so a long save of a big model does not trip it). When neither happens for the timeout the
watchdog

1. writes every thread's stack to ``<run_folder>/failures/rank<R>-attempt<A>-step<S>.log`` (a header saying
   what was stuck and for how long, then ``faulthandler``'s dump of all threads, then the same from
   ``sys._current_frames`` with thread names);
2. records the event as ``<run_folder>/failures/rank<R>-attempt<A>-step<S>.json`` (the next attempt's rank 0
   reports it: a ``watchdog`` event in metrics.jsonl and a warning), and logs it at CRITICAL;
3. exits the process with :data:`mptkit.errors.EXIT_WATCHDOG` (``os._exit``: no clean-up that could hang
   too), so torchrun's elastic agent sees a failed worker, tears the group down and restarts it.

This works for a hang outside collectives (a wedged read, a sleep) and inside one (a rank blocked in an
all-reduce whose peer is hung or dead): the thread needs only the GIL, which blocking calls release. For a
hang that holds the GIL (a stuck C extension), ``faulthandler.dump_traceback_later`` is armed as a backstop
at twice the timeout plus 5 s: a C thread dumps the stacks to stderr (torchrun's log of the worker) and exits
with code 1. (It is process-wide: it replaces a ``dump_traceback_later`` of your own while training runs.)

The timeout (:class:`mptkit.train.sections.WatchdogConfig`): ``watchdog.timeout`` seconds if given, else
``max(min_timeout, step_multiplier x the slowest step so far)``, and ``first_step_timeout`` until the first
step of the attempt has finished (start-up, compilation). While a checkpoint is written the clock is reset
whenever the temporary folder grows, and ``checkpoint_timeout`` applies. Evaluation pauses the watchdog
(its collectives have ``dist_timeout``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from mptkit.errors import EXIT_WATCHDOG

log = logging.getLogger(__name__)

FAILURES_DIR = "failures"


def attempt() -> int:
    """torchrun's restart count of this worker (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def folder_bytes(folder: Path, pattern: str = ".ep*.tmp") -> int:
    """Bytes in the checkpoint temporary folders under ``folder`` (plus their file count): the progress of a
    save in flight."""
    total = 0
    try:
        for tmp in folder.glob(pattern):
            for p in tmp.rglob("*"):
                with contextlib.suppress(OSError):
                    total += p.stat().st_size + 1
    except OSError:
        pass
    return total


class StepWatchdog:
    """One per rank. ``start()`` before the loop, ``step_done(step, seconds)`` after each step, ``phase(...)``
    around a checkpoint write or an eval, ``stop()`` at the end."""

    def __init__(self, settings, *, rank: int, run_folder: Path, exit_fn: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        self.s = settings
        self.rank = rank
        self.folder = Path(run_folder) / FAILURES_DIR
        self.exit_fn = exit_fn
        self.clock = clock
        self.step = 0
        self.slowest = 0.0
        self.steps_seen = 0
        self._last = clock()
        self._phase = "step"
        self._progress: Callable[[], int] | None = None
        self._progress_value = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: dict | None = None

    # ------------------------------------------------------------------ what the trainer calls
    def start(self, step: int) -> None:
        self.step = step
        self._last = self.clock()
        self._thread = threading.Thread(target=self._watch, name="mptkit-step-watchdog", daemon=True)
        self._thread.start()
        self._arm_backstop()

    def step_done(self, step: int, seconds: float) -> None:
        with self._lock:
            self.step = step
            self.steps_seen += 1
            self.slowest = max(self.slowest, seconds)
            self._last = self.clock()
        self._arm_backstop()

    @contextlib.contextmanager
    def phase(self, name: str, progress: Callable[[], int] | None = None) -> Iterator[None]:
        """``checkpoint`` (with ``progress()``, a number that grows while the save makes progress) or
        ``eval`` (paused)."""
        with self._lock:
            self._phase, self._progress, self._progress_value = name, progress, None
            self._last = self.clock()
        self._arm_backstop()
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._progress = "step", None
                self._last = self.clock()
            self._arm_backstop()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()

    # ------------------------------------------------------------------ the timeout
    def timeout(self) -> float | None:
        """The current timeout in seconds (None: paused)."""
        s = self.s
        if self._phase == "eval":
            return None
        if self._phase == "checkpoint":
            base = s.timeout if s.timeout is not None else s.min_timeout
            return float(s.checkpoint_timeout if s.checkpoint_timeout is not None else max(base, 600.0))
        if s.timeout is not None:
            return float(s.timeout)
        if self.steps_seen == 0:
            return float(s.first_step_timeout)
        return max(float(s.min_timeout), float(s.step_multiplier) * self.slowest)

    def _arm_backstop(self) -> None:
        t = self.timeout()
        try:
            if t is None:
                faulthandler.cancel_dump_traceback_later()
                return
            faulthandler.dump_traceback_later(2 * t + 5, exit=True)  # to stderr (torchrun's log of the worker)
        except (OSError, ValueError, RuntimeError, AttributeError):
            pass  # no usable stderr (e.g. replaced by an object without a file descriptor): no backstop

    # ------------------------------------------------------------------ the thread
    def _watch(self) -> None:
        while not self._stop.is_set():
            t = self.timeout()
            self._stop.wait(min(1.0, t / 10) if t else 0.5)
            if self._stop.is_set():
                return
            with self._lock:
                t = self.timeout()
                if t is None:
                    continue
                if self._progress is not None:
                    v = self._progress()
                    if v != self._progress_value:
                        self._progress_value = v
                        self._last = self.clock()
                idle = self.clock() - self._last
                phase, step = self._phase, self.step
            if idle > t:
                self._fire(phase, step, idle, t)
                return

    def _fire(self, phase: str, step: int, idle: float, timeout: float) -> None:
        what = (f"no progress writing the checkpoint of step {step}" if phase == "checkpoint"
                else f"step {step + 1} did not finish")
        rec = {"event": "watchdog", "rank": self.rank, "attempt": attempt(), "step": step, "phase": phase,
               "idle_s": round(idle, 3), "timeout_s": timeout, "time": time.time(), "pid": os.getpid(),
               "host": socket.gethostname(), "exit_code": EXIT_WATCHDOG}
        stem = f"rank{self.rank}-attempt{attempt()}-step{step}"
        rec["stacks"] = str(self.folder / f"{stem}.log")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"{stem}.log", "w") as f:
                f.write(f"mptkit step watchdog: rank {self.rank} (pid {os.getpid()} on {rec['host']}), torchrun "
                        f"attempt {rec['attempt']}: {what} for {idle:.1f} s (timeout {timeout:g} s); "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
                f.write(f"exiting with code {EXIT_WATCHDOG}. Read the stack of the MainThread below: its innermost "
                        "frame (last line) is where the rank was stuck.\n\n--- faulthandler (all threads) ---\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.write("\n--- by thread name ---\n")
                names = {t.ident: t.name for t in threading.enumerate()}
                for ident, frame in sys._current_frames().items():
                    f.write(f"\nThread {names.get(ident, '?')} ({ident}):\n")
                    f.write("".join(traceback.format_stack(frame)))
                f.flush()
                os.fsync(f.fileno())
            with open(self.folder / f"{stem}.json", "w") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # still exit: a hung rank must not stay
            log.error("step watchdog: cannot write the failure log in %s: %s", self.folder, e)
        log.critical("step watchdog: rank %d: %s for %.1f s (timeout %g s); stacks in %s; exiting with code %d so "
                     "that torchrun restarts the group", self.rank, what, idle, timeout, rec["stacks"], EXIT_WATCHDOG)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        self.fired = rec
        self.exit_fn(EXIT_WATCHDOG)


def unreported_failures(run_folder: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The watchdog events of earlier attempts that no attempt has reported yet (``failures/*.json``)."""
    folder = Path(run_folder) / FAILURES_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if p.name.endswith(".reported.json"):
            continue
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda x: x[1].get("time", 0))


def mark_reported(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(path, path.with_suffix(".reported.json"))
