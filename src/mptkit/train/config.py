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

from mptkit.errors import ConfigError
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- durations

_UNITS = ("ba", "ep", "tok", "sp")
_MULT = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_DUR_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMBGT]?)(ba|ep|tok|sp)\s*$")


@dataclass(frozen=True)
class Duration:
    """A length of training: ``value`` batches ("ba"), epochs ("ep"), tokens ("tok") or samples ("sp")."""

    value: float
    unit: str

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{v}{self.unit}"

    def to_batches(self, *, batches_per_epoch: int | None, tokens_per_batch: int, samples_per_batch: int) -> int:
        """Number of optimizer steps this duration covers (rounded up)."""
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
                "'Ntok' (tokens, e.g. '5Mtok') or 'Nsp' (samples)"
            )
        d = Duration(float(m.group(1)) * _MULT[m.group(2)], m.group(3))
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

OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw", "adamw")
SCHEDULERS = ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup", "inv_sqrt_with_warmup")
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")

# Sub-section keys each section accepts (unknown ones are an error naming the closest).
OPTIMIZER_KEYS = {"name", "lr", "betas", "eps", "weight_decay", "fused"}
SCHEDULER_KEYS = {"name", "t_warmup", "alpha_f", "t_max", "t_scale", "t_cooldown", "alpha_f_decay",
                  "alpha_f_cooldown"}
LOADER_KEYS = {"name", "dataset", "drop_last", "num_workers", "pin_memory", "prefetch_factor",
               "persistent_workers", "timeout"}
DATASET_KEYS = {"local", "remote", "split", "shuffle", "max_seq_len", "shuffle_seed", "eos_token_id",
                "bos_token_id"}
# llm-foundry's finetuning dataset keys (``train_loader.name: finetuning``); see mptkit.data.finetune
FINETUNE_DATASET_KEYS = {"hf_name", "hf_kwargs", "path", "split", "max_seq_len", "shuffle", "shuffle_seed",
                         "decoder_only_format", "allow_pad_trimming", "packing_ratio", "target_prompts", "target_responses",
                         "preprocessing_fn", "system_prompt", "append_eos", "strict", "safe_load"}
DATA_PREP_KEYS = {"inputs", "vocab_size", "max_files", "max_bytes", "val_fraction", "options"}
CLIP_KEYS = {"clipping_type", "clipping_threshold"}
CALLBACKS = {"speed_monitor", "lr_monitor", "memory_monitor", "runtime_estimator", "kill_loss_spike",
             "optimizer_monitor", "scheduled_gc"}
SPIKE_KEYS = {"patience", "outlier_multiplier", "window_size", "loss_cap", "log_only"}
SCHEDULED_GC_KEYS = {"batch_interval", "eval_keep_disabled"}
OPTIMIZER_MONITOR_KEYS = {"batch_log_interval", "log_optimizer_metrics"}
SPEED_MONITOR_KEYS = {"window_size", "gpu_flops_available"}
# composer callbacks whose metrics mptkit always logs its own way: their options change nothing (a warning)
ALWAYS_ON_CALLBACKS = {
    "lr_monitor": "the lr is logged every step (metrics.jsonl 'lr')",
    "memory_monitor": "memory is logged every step (mem_peak_gb on CUDA, mem_rss_peak_gb on CPU)",
    "runtime_estimator": "the console log and progress bar show an ETA from the speed-monitor window",
}
# DataLoader keys of llm-foundry loaders: mptkit reads batches in the training process from memory-mapped
# shards (no DataLoader, no worker processes), so these change nothing
_LOADER_IGNORED = {
    "num_workers": "batches are read in the training process (memory-mapped shards, no DataLoader workers)",
    "pin_memory": "there is no DataLoader; batches are copied to the device as they are",
    "prefetch_factor": "there are no DataLoader workers to prefetch",
    "persistent_workers": "there are no DataLoader workers",
    "timeout": "there are no DataLoader workers to wait for",
}
LOGGERS = {"tensorboard", "jsonl"}


