"""Errors a restart cannot fix, under torchrun's restarts.

torchrun's elastic agent restarts a failed worker group up to ``--max-restarts`` times whatever the workers'
exit codes (torch 2.13: ``SimpleElasticAgent._invoke_run`` looks only at failed / succeeded), so a typo in a
recipe would be retried that many times. `mptkit train` exits with
:data:`mptkit.errors.EXIT_NOT_RETRYABLE` on such errors (a bad recipe, missing data, a tokenizer mismatch,
anything found before the first step) and, under torchrun, records the error in
``$TMPDIR/mptkit-torchelastic/<TORCHELASTIC_RUN_ID>-<agent pid>.json``. A restarted worker of the same agent
(``TORCHELASTIC_RESTART_COUNT`` > 0) that finds the record stops at once with the same exit code and a
``not retried`` line, before reading the recipe, its data or its model: the agent's remaining restarts are
spent in a second each and the job fails with the error reported once. A new torchrun (a fixed recipe, a
SLURM requeue) starts at restart 0 and ignores the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path


def _record_path() -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return Path(tempfile.gettempdir()) / "mptkit-torchelastic" / f"{safe}-{os.getppid()}.json"


def _restart_count() -> int:
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def record_not_retryable(message: str) -> Path | None:
    """Under torchrun: remember that this agent's workers failed with an error a restart cannot fix."""
    p = _record_path()
    if p is None:
        return None
    if _restart_count() > 0 and p.exists():
        return p  # the first attempt's record stays (it names the attempt that saw the error)
    with contextlib.suppress(OSError):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"message": message, "attempt": _restart_count(), "time": time.time(),
                                   "pid": os.getpid()}))
        os.replace(tmp, p)
        return p
    return None


def earlier_not_retryable() -> dict | None:
    """In a worker restarted by torchrun: the not-retryable error an earlier attempt of the same agent recorded."""
    p = _record_path()
    if p is None or _restart_count() == 0:
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
