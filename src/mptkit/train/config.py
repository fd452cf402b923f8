"""The run configuration of `mptkit train`: YAML recipe + `key.sub=value` overrides -> a validated RunConfig.

Key names follow llm-foundry's pretrain YAMLs where the concept is the same (``max_duration``,
``global_train_batch_size``, ``device_train_microbatch_size``, ``optimizer``, ``scheduler``,
``algorithms.gradient_clipping``, ``eval_interval``, ``save_*``, ``autoresume`` …), so such a YAML needs
few changes. ``${a.b}`` interpolation works as in OmegaConf: a value that is exactly ``${x}`` takes x's
value and type; inside a longer string it is substituted as text. Unknown keys are an error naming the
closest valid key; top-level keys that only serve as interpolation variables (llm-foundry's
``data_local``, ``max_seq_len`` …, or anything under ``variables:``) are allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import ConfigError, MPTKitError
from mptkit.train.sections import (  # noqa: F401 - OPTIMIZERS, SCHEDULERS, _check_keys: importable from here
    NO_SCHEDULER_ALPHA_F,
    OPTIMIZERS,
    SCHEDULERS,
    AlgorithmsConfig,
    CallbacksConfig,
    CheckpointSettings,
    LoaderConfig,
    OptimizerConfig,
    RecoveryConfig,
    SampleSettings,
    SchedulerConfig,
    Section,
    WatchdogConfig,
    _check_keys,
    _dym,
    _need_bool,
    _need_int,
    _need_num,
)
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- durations

_UNITS = ("ba", "ep", "tok", "sp", "dur")
_MULT = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_DUR_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMBGT]?)(ba|ep|tok|sp|dur)\s*$")


@dataclass(frozen=True)
class Duration:
    """A length of training: ``value`` batches ("ba"), epochs ("ep"), tokens ("tok"), samples ("sp"), or a
    fraction of ``max_duration`` ("dur", composer's unit: ``0.02dur`` is ``int(0.02 x max_duration's value)`` in
    max_duration's unit, e.g. 2ba of 100ba, and of its batches when max_duration is in epochs;
    ``max_duration`` itself cannot be in ``dur``)."""

    value: float
    unit: str

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{v}{self.unit}"

    def to_batches(self, *, batches_per_epoch: int | None, tokens_per_batch: int, samples_per_batch: int,
                   max_duration: Duration | None = None) -> int:
        """Number of optimizer steps this duration covers (rounded up). A ``dur`` fraction needs ``max_duration``:
        as composer converts it, the fraction of max_duration's value, truncated to an integer in its unit."""
        if self.unit == "dur":
            if max_duration is None or max_duration.unit == "dur":
                raise ConfigError(f"duration '{self}' is a fraction of max_duration, which is not known here")
            if max_duration.unit == "ep":  # composer: a fraction of an epochs duration counts batches
                if batches_per_epoch is None:
                    raise ConfigError(f"duration '{self}' is a fraction of max_duration in epochs, but the dataset "
                                      "length is unknown")
                return int(self.value * batches_per_epoch * max_duration.value)
            whole = Duration(float(int(self.value * max_duration.value)), max_duration.unit)
            return whole.to_batches(batches_per_epoch=batches_per_epoch, tokens_per_batch=tokens_per_batch,
                                    samples_per_batch=samples_per_batch)
        if self.unit == "ba":
            return math.ceil(self.value)
        if self.unit == "tok":  # tokens per batch may be a mean (finetuning data): no step for a rounding error
            return math.ceil(self.value / tokens_per_batch - 1e-9)
        if self.unit == "sp":
            return math.ceil(self.value / samples_per_batch)
        if batches_per_epoch is None:
            raise ConfigError(f"duration '{self}' is in epochs but the dataset length is unknown")
        return math.ceil(self.value * batches_per_epoch)