@dataclass
class RunConfig:
    """Everything a training run needs, validated. Field names are the YAML keys."""

    model: Any = "mpt-tiny"
    tokenizer: Any = None
    train_loader: dict | None = None
    eval_loader: dict | None = None
    data_prep: dict | None = None
    run_name: str | None = None
    seed: int = 17
    max_seq_len: int | None = None
    max_duration: Any = "10ba"
    global_train_batch_size: int = 8
    device_train_microbatch_size: Any = "auto"
    device_eval_batch_size: int | None = None
    precision: str = "fp32"
    optimizer: dict = field(default_factory=lambda: {"name": "decoupled_adamw", "lr": 6e-4, "betas": [0.9, 0.95],
                                                     "eps": 1e-8, "weight_decay": 0.0})
    scheduler: dict = field(default_factory=lambda: {"name": "cosine_with_warmup", "t_warmup": "0ba",
                                                     "alpha_f": 0.1})
    algorithms: dict = field(default_factory=dict)
    eval_interval: Any = "1ep"
    eval_subset_num_batches: int = -1
    eval_first: bool = False
    save_folder: str | None = None
    save_interval: Any = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    resume_accept_data_change: bool = False  # resume although the data stream differs from the checkpoint's
    progress_bar: bool = True
    log_to_console: bool = True
    console_log_interval: Any = "1ba"
    callbacks: dict = field(default_factory=dict)
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

    # derived (filled by validate)
    _max_duration: Duration | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    # ------------------------------------------------------------------------------ validation
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
        # optimizer
        if not isinstance(self.optimizer, dict):
            raise ConfigError("optimizer: expected a mapping with name, lr, betas, eps, weight_decay")
        _check_keys(self.optimizer, OPTIMIZER_KEYS, "optimizer")
        name = self.optimizer.get("name", "decoupled_adamw")
        if name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name: '{name}' is not one of {OPTIMIZERS}" + _dym(name, OPTIMIZERS))
        _need_num("optimizer.lr", self.optimizer.get("lr", 6e-4), positive=True)
        _need_num("optimizer.weight_decay", self.optimizer.get("weight_decay", 0.0))
        _need_num("optimizer.eps", self.optimizer.get("eps", 1e-8))
        fused = self.optimizer.get("fused")
        if fused is not None and not isinstance(fused, bool):
            raise ConfigError(f"optimizer.fused: expected true, false or null, got {fused!r}")
        if fused and name == "decoupled_lionw":
            raise ConfigError("optimizer.fused: decoupled_lionw has one implementation (a per-tensor loop); "
                              "remove optimizer.fused")
        betas = self.optimizer.get("betas", [0.9, 0.95] if name != "decoupled_lionw" else [0.9, 0.99])
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in betas
        ):
            raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {betas!r}")
        # scheduler
        if not isinstance(self.scheduler, dict):
            raise ConfigError("scheduler: expected a mapping with name, t_warmup, alpha_f")
        _check_keys(self.scheduler, SCHEDULER_KEYS, "scheduler")
        sname = self.scheduler.get("name", "cosine_with_warmup")
        if sname not in SCHEDULERS:
            raise ConfigError(f"scheduler.name: '{sname}' is not one of {SCHEDULERS}" + _dym(sname, SCHEDULERS))
        parse_duration(self.scheduler.get("t_warmup", "0ba"), "scheduler.t_warmup")
        if "t_max" in self.scheduler:
            parse_duration(self.scheduler["t_max"], "scheduler.t_max", allow_zero=False)
        _need_num("scheduler.alpha_f", self.scheduler.get("alpha_f", 0.0))
        # algorithms
        if not isinstance(self.algorithms, dict):
            raise ConfigError("algorithms: expected a mapping (e.g. gradient_clipping: {clipping_type: norm, ...})")
        _check_keys(self.algorithms, {"gradient_clipping"}, "algorithms")
        gc = self.algorithms.get("gradient_clipping")
        if gc is not None:
            _check_keys(gc, CLIP_KEYS, "algorithms.gradient_clipping")
            if gc.get("clipping_type", "norm") != "norm":
                raise ConfigError("algorithms.gradient_clipping.clipping_type: only 'norm' is supported")
            _need_num("algorithms.gradient_clipping.clipping_threshold", gc.get("clipping_threshold", 1.0),
                      positive=True)
        # callbacks / loggers
        if not isinstance(self.callbacks, dict):
            raise ConfigError("callbacks: expected a mapping of callback name -> options")
        _check_keys(self.callbacks, CALLBACKS, "callbacks")
        _check_callbacks(self.callbacks)
        if not isinstance(self.loggers, dict):
            raise ConfigError("loggers: expected a mapping of logger name -> options")
        _check_keys(self.loggers, LOGGERS, "loggers")
        # loaders
        for lname in ("train_loader", "eval_loader"):
            ld = getattr(self, lname)
            if ld is None:
                continue
            if not isinstance(ld, dict):
                raise ConfigError(f"{lname}: expected a mapping with name, dataset {{local, split, ...}}")
            _check_keys(ld, LOADER_KEYS, lname)
            _warn_ignored_loader_keys(ld, lname)
            name = ld.get("name", "text")
            if name not in ("text", "finetuning"):
                raise ConfigError(f"{lname}.name: 'text' (prepared token shards) or 'finetuning' (prompt/response or "
                                  f"chat examples) are supported by `mptkit train`; got '{name}'")
            ds = ld.get("dataset") or {}
            if not isinstance(ds, dict):
                raise ConfigError(f"{lname}.dataset: expected a mapping with local, split, ...")
            if name == "finetuning":
                _check_keys(ds, FINETUNE_DATASET_KEYS, f"{lname}.dataset")
                if not (ds.get("hf_name") or ds.get("path")):
                    raise ConfigError(f"{lname}.dataset.hf_name: the finetuning data (a local JSONL/JSON/CSV/Parquet "
                                      "file, a folder of them, or a datasets save_to_disk folder) is required")
                if ds.get("decoder_only_format", True) is not True:
                    raise ConfigError(f"{lname}.dataset.decoder_only_format: only true (decoder-only models) is "
                                      "supported")
                if self.data_prep is not None and lname == "train_loader":
                    raise ConfigError("data_prep prepares pretraining shards; a finetuning train_loader reads its "
                                      "examples directly: remove data_prep")
                continue
            _check_keys(ds, DATASET_KEYS, f"{lname}.dataset")
            if ds.get("remote"):
                raise ConfigError(f"{lname}.dataset.remote: streaming from a remote is not supported; "
                                  "prepare the data locally (`mptkit data prepare`) and set dataset.local")
            if not ds.get("local"):
                raise ConfigError(f"{lname}.dataset.local: the folder of prepared shards is required")
            if ds.get("split", "train") not in ("train", "val", "validation", "test"):
                raise ConfigError(f"{lname}.dataset.split: expected train or val, got '{ds.get('split')}'")
        if self.data_prep is not None:
            if not isinstance(self.data_prep, dict):
                raise ConfigError("data_prep: expected a mapping (inputs, vocab_size, ...)")
            _check_keys(self.data_prep, DATA_PREP_KEYS, "data_prep")
        _need_int("save_num_checkpoints_to_keep", self.save_num_checkpoints_to_keep, -1)
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

    @property
    def duration(self) -> Duration:
        if self._max_duration is None:
            self._max_duration = parse_duration(self.max_duration, "max_duration", allow_zero=False)
        return self._max_duration


