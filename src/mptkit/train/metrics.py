"""Training metrics: throughput, MFU, memory, JSONL / TensorBoard logging, loss-spike and NaN monitor.

MFU follows llm-foundry: FLOPs per batch = 3 * B * (2 * N * T + n_layers * 4 * d_model * T^2) (the model's
``flops_per_batch``), MFU = achieved FLOP/s / (world_size * peak FLOP/s per device). The peak is the
recipe's ``peak_tflops`` when given, a datasheet value for known GPUs, or else a measured matmul peak
of this machine at the training precision; the log states which.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from mptkit.errors import TrainError
from mptkit.train.sections import SpikeConfig
from mptkit.utils.dtypes import PRECISIONS, any_torch_dtype
from mptkit.utils.outputs import write_errors

log = logging.getLogger(__name__)

# Dense datasheet peaks (FLOP/s) per device, by (name fragment, precision).
GPU_PEAKS = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
    ("A10G", "bf16"): 125e12, ("A10G", "fp16"): 125e12, ("A10G", "fp32"): 31.2e12,
    ("L4", "bf16"): 121e12, ("L4", "fp16"): 121e12, ("L4", "fp32"): 30.3e12,
}


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype, n: int | None = None, reps: int = 8) -> float:
    """Best observed FLOP/s of an n x n x n matmul on this device (a practical peak; on a machine shared
    with other work it reads low, which makes MFU read high)."""
    device = torch.device(device)
    n = n or (4096 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / max(time.perf_counter() - t, 1e-9))
    return best


def peak_flops(device: torch.device, precision: str, declared_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained) for MFU."""
    prec = PRECISIONS[precision]
    if declared_tflops:
        return declared_tflops * 1e12, f"declared peak_tflops={declared_tflops}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (frag, p), v in GPU_PEAKS.items():
            if frag in name and p == prec:
                return v, f"datasheet {prec} peak of {name} ({v / 1e12:.0f} TFLOP/s)"
    dtype = any_torch_dtype(prec)
    v = measure_matmul_peak(device, dtype)
    return v, f"measured {prec} matmul peak of this {device.type} ({v / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads)"


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"mem_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def drop_records_after(path: str | os.PathLike, step: int, keep: Callable[[dict], bool] | None = None) -> int:
    """Rewrite a metrics.jsonl (atomically) without the records of the steps after ``step`` (step lines, evals,
    and the start / end events of attempts past it) and without lines cut by a kill: a run resumed from its
    step-``step`` checkpoint logs those steps again, so each step keeps one line. ``keep(record)`` true keeps a
    record whatever its step (the recovery events the checkpoint's history holds). Returns the lines dropped."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        at = rec.get("step") if isinstance(rec, dict) else None
        if at is None and isinstance(rec, dict):
            at = rec.get("steps") if rec.get("event") == "end" else rec.get("start_step")
        if isinstance(at, int) and at > step and not (keep is not None and keep(rec)):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        from mptkit.utils.fs import atomic_write_text

        atomic_write_text(p, "".join(x + "\n" for x in kept))
    return dropped


_CANNOT_WRITE = "cannot write the metrics (run_folder)"


class MetricsWriter:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard when installed and enabled.

    ``guard``, when given, is called before every line is written and may raise to stop the write (the
    trainer's check that its run folder's lock is still its own). A failed write (disk full, ...) is a
    :class:`TrainError` naming metrics.jsonl."""

    def __init__(self, run_folder: Path, *, enabled: bool = True, tensorboard: bool | dict = True,
                 guard: Callable[[], None] | None = None):
        self.enabled = enabled
        self.path = Path(run_folder) / "metrics.jsonl"
        self.guard = guard
        self._f = None
        self._tb = None
        if not enabled:
            return
        with write_errors(self.path, TrainError, _CANNOT_WRITE):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - appended to all run, closed by close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except Exception:  # noqa: BLE001
                log.debug("tensorboard not installed: metrics go to %s only", self.path)
            else:
                log_dir = (tensorboard.get("log_dir") if isinstance(tensorboard, dict) else None) or (
                    Path(run_folder) / "tb")
                self._tb = SummaryWriter(log_dir=str(log_dir))

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self.guard is not None:
            self.guard()
        with write_errors(self.path, TrainError, _CANNOT_WRITE):
            self._f.write(json.dumps(rec, default=_jsonable) + "\n")
            self._f.flush()
        if self._tb is not None and "step" in rec:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "eval_")) else k, v,
                                        rec["step"])

    def rewind(self, step: int, keep: Callable[[dict], bool] | None = None) -> int:
        """Drop the lines of the steps after ``step`` (:func:`drop_records_after`, ``keep`` as there) from the
        open metrics.jsonl: a rollback trains those steps again. Returns the lines dropped."""
        if not self.enabled:
            return 0
        with write_errors(self.path, TrainError, _CANNOT_WRITE):
            self._f.close()
            try:
                return drop_records_after(self.path, step, keep)
            finally:
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


