"""Training: `mptkit train RECIPE.yaml` — config, loop, optimizers, schedules, checkpoints, metrics."""

from mptkit.train.config import RunConfig, load_run_config, parse_duration
from mptkit.train.trainer import Trainer

__all__ = ["RunConfig", "Trainer", "load_run_config", "parse_duration"]