def _check_callbacks(cb: dict) -> None:
    """Values of the callbacks mptkit implements (their names are checked by ``validate`` just before); a
    warning for options of the always-on ones."""
    spike = cb.get("kill_loss_spike")
    if spike is not None:
        _check_keys(spike, SPIKE_KEYS, "callbacks.kill_loss_spike")
        _need_int("callbacks.kill_loss_spike.patience", spike.get("patience", 4), 0)
        _need_num("callbacks.kill_loss_spike.outlier_multiplier", spike.get("outlier_multiplier", 2), positive=True)
        if spike.get("window_size") is not None:
            _need_int("callbacks.kill_loss_spike.window_size", spike["window_size"], 1)
        if spike.get("loss_cap") is not None:
            _need_num("callbacks.kill_loss_spike.loss_cap", spike["loss_cap"], positive=True)
        _need_bool("callbacks.kill_loss_spike.log_only", spike.get("log_only", True))
    if "scheduled_gc" in cb:
        sgc = cb["scheduled_gc"]
        _check_keys(sgc, SCHEDULED_GC_KEYS, "callbacks.scheduled_gc")
        if not isinstance(sgc, dict) or "batch_interval" not in sgc:
            raise ConfigError("callbacks.scheduled_gc.batch_interval: required (batches between gc.collect() calls; "
                              "automatic garbage collection is off during training), as in llm-foundry")
        _need_int("callbacks.scheduled_gc.batch_interval", sgc["batch_interval"], 1)
        _need_bool("callbacks.scheduled_gc.eval_keep_disabled", sgc.get("eval_keep_disabled", False))
    om = cb.get("optimizer_monitor")
    if om is not None:
        _check_keys(om, OPTIMIZER_MONITOR_KEYS, "callbacks.optimizer_monitor")
        _need_int("callbacks.optimizer_monitor.batch_log_interval", om.get("batch_log_interval", 10), 1)
        _need_bool("callbacks.optimizer_monitor.log_optimizer_metrics", om.get("log_optimizer_metrics", True))
    sm = cb.get("speed_monitor")
    if sm is not None:
        _check_keys(sm, SPEED_MONITOR_KEYS, "callbacks.speed_monitor")
        _need_int("callbacks.speed_monitor.window_size", sm.get("window_size", 10), 1)
        if sm.get("gpu_flops_available") is not None:
            _need_num("callbacks.speed_monitor.gpu_flops_available", sm["gpu_flops_available"], positive=True)
    for name, what in ALWAYS_ON_CALLBACKS.items():
        opts = cb.get(name)
        if opts is None:
            continue
        if not isinstance(opts, dict):
            raise ConfigError(f"callbacks.{name}: expected a mapping (or nothing), got {type(opts).__name__}")
        for k in opts:
            log.warning("callbacks.%s.%s is ignored: %s", name, k, what)