def parse_duration(v: Any, key: str, *, int_unit: str = "ba", allow_zero: bool = True) -> Duration:
    """'100ba' / '1ep' / '5Mtok' / '2e6tok' / '1000sp'; a bare integer counts in ``int_unit``."""
    if isinstance(v, Duration):
        return v
    if isinstance(v, bool):
        raise ConfigError(f"{key}: expected a duration like '100ba', '1ep' or '5Mtok', got {v!r}")
    if isinstance(v, (int, float)):
        d = Duration(float(v), int_unit)
    else:
        m = _DUR_RE.match(str(v))
        if not m:
            raise ConfigError(
                f"{key}: cannot read duration {v!r}; use a number with a unit: 'Nba' (batches), 'Nep' (epochs), "
                "'Ntok' (tokens, e.g. '5Mtok'), 'Nsp' (samples) or 'Xdur' (a fraction of max_duration, e.g. '0.02dur')"
            )
        d = Duration(float(m.group(1)) * _MULT[m.group(2)], m.group(3))
    if d.unit == "dur" and key == "max_duration":
        raise ConfigError(f"max_duration: {v!r} is a fraction of max_duration itself; give it in ba, ep, tok or sp")
    if d.value < 0 or (d.value == 0 and not allow_zero):
        raise ConfigError(f"{key}: duration must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return d


# ----------------------------------------------------------------------------------- interpolation

_INTERP = re.compile(r"\$\{([^${}]+)\}")


def _lookup(root: dict, dotted: str, where: str) -> Any:
    dotted = dotted.strip()
    if dotted == "mptkit:stdlib":  # the running interpreter's standard-library folder (the default corpus)
        import sysconfig

        return str(Path(sysconfig.get_paths()["stdlib"]).resolve())
    if dotted.startswith(("oc.env:", "env:")):
        name, _, default = dotted.split(":", 1)[1].partition(",")
        val = os.environ.get(name.strip())
        if val is None:
            if not default:
                raise ConfigError(f"{where}: environment variable '{name.strip()}' is not set")
            return default.strip()
        return val
    cur: Any = root
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            so_far = ".".join(parts[:i]) or "<top level>"
            near = closest(p, cur.keys()) if isinstance(cur, dict) else None
            hint = f" (did you mean '{'.'.join(parts[:i] + [near])}'?)" if near else ""
            raise ConfigError(f"{where}: interpolation '${{{dotted}}}' refers to a missing key '{p}' in {so_far}{hint}")
    return cur


def interpolate(cfg: dict) -> dict:
    """Resolve ``${a.b}`` references (recursively, with cycle detection) against the whole config."""
    root = copy.deepcopy(cfg)

    def resolve(v: Any, where: str, stack: tuple[str, ...]) -> Any:
        if isinstance(v, dict):
            return {k: resolve(x, f"{where}.{k}" if where else str(k), stack) for k, x in v.items()}
        if isinstance(v, list):
            return [resolve(x, f"{where}[{i}]", stack) for i, x in enumerate(v)]
        if not isinstance(v, str) or "${" not in v:
            return v
        m = _INTERP.fullmatch(v.strip())
        if m:
            ref = m.group(1).strip()
            if ref in stack:
                raise ConfigError(f"{where}: interpolation cycle: {' -> '.join(stack + (ref,))}")
            return resolve(_lookup(root, ref, where), where, stack + (ref,))

        def sub(mm: re.Match) -> str:
            ref = mm.group(1).strip()
            if ref in stack:
                raise ConfigError(f"{where}: interpolation cycle: {' -> '.join(stack + (ref,))}")
            return str(resolve(_lookup(root, ref, where), where, stack + (ref,)))

        return _INTERP.sub(sub, v)

    return resolve(root, "", ())


def _referenced_top_keys(cfg: Any) -> set[str]:
    out: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            for m in _INTERP.finditer(v):
                out.add(m.group(1).strip().split(".")[0])

    walk(cfg)
    return out


# ----------------------------------------------------------------------------------- YAML


def _loader():
    """A safe YAML loader that reads 1e-3 / 6e-4 as floats (YAML 1.1 wants a dot: 1.0e-3), as OmegaConf does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
        list("-+0123456789."))
    return Loader


def yaml_load(text: str):
    import yaml

    return yaml.load(text, Loader=_loader())


# ----------------------------------------------------------------------------------- overrides


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML: numbers, bools, null, lists)."""
    import yaml

    cfg = copy.deepcopy(cfg)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}': expected key.sub=value (e.g. max_duration=20ba)")
        key, _, raw = ov.partition("=")
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override '{ov}': empty key")
        try:
            val = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            val = raw
        cur = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in cur or cur[p] is None:
                cur[p] = {}
            elif not isinstance(cur[p], dict):
                cur[p] = {}  # e.g. model: mpt-tiny  then  model.max_seq_len=128
            cur = cur[p]
        cur[parts[-1]] = val
    return cfg


