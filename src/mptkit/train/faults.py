"""Fault injection for tests and recovery drills: ``MPTKIT_FAULTS`` names faults by kind, rank and step.

    MPTKIT_FAULTS="kill@rank1:step3,hang@rank0:step5,ckpt_kill@rank0:step6,nan@rank0:step8"

Each item is ``KIND@rankR:stepN`` (``rank`` is the global rank; ``step`` is the optimizer step being trained,
1-based, i.e. the step whose metrics line says ``"step": N``). Kinds:

- ``kill``: SIGKILL this process mid-step (after the step's batch was read, before its forward pass), as a
  hardware fault or an OOM killer would.
- ``hang``: sleep forever at the same point (a wedged data read, a dead NFS mount): the step watchdog
  (:mod:`mptkit.train.watchdog`) must notice; peers block in the step's collectives.
- ``stall``: hang while holding the GIL (a stuck C call: a regular expression that never ends), so this
  rank's Python watchdog thread cannot run; its faulthandler backstop ends it, and its peers' watchdogs
  fire while they are blocked in the step's collective.
- ``error``: raise a ``RuntimeError`` at the same point (an unexpected crash of the Python code).
- ``ckpt_kill`` / ``ckpt_error``: SIGKILL / raise while the checkpoint of step N is being written (on the
  writing rank, rank 0 for full checkpoints: after the weights and trainer state are in the temporary folder,
  before its manifest and rename; on another rank: when the save starts).
- ``nan``: the loss of step N is reported as NaN (the update itself is the real one), so the non-finite
  handling (``kill_loss_spike`` / its action) runs.

Each fault fires **once per run folder**: before firing, the rank creates ``<run_folder>/faults/<item>.json``
(``O_EXCL``; what fired, when, pid, torchrun's restart count), and a fault whose file exists never fires again,
so a worker restarted by torchrun (which replays the same steps) runs on. Every firing is logged (a
``WARNING`` naming the fault). The next attempt's rank 0 reports the fired faults it finds (a ``fault`` event in
metrics.jsonl). An unset or empty variable injects nothing; a malformed one is a :class:`ConfigError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mptkit.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "MPTKIT_FAULTS"
KINDS = ("kill", "hang", "stall", "error", "ckpt_kill", "ckpt_error", "nan")
FAULTS_DIR = "faults"
_ITEM = re.compile(r"^\s*([a-z_]+)@rank(\d+):step(\d+)\s*$")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int

    @property
    def name(self) -> str:
        return f"{self.kind}@rank{self.rank}:step{self.step}"


def parse_faults(text: str | None) -> list[Fault]:
    """The faults of an ``MPTKIT_FAULTS`` value (comma-separated ``KIND@rankR:stepN``)."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(f"{ENV}: cannot read {item.strip()!r}; expected KIND@rankR:stepN, e.g. kill@rank1:step3 "
                              f"(kinds: {', '.join(KINDS)})")
        kind, rank, step = m.group(1), int(m.group(2)), int(m.group(3))
        if kind not in KINDS:
            from mptkit.utils.keys import closest

            near = closest(kind, KINDS)
            raise ConfigError(f"{ENV}: unknown fault kind {kind!r} in {item.strip()!r}"
                              + (f" (did you mean '{near}'?)" if near else f"; kinds: {', '.join(KINDS)}"))
        if step < 1:
            raise ConfigError(f"{ENV}: {item.strip()!r}: steps count from 1")
        out.append(Fault(kind, rank, step))
    return out


class FaultInjector:
    """The faults of this rank (from ``MPTKIT_FAULTS``), fired at the trainer's hooks, once per run folder."""

    def __init__(self, faults: list[Fault], *, rank: int, run_folder: Path):
        self.rank = rank
        self.folder = Path(run_folder) / FAULTS_DIR
        self.mine = [f for f in faults if f.rank == rank]

    @classmethod
    def from_env(cls, *, rank: int, run_folder: Path) -> FaultInjector:
        return cls(parse_faults(os.environ.get(ENV)), rank=rank, run_folder=run_folder)

    def __bool__(self) -> bool:
        return bool(self.mine)

    def _claim(self, kind: str, step: int) -> Fault | None:
        """The fault of ``kind`` at ``step`` if it is this rank's and has not fired in this run folder (it is
        then recorded as fired, before it fires)."""
        for f in self.mine:
            if f.kind != kind or f.step != step:
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            rec = {"fault": f.name, "kind": f.kind, "rank": f.rank, "step": f.step, "time": time.time(),
                   "pid": os.getpid(), "host": socket.gethostname(),
                   "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}
            try:
                fd = os.open(self.folder / f"{f.name}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None  # fired in an earlier attempt: a restarted worker runs on
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("fault injection (%s): firing %s (rank %d, step %d)", ENV, f.name, f.rank, f.step)
            return f
        return None

    def mid_step(self, step: int) -> None:
        """Called after step ``step``'s batch was read, before its forward pass: kill, hang or error."""
        if not self.mine:
            return
        if self._claim("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._claim("hang", step):
            while True:  # a wedged read: only the watchdog (or a signal's default action) ends this
                time.sleep(3600)
        if self._claim("stall", step):
            import re as _re

            _re.fullmatch(r"(a+)+b", "a" * 64)  # exponential backtracking in C, the GIL held: ~forever
        if self._claim("error", step):
            raise RuntimeError(f"fault injection ({ENV}): error@rank{self.rank}:step{step}")

    def during_checkpoint(self, step: int) -> None:
        """Called while the checkpoint of step ``step`` is being written: ckpt_kill or ckpt_error."""
        if not self.mine:
            return
        if self._claim("ckpt_kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._claim("ckpt_error", step):
            raise RuntimeError(f"fault injection ({ENV}): ckpt_error@rank{self.rank}:step{step}")

    def loss(self, step: int, loss: float) -> float:
        """Step ``step``'s loss, or NaN for a ``nan`` fault (the trainer asks once per step, when it judges it)."""
        if self.mine and self._claim("nan", step):
            return float("nan")
        return loss


def fired_faults(run_folder: str | os.PathLike) -> list[dict]:
    """The faults recorded as fired in a run folder, oldest first."""
    folder = Path(run_folder) / FAULTS_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("time", 0))


def unreported_faults(run_folder: str | os.PathLike) -> list[dict]:
    """The fired faults no attempt has reported yet (:func:`mark_reported` marks them)."""
    folder = Path(run_folder) / FAULTS_DIR
    return [r for r in fired_faults(run_folder) if not (folder / f"{r.get('fault')}.reported").exists()]


def mark_reported(run_folder: str | os.PathLike, rec: dict) -> None:
    try:
        (Path(run_folder) / FAULTS_DIR / f"{rec.get('fault')}.reported").touch()
    except OSError:
        pass
