"""Recovery without a human from a non-finite loss or gradient norm and from loss spikes (the recipe's
``recovery`` section, :class:`mptkit.train.sections.RecoveryConfig`; docs/training.md, "Loss spikes and NaNs").

A step is judged before its update is applied (every rank alike: the loss is the all-reduced one and the
non-finite flag is all-reduced too). The trigger is ``nonfinite`` (the loss, or the gradient norm before clipping
when no fp16 grad scaler skips such steps itself) or a ``callbacks.kill_loss_spike`` event (``loss_spike``,
``high_loss``: llm-foundry's KillLossSpike rules, :class:`mptkit.train.metrics.LossSpikeMonitor`). The action:

* ``log`` (kill_loss_spike events only; llm-foundry's ``log_only: true``): a warning and an event line, the step
  counts as usual;
* ``stop``: :class:`mptkit.errors.TrainDiverged` (exit code ``EXIT_DIVERGED``, not to be retried);
* ``skip``: the step's update is dropped (no optimizer step; the step counter, and with it the lr schedule, does
  not advance) and its batch is recorded as skipped: the next batch is trained as that step instead;
* ``rollback`` (PaLM's recipe): the newest valid checkpoint from before the trouble (before the first outlier of
  a spike, before the window of a high loss, before the step of a NaN) is loaded, checkpoints newer than it are
  moved aside (``NAME.rolledback``), and the batches of the steps since that checkpoint up to the bad one (or the
  last ``recovery.skip_batches`` of them) are recorded as skipped; the checkpoint is saved again with that record,
  so a restart after a rollback does not meet the bad batches again.

Skipped batches are batch ids ``(epoch, batch in epoch)`` of the data stream (:class:`mptkit.train.data.BatchStream`
passes over them); they, the events and the lr windows are :class:`RecoveryState`, saved in every checkpoint's
trainer state (``"recovery"``) with the loss monitor's window (``"loss_monitor"``), so a resumed run skips the same
batches, judges the same losses and ends bitwise equal to the run that never stopped. After a skip or rollback the
lr multiplier is scaled by ``recovery.lr_factor`` for ``recovery.lr_steps`` steps. Each skip and rollback counts
towards ``recovery.max_recoveries``; the next trigger after those stops the run, so no run loops forever."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from mptkit.train.distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)

TRIGGERS = ("nonfinite", "loss_spike", "high_loss")
ACTING = ("skip", "rollback", "stop")  # actions that drop the step's update
ROLLED_BACK = "rolledback"  # the suffix of checkpoints a rollback moved aside


class RecoveryState:
    """What the recoveries of a run did, checkpointed: the skipped batch ids (as ``[epoch, first, last]`` ranges),
    the events, the lr windows ``[first_step, end_step, factor]`` (0-based step indices, end excluded) and how many
    skips and rollbacks there were. ``(epoch, batch) in state`` says whether a batch is skipped."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.events: list[dict] = []
        self.lr_windows: list[list[float]] = []
        self.count = 0  # skips + rollbacks
        self.next_id = 1

    def __contains__(self, batch: object) -> bool:
        if not self.ranges or not isinstance(batch, tuple):
            return False
        e, b = batch
        return any(r[0] == e and r[1] <= b <= r[2] for r in self.ranges)

    def add_batches(self, ids: list[tuple[int, int]]) -> list[list[int]]:
        """Record batch ids as skipped; returns them as ranges (``[epoch, first, last]``)."""
        new: list[list[int]] = []
        for e, b in sorted(set(ids)):
            if new and new[-1][0] == e and new[-1][2] == b - 1:
                new[-1][2] = b
            else:
                new.append([e, b, b])
        merged: list[list[int]] = []
        for r in sorted([list(r) for r in self.ranges] + [list(r) for r in new]):
            if merged and merged[-1][0] == r[0] and r[1] <= merged[-1][2] + 1:
                merged[-1][2] = max(merged[-1][2], r[2])
            else:
                merged.append(r)
        self.ranges = merged
        return new

    @property
    def batches_skipped(self) -> int:
        return sum(r[2] - r[1] + 1 for r in self.ranges)

    def lr_scale(self, step: int) -> float:
        """The factor on the lr schedule's multiplier at 0-based step ``step`` (1.0 outside every window)."""
        f = 1.0
        for a, b, factor in self.lr_windows:
            if a <= step < b:
                f *= factor
        return f

    def add_event(self, event: dict) -> dict:
        event["id"] = self.next_id
        self.next_id += 1
        self.events.append(event)
        return event

    def forget_logged_after(self, step: int) -> None:
        """A rollback to ``step``: the log-only events of the steps after it happened on batches trained again."""
        self.events = [e for e in self.events if e.get("action") in ACTING or e.get("step", 0) <= step]

    def event_ids(self) -> set[int]:
        return {int(e["id"]) for e in self.events if "id" in e}

    def state_dict(self) -> dict:
        return {"ranges": [list(r) for r in self.ranges], "events": [dict(e) for e in self.events],
                "lr_windows": [list(w) for w in self.lr_windows], "count": self.count, "next_id": self.next_id}

    def load_state_dict(self, st: dict) -> None:
        self.ranges = [[int(x) for x in r] for r in st.get("ranges", [])]
        self.events = [dict(e) for e in st.get("events", [])]
        self.lr_windows = [[int(w[0]), int(w[1]), float(w[2])] for w in st.get("lr_windows", [])]
        self.count = int(st.get("count", 0))
        self.next_id = int(st.get("next_id", 1))