# ----------------------------------------------------------------------------------- the run config

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")

# Sub-section keys the untyped sections accept (unknown ones are an error naming the closest); the typed
# sections (train/sections.py) know their own.
DATA_PREP_KEYS = {"inputs", "vocab_size", "max_files", "max_bytes", "val_fraction", "options"}
LOGGERS = {"tensorboard", "jsonl", "mlflow", "wandb"}  # mlflow, wandb: train/loggers.py


@dataclass
class RunConfig:
    """Everything a training run needs, validated. Field names are the YAML keys."""

    model: Any = "mpt-tiny"
    tokenizer: Any = None
    train_loader: LoaderConfig | None = None
    eval_loader: LoaderConfig | None = None
    data_prep: dict | None = None
    run_name: str | None = None
    seed: int = 17
    max_seq_len: int | None = None
    max_duration: Any = "10ba"
    global_train_batch_size: int = 8
    device_train_microbatch_size: Any = "auto"
    device_eval_batch_size: int | None = None
    precision: str = "fp32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(alpha_f=NO_SCHEDULER_ALPHA_F))
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    eval_interval: Any = "1ep"
    eval_subset_num_batches: int = -1
    eval_first: bool = False
    icl_tasks: Any = None  # llm-foundry's icl_tasks (a list of tasks or a YAML file): run at eval_interval
    eval_gauntlet: Any = None  # llm-foundry's eval_gauntlet (a mapping or a YAML file) over the icl_tasks
    icl_seq_len: int | None = None  # the window of ICL tasks that set no max_seq_len (default the model's)
    save_folder: str | None = None
    save_interval: Any = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False  # load_path: the weights only (a new run from them), not the trainer state
    load_strict_model_weights: bool = True  # with load_weights_only: every model tensor must be in load_path
    load_ignore_keys: list | None = None  # with load_weights_only: globs of tensors not loaded (state/model/...)
    save_weights_only: bool = False  # checkpoints without optimizer state (cannot be resumed)
    resume_accept_data_change: bool = False  # resume although the data stream differs from the checkpoint's
    python_log_level: str | None = None  # the level of mptkit's loggers (llm-foundry: composer's/llmfoundry's)
    log_config: bool = True  # the validated config goes to the loggers (config.yaml is always written)
    metadata: dict | None = None  # free key/values recorded in config.yaml and the metrics' start event
    compile_config: dict | None = None  # torch.compile each block for training (train/compile.py)
    max_split_size_mb: int | None = None  # CUDA caching allocator settings (PYTORCH_CUDA_ALLOC_CONF) ...
    expandable_segments: bool | None = None
    cuda_load_lazy: bool = False  # ... and CUDA_MODULE_LOADING=LAZY, set before CUDA starts
    progress_bar: bool = True
    log_to_console: bool = True
    console_log_interval: Any = "1ba"
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    loggers: dict = field(default_factory=dict)
    # mptkit extensions
    run_folder: str | None = None  # where config.yaml, metrics.jsonl, tb/ go (default runs/<run_name>)
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int | None = None  # torch.set_num_threads on CPU
    peak_tflops: float | None = None  # per-device peak for MFU; null = measure a matmul peak
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU bitwise resume)
    export_folder: str | None = None  # write the final model as an HF folder here
    sample_prompt: str | None = None  # generate a sample from this prompt at the end
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.0  # 0 = greedy
    sample_top_k: int | None = None
    activation_checkpointing: bool = False
    dist_timeout: float = 600.0
    variables: dict = field(default_factory=dict)
    fsdp_config: dict | None = None  # llm-foundry keys; FSDP2 sharding under torchrun (docs/training.md)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # the step watchdog (train/watchdog.py)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)  # NaN / loss-spike actions (train/recovery.py)

    # derived (filled by validate)
    _max_duration: Duration | None = field(default=None, repr=False)
    _icl_tasks: list | None = field(default=None, repr=False)  # mptkit.eval.icl_tasks.ICLTaskConfig
    _gauntlet: Any = field(default=None, repr=False)  # mptkit.eval.gauntlet.GauntletConfig

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            out[f.name] = copy.deepcopy(v.to_dict() if isinstance(v, Section) else v)
        return out

    # ------------------------------------------------------------------------------ validation
    def _validate_icl(self) -> None:
        """``icl_tasks`` / ``eval_gauntlet`` / ``icl_seq_len`` parsed as ``mptkit eval icl --config`` reads them
        (every task file read and checked now, before any training)."""
        if self.icl_seq_len is not None:
            _need_int("icl_seq_len", self.icl_seq_len, 2)
        if self.icl_tasks is None:
            if self.eval_gauntlet is not None:
                raise ConfigError("eval_gauntlet: needs icl_tasks (the gauntlet's benchmarks are the tasks' labels)")
            return
        from mptkit.eval.gauntlet import parse_gauntlet
        from mptkit.eval.icl_tasks import parse_icl_tasks, task_partitions

        self._icl_tasks = parse_icl_tasks(self.icl_tasks, default_max_seq_len=self.icl_seq_len, error=ConfigError)
        for t in self._icl_tasks:
            try:
                task_partitions(t)
            except MPTKitError as e:
                raise ConfigError(f"icl_tasks: {e}") from None
        if self.eval_gauntlet is not None:
            self._gauntlet = parse_gauntlet(self.eval_gauntlet, error=ConfigError)

    def validate(self) -> RunConfig:
        self._max_duration = parse_duration(self.max_duration, "max_duration", allow_zero=False)
        parse_duration(self.eval_interval, "eval_interval", int_unit="ep")
        parse_duration(self.save_interval, "save_interval", int_unit="ep")
        parse_duration(self.console_log_interval, "console_log_interval")
        _need_int("seed", self.seed, 0)
        _need_int("global_train_batch_size", self.global_train_batch_size, 1)
        mb = self.device_train_microbatch_size
        if mb != "auto":
            _need_int("device_train_microbatch_size", mb, 1, hint="or 'auto'")
        if self.device_eval_batch_size is not None:
            _need_int("device_eval_batch_size", self.device_eval_batch_size, 1)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: '{self.precision}' is not one of {PRECISIONS}"
                              + _dym(self.precision, PRECISIONS))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: '{self.device}' is not one of auto, cpu, cuda")
        if self.max_seq_len is not None:
            _need_int("max_seq_len", self.max_seq_len, 1)
        if isinstance(self.model, dict) and self.model.get("fast_paths") is not None:  # checked before any work
            from mptkit.model.fastpath import FastPathOptions

            if not isinstance(self.model["fast_paths"], dict):
                raise ConfigError("model.fast_paths: expected a mapping (packed_qkv, mlp_chunk, flex_compile), got "
                                  f"{self.model['fast_paths']!r}")
            FastPathOptions.from_dict(self.model["fast_paths"])
        self._validate_icl()
        if isinstance(self.model, dict) and self.model.get("peft_config") is not None:  # checked before any work
            from mptkit.model.lora import LoraSettings

            lora = LoraSettings.from_dict(self.model["peft_config"])
            if isinstance(self.fsdp_config, dict):  # LoRA under FSDP2: train/fsdp.py (docs/finetuning.md)
                if str(self.fsdp_config.get("state_dict_type") or "full").lower() != "full":
                    raise ConfigError("model.peft_config with fsdp_config.state_dict_type "
                                      f"{self.fsdp_config.get('state_dict_type')!r}: a LoRA checkpoint is the adapter "
                                      "alone, gathered to rank 0 (peft's files); use state_dict_type: full")
                if lora.base_dtype not in (None, "fp32", "float32"):
                    raise ConfigError(f"model.peft_config.base_dtype {lora.base_dtype} with fsdp_config: FSDP2 "
                                      "shards one dtype per unit; leave base_dtype out and set "
                                      "fsdp_config.mixed_precision (or precision amp_bf16) for bf16 compute")
        # the typed sections (train/sections.py): keys, values, defaults
        self.optimizer = OptimizerConfig.from_dict(self.optimizer)
        self.scheduler = SchedulerConfig.from_dict(self.scheduler)
        self.algorithms = AlgorithmsConfig.from_dict(self.algorithms)
        raw_spike = self.callbacks.get("kill_loss_spike") if isinstance(self.callbacks, dict) else None
        self.callbacks = CallbacksConfig.from_dict(self.callbacks)
        self.watchdog = WatchdogConfig.from_dict(self.watchdog)
        self.recovery = RecoveryConfig.from_dict(self.recovery, spike=raw_spike)
        if "rollback" in self.recovery.actions(self.callbacks.kill_loss_spike.log_only) and not self.save_folder:
            key = "nonfinite" if self.recovery.nonfinite == "rollback" else "loss_spike"
            raise ConfigError(f"recovery.{key}: rollback reloads the last good checkpoint, so it needs a "
                              "save_folder (and a save_interval); set save_folder, or use skip or stop")
        if not isinstance(self.loggers, dict):
            raise ConfigError("loggers: expected a mapping of logger name -> options")
        _check_keys(self.loggers, LOGGERS, "loggers")
        from mptkit.train.loggers import check_loggers

        check_loggers(self.loggers)
        if isinstance(self.eval_loader, list):
            raise ConfigError("eval_loader: a list of eval loaders (llm-foundry's eval_loaders) is not supported: "
                              "mptkit evaluates one eval_loader")
        for lname in ("train_loader", "eval_loader"):
            ld = getattr(self, lname)
            if ld is not None:
                setattr(self, lname, LoaderConfig.from_dict(ld, lname, data_prep=self.data_prep is not None))
        if self.data_prep is not None:
            if not isinstance(self.data_prep, dict):
                raise ConfigError("data_prep: expected a mapping (inputs, vocab_size, ...)")
            _check_keys(self.data_prep, DATA_PREP_KEYS, "data_prep")
        _need_int("save_num_checkpoints_to_keep", self.save_num_checkpoints_to_keep, -1)
        self._validate_foundry_keys()
        if self.torch_threads is not None:
            _need_int("torch_threads", self.torch_threads, 1)
        if self.peak_tflops is not None:
            _need_num("peak_tflops", self.peak_tflops, positive=True)
        _need_int("sample_max_new_tokens", self.sample_max_new_tokens, 0)
        _need_num("sample_temperature", self.sample_temperature)
        if self.sample_top_k is not None:
            _need_int("sample_top_k", self.sample_top_k, 1)
        if self.run_name is not None and (not isinstance(self.run_name, str) or "/" in self.run_name
                                          or not self.run_name.strip()):
            raise ConfigError(f"run_name: expected a plain name (no '/'), got {self.run_name!r}")
        if self.fsdp_config is not None:  # keys and values checked here, applied by the trainer (train/fsdp.py)
            if not isinstance(self.fsdp_config, dict):
                raise ConfigError("fsdp_config: expected a mapping (sharding_strategy, mixed_precision, ...)")
            from mptkit.train.fsdp_config import parse_fsdp_config

            parse_fsdp_config(self.fsdp_config)
        return self

    def _validate_foundry_keys(self) -> None:
        """llm-foundry's loading, saving, logging and system keys: values, and combinations mptkit refuses."""
        for k in ("load_weights_only", "load_strict_model_weights", "save_weights_only", "log_config",
                  "cuda_load_lazy"):
            _need_bool(k, getattr(self, k))
        if self.expandable_segments is not None:
            _need_bool("expandable_segments", self.expandable_segments)
        if self.max_split_size_mb is not None:
            _need_int("max_split_size_mb", self.max_split_size_mb, 1)
        ik = self.load_ignore_keys
        if ik is not None and (not isinstance(ik, list) or not all(isinstance(x, str) for x in ik)):
            raise ConfigError(f"load_ignore_keys: expected a list of key patterns (e.g. ['state/model/*wte*']), "
                              f"got {ik!r}")
        if self.load_weights_only and not self.load_path:
            raise ConfigError("load_weights_only: true needs load_path (the checkpoint or model whose weights to load)")
        if not self.load_weights_only:
            for k in ("load_ignore_keys", "load_strict_model_weights"):
                v = getattr(self, k)
                if (k == "load_ignore_keys" and v) or (k == "load_strict_model_weights" and v is False):
                    raise ConfigError(
                        f"{k}: applies to a weights-only load (load_weights_only: true); a full resume restores the "
                        "weights with their optimizer state, all or nothing")
        if self.save_weights_only and self.autoresume:
            raise ConfigError("save_weights_only: true with autoresume: true: a weights-only checkpoint has no "
                              "optimizer state, so a run cannot continue from it; set one of them to false")
        if self.python_log_level is not None and str(self.python_log_level).upper() not in (
                "DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
            raise ConfigError(f"python_log_level: expected debug, info, warning, error or critical, got "
                              f"{self.python_log_level!r}")
        if self.metadata is not None and not isinstance(self.metadata, dict):
            raise ConfigError("metadata: expected a mapping of names to values")
        if self.compile_config is not None:
            from mptkit.train.compile import check_compile_config

            check_compile_config(self.compile_config)
        if not self.log_config:
            log.warning("log_config: false: config.yaml is still written to the run folder (mptkit's record of "
                        "the run); the config is not sent to the loggers")

    @property
    def duration(self) -> Duration:
        if self._max_duration is None:
            self._max_duration = parse_duration(self.max_duration, "max_duration", allow_zero=False)
        return self._max_duration

    @property
    def checkpointing(self) -> CheckpointSettings:
        """The checkpointing keys (save_folder, save_interval, save_num_checkpoints_to_keep, save_overwrite,
        autoresume, load_path, resume_accept_data_change)."""
        return CheckpointSettings(self.save_folder, self.save_interval, self.save_num_checkpoints_to_keep,
                                  self.save_overwrite, self.autoresume, self.load_path,
                                  self.resume_accept_data_change, self.load_weights_only,
                                  self.load_strict_model_weights, tuple(self.load_ignore_keys or ()),
                                  self.save_weights_only)

    @property
    def sample(self) -> SampleSettings:
        """The end-of-run sample's keys (sample_prompt, sample_max_new_tokens, sample_temperature,
        sample_top_k) and the run's seed."""
        return SampleSettings(self.sample_prompt, self.sample_max_new_tokens, float(self.sample_temperature),
                              self.sample_top_k, self.seed)


_FIELD_NAMES = [f.name for f in dataclasses.fields(RunConfig) if not f.name.startswith("_")]


def config_from_dict(raw: dict, *, where: str = "recipe") -> RunConfig:
    """Interpolate, check keys (closest valid key on a typo), build and validate a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of run keys at the top level")
    from mptkit.train.foundry_keys import REFUSED, unset

    variables_used = _referenced_top_keys(raw)
    resolved = interpolate(raw)
    kwargs = {}
    for k, v in resolved.items():
        if k in _FIELD_NAMES:
            kwargs[k] = v
        elif k in REFUSED:  # llm-foundry keys mptkit does not implement: fine unset, else refused with why
            if not unset(v):
                raise ConfigError(f"{where}: {k}: not supported: {REFUSED[k]}; remove it or set it to null")
        elif k in variables_used:
            continue  # a variable only used through ${...}
        elif k in ("dist_timeout", "console_log_level"):
            continue
        else:
            near = closest(str(k), _FIELD_NAMES)
            hint = f"; did you mean '{near}'?" if near else ""
            raise ConfigError(f"{where}: unknown key '{k}'{hint} (a key used only as a ${{variable}} is allowed; "
                              "put free variables under 'variables:')")
    try:
        cfg = RunConfig(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg.validate()


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe YAML (or start from defaults when ``path`` is None) and apply overrides."""
    import yaml

    raw: dict = {}
    where = "overrides"
    if path is not None:
        p = Path(path)
        if not p.exists():
            from mptkit.recipes import training_recipe, training_recipes

            p = training_recipe(str(path)) or p  # `mptkit train quickstart`: a recipe shipped in the package
        where = str(p)
        if not p.exists():
            near = ""
            if p.parent.is_dir():
                c = closest(p.name, [x.name for x in p.parent.iterdir()])
                near = f" (did you mean '{p.parent / c}'?)" if c else ""
            if not near and Path(str(path)).name == str(path):
                c = closest(str(path), list(training_recipes()))
                near = f" (did you mean the bundled recipe '{c}'?)" if c else ""
            raise ConfigError(f"{p}: no such recipe file, and no bundled recipe of that name{near}")
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder; give the recipe's YAML file (e.g. {p / 'recipe.yaml'})")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = e.object.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} on line {line}); save the "
                              "recipe as UTF-8") from None
        except OSError as e:
            from mptkit.utils.outputs import describe_os_error

            raise ConfigError(describe_os_error(e, p, "cannot read the recipe")) from None
        try:
            raw = yaml_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of run keys at the top level")
        if not raw.get("run_name"):
            raw["run_name"] = p.stem
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, where=where)