SPIKE_MIN_WINDOW = 100  # llm-foundry's KillLossSpike: the smallest (and default) window
SPIKE_MAX_LOSS_CAP = 10.0  # its default loss cap, and the ceiling of the cap it derives from the first window
SPIKE_WINDOW_FRACTION = 0.05  # its default window: 5% of the run's steps, at least SPIKE_MIN_WINDOW


_EXACT_SHIFT = 1074  # every finite float is an integer multiple of 2**-1074


def _exact(x: float) -> int:
    """``x`` as an integer count of 2**-1074, exactly: sums of these never round or drift."""
    n, d = float(x).as_integer_ratio()  # d is a power of two, at most 2**1074
    return n << (_EXACT_SHIFT + 1 - d.bit_length())


class LossSpikeMonitor:
    """llm-foundry's ``KillLossSpike`` (same defaults and rules), plus a stop on NaN/inf.

    Every step's loss goes into a rolling window of ``window_size`` losses (default: 5% of the run's
    ``total_steps``, at least 100). Nothing is judged until the window is full. Then a loss ``>=
    outlier_multiplier`` x the window's mean is an outlier; ``patience + 1`` consecutive outliers are a
    **loss spike** (every further consecutive outlier reports it again); a non-outlier resets the count.
    Otherwise, from step ``2 x window_size`` on, half the window or more above ``loss_cap`` is a **high
    loss**. ``loss_cap`` defaults to the largest loss of the first full window, at most 10 (a given value
    is kept). Each is logged (``log_only``, the default) or stops the run with a :class:`TrainError`.
    A NaN or infinite loss always stops the run at once (mptkit's; composer has a separate NaNMonitor).
    ``__call__`` returns the event (a dict for metrics.jsonl) or None.

    Each step costs O(1) whatever the window: the window's sum (exact, in integer units of 2**-1074, so its
    mean is the correctly rounded one and never drifts) and its count of losses above ``loss_cap`` are
    updated as a loss enters and the oldest leaves."""

    def __init__(self, patience: int = SpikeConfig.patience, outlier_multiplier: float = SpikeConfig.outlier_multiplier,
                 window_size: int | None = None, loss_cap: float | None = None, log_only: bool = SpikeConfig.log_only,
                 *, total_steps: int | None = None):
        self.patience = int(patience)
        self.mult = float(outlier_multiplier)
        if window_size is None:
            window_size = max(SPIKE_MIN_WINDOW, round(SPIKE_WINDOW_FRACTION * (total_steps or 0)))
        self.window_size = int(window_size)
        self.window: deque[float] = deque(maxlen=self.window_size)
        self._sum = 0  # the window's sum, exactly (see _exact)
        self.loss_cap = float(loss_cap) if loss_cap is not None else SPIKE_MAX_LOSS_CAP
        self._cap_set = loss_cap is not None
        self._high = 0  # how many of the window's losses are above loss_cap
        self.log_only = bool(log_only)
        self.outliers = 0
        self.spikes = 0
        self.high_losses = 0

    @property
    def running_mean(self) -> float | None:
        """The mean of the window's losses (None while it is empty)."""
        return self._sum / (len(self.window) << _EXACT_SHIFT) if self.window else None

    def __call__(self, step: int, loss: float) -> dict | None:
        if not math.isfinite(loss):
            raise TrainError(nonfinite_message("loss", loss, step))
        event, judged = self.check(step, loss)
        if event is not None:
            if not self.log_only:
                raise TrainError(event["message"] + " (callbacks.kill_loss_spike with log_only: false stopped the "
                                                    "run; resume from a checkpoint with a lower lr)")
            log.warning(event["message"])
        self.update(loss, judged)
        return event

    def check(self, step: int, loss: float) -> tuple[dict | None, tuple]:
        """Judge the loss of step ``step`` without changing the monitor: (the event or None, what
        :meth:`update` records if the loss is kept). The trainer judges a step before its update is applied,
        so that a recovery can drop it (train/recovery.py); a dropped step's loss never enters the window."""
        cap, high, cap_set = self.loss_cap, self._high, self._cap_set
        outliers = self.outliers
        event = None
        if len(self.window) == self.window_size:
            if not cap_set:  # the first full window sets the cap
                cap = min(max(self.window), SPIKE_MAX_LOSS_CAP)
                cap_set = True
                high = sum(1 for x in self.window if x > cap)  # once: against the new cap
            mean = self.running_mean
            if loss >= mean * self.mult:
                outliers += 1
                if outliers > self.patience:
                    event = {"event": "loss_spike", "step": step, "loss": loss, "running_loss_avg": mean,
                             "outlier_multiplier": self.mult, "outlier_counter": outliers,
                             "message": f"loss spike at step {step}: {outliers} consecutive losses >= {self.mult} x "
                                        f"the running mean {mean:.4f} of the last {self.window_size} steps (now "
                                        f"{loss:.4f})"}
            else:
                outliers = 0
            if event is None and step >= 2 * self.window_size and high >= self.window_size / 2:
                event = {"event": "high_loss", "step": step, "loss": loss, "loss_cap": cap,
                         "window_size": self.window_size, "high_losses": high,
                         "message": f"high loss at step {step}: {high} of the last {self.window_size} losses are "
                                    f"above loss_cap {cap:.4f}"}
        return event, (outliers, cap, high, cap_set, event["event"] if event else None)

    def update(self, loss: float, judged: tuple) -> None:
        """Record a kept loss as :meth:`check` judged it: the outlier count, the cap, the window."""
        self.outliers, self.loss_cap, self._high, self._cap_set, kind = judged
        self.spikes += kind == "loss_spike"
        self.high_losses += kind == "high_loss"
        if len(self.window) == self.window_size:  # the oldest loss leaves as this one enters
            old = self.window[0]
            self._sum -= _exact(old)
            self._high -= old > self.loss_cap
        self.window.append(loss)
        self._sum += _exact(loss)
        self._high += loss > self.loss_cap

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that a resumed run (or a rollback) judges as the uninterrupted one."""
        return {"window": [float(x) for x in self.window], "outliers": self.outliers, "loss_cap": self.loss_cap,
                "cap_set": self._cap_set, "spikes": self.spikes, "high_losses": self.high_losses}

    def load_state_dict(self, st: dict) -> None:
        self.window = deque((float(x) for x in st["window"]), maxlen=self.window_size)
        self._sum = sum(_exact(x) for x in self.window)
        self.outliers = int(st["outliers"])
        self.loss_cap, self._cap_set = float(st["loss_cap"]), bool(st["cap_set"])
        self._high = sum(1 for x in self.window if x > self.loss_cap)
        self.spikes, self.high_losses = int(st["spikes"]), int(st["high_losses"])


def nonfinite_message(what: str, value: float, step: int) -> str:
    return (f"{what} is {value} at step {step}: training diverged. Lower optimizer.lr, raise scheduler.t_warmup, "
            "set algorithms.gradient_clipping, or use precision=amp_bf16 instead of amp_fp16; then resume from the "
            "last checkpoint (autoresume: true), or let the run recover by itself (recovery.nonfinite: skip or "
            "rollback)")


class Throughput:
    """Tokens/s and FLOP/s over a sliding window of steps (llm-foundry's speed_monitor window_size)."""

    def __init__(self, window: int = 10):
        self.steps: deque[tuple[float, int, float]] = deque(maxlen=max(1, window))

    def add(self, seconds: float, tokens: int, flops: float = 0.0) -> None:
        self.steps.append((seconds, tokens, flops))

    @property
    def tokens_per_s(self) -> float:
        s = sum(x[0] for x in self.steps)
        return sum(x[1] for x in self.steps) / s if s > 0 else 0.0

    @property
    def flops_per_s(self) -> float:
        s = sum(x[0] for x in self.steps)
        return sum(x[2] for x in self.steps) / s if s > 0 else 0.0

    @property
    def step_s(self) -> float:
        return sum(x[0] for x in self.steps) / len(self.steps) if self.steps else 0.0


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
