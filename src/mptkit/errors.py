"""One exception type per domain. Messages say what was wrong, where, and what was expected.

The CLI prints an ``MPTKitError`` as one line (no traceback) unless ``--debug`` is given.
"""


class MPTKitError(Exception):
    """Base class of every error mptkit raises on purpose."""


class ConfigError(MPTKitError, ValueError):
    """A model, run or recipe configuration is invalid."""


class CheckpointError(MPTKitError):
    """A weights folder or trainer checkpoint is missing, corrupt or does not match the model."""


class DataError(MPTKitError):
    """A corpus, tokenizer or prepared dataset is unusable."""


class TrainError(MPTKitError):
    """A training run cannot start or continue."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; rerun the same command to resume


EXIT_WATCHDOG = 70  # EX_SOFTWARE: the step watchdog found no progress for its timeout (stacks in run_folder/failures/)
EXIT_NOT_RETRYABLE = 78  # EX_CONFIG: `mptkit train` failed before its first step (bad recipe, data, tokenizer, paths)


def not_retryable(e: BaseException) -> bool:
    """Whether ``e`` fails the same way when the run is retried: a :class:`ConfigError` anywhere, or any mptkit
    error raised before the first training step (``Trainer.setup`` marks them). A :class:`DataError` during
    training may be transient (an I/O error reading a shard): it is not in this class."""
    return isinstance(e, ConfigError) or bool(getattr(e, "before_first_step", False))


class TrainPreempted(TrainError):
    """The run was asked to stop (SIGTERM / SIGINT: preemption, a scheduler's requeue) and stopped at a step
    boundary after saving a checkpoint; ``exit_code`` (:data:`EXIT_PREEMPTED`) is what `mptkit train` exits with."""

    exit_code = EXIT_PREEMPTED


EXIT_DIVERGED = 79  # a NaN/inf or a loss spike stopped the run (recovery action stop): rerunning repeats it, do not retry


class TrainDiverged(TrainError):
    """Training stopped on a non-finite loss or gradient norm, or a loss spike / high loss, under the recovery action
    ``stop`` (or when no recovery was possible: no checkpoint to roll back to, ``recovery.max_recoveries`` spent).
    Deterministic: a restart from the same checkpoint meets it again, so it must not be retried as it is;
    ``exit_code`` (:data:`EXIT_DIVERGED`) is what `mptkit train` exits with."""

    exit_code = EXIT_DIVERGED
    retryable = False


class InferenceError(MPTKitError):
    """Generation or serving was asked for something it cannot do."""


class ExportError(MPTKitError):
    """A model cannot be written in the requested format."""


class EvalError(MPTKitError, ValueError):
    """An evaluation (perplexity, long-context curve, ICL task) was given unusable input or options."""
