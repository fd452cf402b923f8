"""The recipe's ``loggers`` beside metrics.jsonl (always written) and TensorBoard: ``mlflow`` and ``wandb``
(llm-foundry's / composer's names and keys), each an optional extra (``pip install 'mptkit[mlflow]'``,
``'mptkit[wandb]'``). Rank 0 logs every step's and evaluation's numbers, and (``log_config``) the run's
validated config as parameters / config.

* ``mlflow: {tracking_uri, experiment_name, run_name, tags, synchronous, flush_interval, rank_zero_only,
  ignore_metrics, ignore_hyperparameters}``: ``tracking_uri`` a local folder (``./mlruns``, the default, or
  ``file:/abs/path``) or a tracking server's URI; ``mlflow.MlflowClient``, one run per training run. The model
  registry keys (``model_registry_prefix``, ``model_registry_uri``) and ``resume`` are refused.
* ``wandb: {project, group, name, entity, tags, rank_zero_only, init_kwargs}``: ``wandb.init(**...)``;
  ``init_kwargs: {mode: offline}`` (or ``WANDB_MODE=offline``) writes the run under ``dir`` (default the run
  folder) without a network; ``log_artifacts: true`` (checkpoint uploads) is refused.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from pathlib import Path
from typing import Any

from mptkit.errors import ConfigError, TrainError

log = logging.getLogger(__name__)

MLFLOW_KEYS = {"tracking_uri", "experiment_name", "run_name", "tags", "synchronous", "flush_interval",
               "rank_zero_only", "ignore_metrics", "ignore_hyperparameters", "log_system_metrics",
               "model_registry_prefix", "model_registry_uri", "resume", "run_group", "logging_buffer_seconds"}
WANDB_KEYS = {"project", "group", "name", "entity", "tags", "rank_zero_only", "init_kwargs", "log_artifacts"}
_MLFLOW_REFUSED = {"model_registry_prefix": "the model registry is not used", "model_registry_uri":
                   "the model registry is not used", "resume": "each training run logs to a new MLflow run",
                   "log_system_metrics": "system metrics are not collected", "run_group": "runs are not grouped"}


def check_loggers(loggers: dict) -> None:
    """Keys and values of ``loggers.mlflow`` / ``loggers.wandb`` (before any work)."""
    from mptkit.train.sections import _check_keys

    for name, keys in (("mlflow", MLFLOW_KEYS), ("wandb", WANDB_KEYS)):
        opts = loggers.get(name)
        if name not in loggers:
            continue
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(f"loggers.{name}: expected a mapping of options (or {{}})")
        opts = opts or {}
        _check_keys(opts, keys, f"loggers.{name}")
        if opts.get("rank_zero_only") is False:
            raise ConfigError(f"loggers.{name}.rank_zero_only: false is not supported: rank 0 logs the run's "
                              "numbers (every rank's are reduced into them)")
        if name == "mlflow":
            for k, why in _MLFLOW_REFUSED.items():
                if opts.get(k) not in (None, False, ""):
                    raise ConfigError(f"loggers.mlflow.{k}: not supported ({why}); remove it")
        if name == "wandb":
            if opts.get("log_artifacts"):
                raise ConfigError("loggers.wandb.log_artifacts: uploading checkpoints to W&B is not supported")
            if opts.get("init_kwargs") is not None and not isinstance(opts["init_kwargs"], dict):
                raise ConfigError("loggers.wandb.init_kwargs: expected a mapping of wandb.init arguments")


def _numbers(rec: dict) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}/"))
    else:
        out[prefix.rstrip("/")] = str(d)[:500]
    return out


class MLflowSink:
    def __init__(self, opts: dict, *, run_name: str, run_folder: Path, config: dict | None):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("loggers.mlflow: the mlflow package is not installed: pip install 'mptkit[mlflow]'") \
                from None
        uri = str(opts.get("tracking_uri") or (Path.cwd() / "mlruns"))
        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).resolve().as_uri()
        if uri.startswith("file:"):  # a local folder is MLflow's file store, which MLflow 3 makes opt-in
            import os

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = opts.get("experiment_name") or run_name
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        tags = {str(k): str(v) for k, v in (opts.get("tags") or {}).items()}
        self.run_id = self.client.create_run(exp_id, run_name=opts.get("run_name") or run_name, tags=tags).info.run_id
        self.ignore = list(opts.get("ignore_metrics") or [])
        self.synchronous = bool(opts.get("synchronous", True))
        self.uri = uri
        if config is not None:
            ignore_hp = list(opts.get("ignore_hyperparameters") or [])
            params = {k: v for k, v in _flat(config).items() if not any(fnmatch.fnmatch(k, p) for p in ignore_hp)}
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        log.info("loggers.mlflow: run %s in experiment %r at %s", self.run_id, name, uri)

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v in values.items() if not any(fnmatch.fnmatch(k, p) for p in self.ignore)]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms, synchronous=self.synchronous)

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandbSink:
    def __init__(self, opts: dict, *, run_name: str, run_folder: Path, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("loggers.wandb: the wandb package is not installed: pip install 'mptkit[wandb]'") \
                from None
        kw = dict(opts.get("init_kwargs") or {})
        for k in ("project", "group", "name", "entity", "tags"):
            if opts.get(k) is not None:
                kw.setdefault(k, opts[k])
        kw.setdefault("name", run_name)
        kw.setdefault("dir", str(run_folder))
        if config is not None:
            kw.setdefault("config", config)
        Path(kw["dir"]).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(**kw)
        except Exception as e:  # noqa: BLE001 - wandb raises its own errors (no network, no API key, ...)
            raise TrainError(f"loggers.wandb: wandb.init failed ({type(e).__name__}: {e}); without a network use "
                             "loggers.wandb.init_kwargs.mode: offline (or WANDB_MODE=offline)") from None
        log.info("loggers.wandb: run %s (%s) in %s", self.run.id, getattr(self.run.settings, "mode", "?"), kw["dir"])

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class LoggerSinks:
    """The mlflow / wandb loggers of a run (rank 0): ``log(record)`` for every metrics.jsonl record with a step."""

    def __init__(self, loggers: dict, *, run_name: str, run_folder: Path, config: dict | None):
        self.sinks: list = []
        for name, cls in (("mlflow", MLflowSink), ("wandb", WandbSink)):
            if name in (loggers or {}):
                self.sinks.append(cls(loggers[name] or {}, run_name=run_name, run_folder=run_folder, config=config))

    def log(self, rec: dict) -> None:
        if "step" not in rec or "event" in rec:
            return
        values = _numbers(rec)
        if values:
            for s in self.sinks:
                s.log(int(rec["step"]), values)

    def close(self, ok: bool = True) -> None:
        for s in self.sinks:
            try:
                s.close(ok)
            except Exception as e:  # noqa: BLE001 - a logger's shutdown must not hide the run's outcome
                log.warning("closing a logger failed: %s: %s", type(e).__name__, e)
        self.sinks = []
