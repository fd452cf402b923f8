"""Learning-rate schedules as pure functions of the step (composer / llm-foundry semantics).

Each schedule maps the number of completed optimizer steps ``t`` to a multiplier of the optimizer's
``lr``. Being a pure function of ``t``, a schedule has no state to checkpoint: resuming at step ``t``
gives exactly the uninterrupted run's learning rate. Warmup is linear from 0 at ``t = 0`` to 1 at
``t = t_warmup`` (so the very first step of a warmed-up run has lr 0, as in composer).

* ``constant_with_warmup``: ``alpha_f`` after warmup (llm-foundry's ``alpha`` defaults to 1).
* ``cosine_with_warmup``: ``alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2``,
  ``tau = (t - t_warmup) / (t_max - t_warmup)`` clipped to [0, 1].
* ``linear_decay_with_warmup``: ``1 + (alpha_f - 1) * tau``.
* ``inv_sqrt_with_warmup``: ``alpha_f_decay + (1 - alpha_f_decay) / sqrt((t - t_warmup + t_scale) / t_scale)``
  until ``t_max - t_cooldown``, then linear to ``alpha_f_cooldown`` over ``t_cooldown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mptkit.errors import ConfigError
from mptkit.train.config import Duration, parse_duration
from mptkit.train.sections import SchedulerConfig


@dataclass
class Schedule:
    name: str
    t_warmup: int
    t_max: int
    alpha_f: float = 0.0
    t_scale: int = 1
    t_cooldown: int = 0
    alpha_f_cooldown: float = 0.0

    def __call__(self, t: int) -> float:
        if t < self.t_warmup:
            return t / self.t_warmup
        if self.name == "constant_with_warmup":
            return self.alpha_f
        if self.name in ("cosine_with_warmup", "linear_decay_with_warmup"):
            span = self.t_max - self.t_warmup
            tau = 1.0 if span <= 0 else min(max((t - self.t_warmup) / span, 0.0), 1.0)
            if self.name == "cosine_with_warmup":
                return self.alpha_f + (1.0 - self.alpha_f) * (1.0 + math.cos(math.pi * tau)) / 2.0
            return 1.0 + (self.alpha_f - 1.0) * tau
        if self.name == "inv_sqrt_with_warmup":
            start_cd = max(self.t_max - self.t_cooldown, self.t_warmup)

            def inv(x: int) -> float:
                return self.alpha_f + (1.0 - self.alpha_f) / math.sqrt((x - self.t_warmup + self.t_scale) / self.t_scale)

            if t < start_cd:
                return inv(t)
            a_i = inv(start_cd)
            if self.t_cooldown == 0:
                return a_i
            frac = min(1.0, (t - start_cd) / self.t_cooldown)
            return a_i + frac * (self.alpha_f_cooldown - a_i)
        raise ConfigError(f"scheduler.name: unknown schedule '{self.name}'")


def build_schedule(spec: SchedulerConfig | dict, *, max_steps: int, to_batches) -> Schedule:
    """``spec``: the recipe's ``scheduler`` section (:class:`mptkit.train.sections.SchedulerConfig`, or its
    YAML mapping). ``to_batches(Duration) -> int`` converts durations."""
    spec = SchedulerConfig.from_dict(spec)

    def dur(v, key: str) -> int:
        return to_batches(parse_duration(v, f"scheduler.{key}"))

    t_warmup = dur(spec.t_warmup, "t_warmup")
    t_max = dur(spec.t_max, "t_max") if spec.t_max is not None else max_steps
    s = Schedule(name=spec.name, t_warmup=t_warmup, t_max=t_max, alpha_f=float(spec.alpha_f))
    if spec.name == "inv_sqrt_with_warmup":
        s.t_scale = max(1, dur(spec.t_scale, "t_scale")) if spec.t_scale is not None else max(t_warmup, 1)
        s.t_cooldown = dur(spec.t_cooldown, "t_cooldown")
        s.alpha_f_cooldown = float(spec.alpha_f_cooldown)
        if s.alpha_f_cooldown > s.alpha_f:
            raise ConfigError("scheduler: alpha_f_cooldown must be <= alpha_f_decay (the lr must not rise in cooldown)")
    if t_warmup > max_steps:
        raise ConfigError(f"scheduler.t_warmup ({t_warmup} steps) is longer than max_duration ({max_steps} steps)")
    return s


__all__ = ["Duration", "Schedule", "build_schedule"]