def _warn_ignored_loader_keys(ld: dict, lname: str) -> None:
    """llm-foundry loader keys that change nothing in mptkit: one warning per key, naming it and why."""
    for k, why in _LOADER_IGNORED.items():
        if k in ld and not (k == "num_workers" and ld[k] == 0):
            log.warning("%s.%s is ignored: %s", lname, k, why)
    if "drop_last" in ld:
        if lname == "train_loader" and ld["drop_last"] is not True:
            log.warning("train_loader.drop_last is ignored: training always uses whole global batches (each "
                        "epoch's last partial batch is left out)")
        if lname == "eval_loader" and ld["drop_last"] is not False:
            log.warning("eval_loader.drop_last is ignored: evaluation always covers every sample (up to "
                        "eval_subset_num_batches)")
    ds = ld.get("dataset") or {}
    if ld.get("name", "text") == "text":
        for k in ("eos_token_id", "bos_token_id"):
            if k in ds:
                log.warning("%s.dataset.%s is ignored: documents are separated as prepared (the separators in the "
                            "folder's manifest.json set sequence_id)", lname, k)
    elif "safe_load" in ds:
        log.warning("%s.dataset.safe_load is ignored: mptkit reads only JSON/CSV/Parquet/Arrow files and never "
                    "runs code from a dataset (only an explicit preprocessing_fn)", lname)


def _need_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{name}: expected true or false, got {v!r}")


def _dym(name: str, options) -> str:
    c = closest(str(name), options)
    return f" (did you mean '{c}'?)" if c else ""


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            near = closest(str(k), allowed)
            hint = f"; did you mean '{where}.{near}'?" if near else f"; valid keys: {', '.join(sorted(allowed))}"
            raise ConfigError(f"unknown key '{where}.{k}'{hint}")


def _need_int(name: str, v: Any, lo: int, hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        extra = f" {hint}" if hint else ""
        raise ConfigError(f"{name}: expected an integer >= {lo}{extra}, got {v!r}")


def _need_num(name: str, v: Any, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {v!r}")


_FIELD_NAMES = [f.name for f in dataclasses.fields(RunConfig) if not f.name.startswith("_")]


def config_from_dict(raw: dict, *, where: str = "recipe") -> RunConfig:
    """Interpolate, check keys (closest valid key on a typo), build and validate a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of run keys at the top level")
    variables_used = _referenced_top_keys(raw)
    resolved = interpolate(raw)
    kwargs = {}
    for k, v in resolved.items():
        if k in _FIELD_NAMES:
            kwargs[k] = v
        elif k in variables_used:
            continue  # a variable only used through ${...}
        elif k in ("dist_timeout", "python_log_level", "console_log_level"):
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
    if cfg.optimizer is not None and isinstance(cfg.optimizer, dict):
        cfg.optimizer = {"name": "decoupled_adamw", **cfg.optimizer}
    if cfg.scheduler is not None and isinstance(cfg.scheduler, dict):
        cfg.scheduler = {"name": "cosine_with_warmup", **cfg.scheduler}
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