def nonfinite(loss: float, grad_norm: float, *, check_grad: bool, dist: DistInfo, device: torch.device) -> bool:
    """Whether the step's loss (or, with ``check_grad``, its gradient norm) is NaN or infinite on any rank (all
    ranks get the same answer: the flag is all-reduced)."""
    bad = not math.isfinite(loss) or (check_grad and not math.isfinite(grad_norm))
    # A real NaN needs no vote (the loss is already all-reduced, the gradient norm is the averaged / global
    # gradients'): the flag is reduced because MPTKIT_FAULTS' ``nan`` replaces one rank's reduced loss. Injecting
    # it before the step's loss reduction (train/step.py) would let this per-step collective go.
    if dist.world_size > 1:
        dev = device if device.type == "cuda" else torch.device("cpu")
        bad = float(all_reduce_sum(torch.tensor([1.0 if bad else 0.0], device=dev), dist).item()) > 0
    return bad


def first_bad_step(event: dict | None, step: int, window_size: int) -> int:
    """The first step whose update a trigger at step ``step`` (1-based) holds suspect: a spike's first outlier,
    a high loss's window, a NaN's own step."""
    if event is None:
        return step
    if event.get("event") == "loss_spike":
        return max(1, step - int(event.get("outlier_counter", 1)) + 1)
    if event.get("event") == "high_loss":
        return max(1, step - window_size + 1)
    return step


def rollback_target(save_folder: Path, at_most: int) -> Path | None:
    """The newest valid checkpoint in ``save_folder`` whose step is at most ``at_most``."""
    from mptkit.io.checkpoints import list_checkpoints, verify_checkpoint

    for c in list_checkpoints(save_folder):
        if 0 <= step_of(c) <= at_most and verify_checkpoint(c, checksums=True) is None:
            return c
    return None


def step_of(ckpt: Path) -> int:
    from mptkit.io.checkpoints import NAME_RE

    m = NAME_RE.match(Path(ckpt).name)
    return int(m.group(2)) if m else -1


def newer_than(save_folder: Path, step: int) -> list[Path]:
    """The checkpoints in ``save_folder`` (valid or not) of a step after ``step``."""
    from mptkit.io.checkpoints import list_checkpoints

    return [c for c in list_checkpoints(save_folder) if step_of(c) > step]
