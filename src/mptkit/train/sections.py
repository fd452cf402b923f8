"""The typed sections of a training recipe: ``optimizer``, ``scheduler``, ``algorithms``, ``train_loader`` /
``eval_loader`` (with their ``dataset``), ``callbacks``, and the checkpointing and sample keys. Each default
is declared here once; the optimizers, schedules and callbacks read these objects. Key names are
llm-foundry's; an unknown key is a :class:`ConfigError` naming the closest valid one.

A section reads like the YAML mapping it came from as well (``cfg.optimizer["lr"]``, ``.get``, ``in``), and
``to_dict()`` gives that mapping back (the keys with a value, defaults resolved) for config.yaml."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mptkit.errors import ConfigError
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- checks


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            near = closest(str(k), allowed)
            hint = (
                f"; did you mean '{where}.{near}'?" if near else f"; valid keys: {', '.join(sorted(allowed))}"
            )
            raise ConfigError(f"unknown key '{where}.{k}'{hint}")


def _need_int(name: str, v: Any, lo: int, hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        extra = f" {hint}" if hint else ""
        raise ConfigError(f"{name}: expected an integer >= {lo}{extra}, got {v!r}")


def _need_num(name: str, v: Any, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise ConfigError(
            f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {v!r}"
        )


def _need_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{name}: expected true or false, got {v!r}")


def _dym(name: str, options) -> str:
    c = closest(str(name), options)
    return f" (did you mean '{c}'?)" if c else ""


# ----------------------------------------------------------------------------------- the base


class Section:
    """A recipe section: attributes are the YAML keys; read-only mapping access under the same names."""

    ALIASES: ClassVar[dict[str, str]] = {}  # accepted key -> the field it sets

    @classmethod
    def keys_allowed(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} | set(cls.ALIASES)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("_") or v is None:
                continue
            out[f.name] = v.to_dict() if isinstance(v, Section) else v
        return out

    def keys(self):
        return self.to_dict().keys()

    def __getitem__(self, key: str) -> Any:
        if key in self.keys():
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


# ----------------------------------------------------------------------------------- optimizer

OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw", "adamw")
# betas when the recipe gives none: Adam's (MPT's), Lion's (its paper's)
DEFAULT_BETAS = {"decoupled_adamw": (0.9, 0.95), "adamw": (0.9, 0.95), "decoupled_lionw": (0.9, 0.99)}


@dataclass
class OptimizerConfig(Section):
    """``optimizer``: ``fused`` None = the fused kernel where it can run (see train/optim.py)."""

    name: str = "decoupled_adamw"
    lr: float = 6e-4
    betas: list | tuple | None = None  # None: DEFAULT_BETAS[name]
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool | None = None

    def __post_init__(self):
        if self.betas is None and self.name in DEFAULT_BETAS:
            self.betas = list(DEFAULT_BETAS[self.name])

    @classmethod
    def from_dict(cls, d: Any) -> OptimizerConfig:
        if isinstance(d, OptimizerConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError("optimizer: expected a mapping with name, lr, betas, eps, weight_decay")
        _check_keys(d, cls.keys_allowed(), "optimizer")
        c = cls(**d)
        if c.name not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer.name: '{c.name}' is not one of {OPTIMIZERS}" + _dym(c.name, OPTIMIZERS)
            )
        _need_num("optimizer.lr", c.lr, positive=True)
        _need_num("optimizer.weight_decay", c.weight_decay)
        _need_num("optimizer.eps", c.eps)
        if c.fused is not None and not isinstance(c.fused, bool):
            raise ConfigError(f"optimizer.fused: expected true, false or null, got {c.fused!r}")
        if c.fused and c.name == "decoupled_lionw":
            raise ConfigError(
                "optimizer.fused: decoupled_lionw has one implementation (a per-tensor loop); "
                "remove optimizer.fused"
            )
        b = c.betas
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 2
            or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)
        ):
            raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {b!r}")
        return c


# ----------------------------------------------------------------------------------- scheduler

SCHEDULERS = (
    "cosine_with_warmup",
    "linear_decay_with_warmup",
    "constant_with_warmup",
    "inv_sqrt_with_warmup",
)
# the final multiplier when the recipe gives none (llm-foundry: constant's ``alpha`` is 1, the decays' 0)
DEFAULT_ALPHA_F = {"constant_with_warmup": 1.0}
# a recipe without a ``scheduler`` section: cosine to 0.1 x lr (MPT's recipes), from the first step
NO_SCHEDULER_ALPHA_F = 0.1


@dataclass
class SchedulerConfig(Section):
    """``scheduler``: durations as in the recipe ('100ba', '0.1ep', ...); ``t_max`` None = max_duration;
    ``t_scale`` None = the warmup's length (at least one batch). ``alpha_f_decay`` (inv_sqrt's name) sets
    ``alpha_f``."""

    ALIASES: ClassVar[dict[str, str]] = {"alpha_f_decay": "alpha_f"}

    name: str = "cosine_with_warmup"
    t_warmup: Any = "0ba"
    alpha_f: float | None = None  # None: DEFAULT_ALPHA_F.get(name, 0.0)
    t_max: Any = None
    t_scale: Any = None
    t_cooldown: Any = "0ba"
    alpha_f_cooldown: float = 0.0

    def __post_init__(self):
        if self.alpha_f is None:
            self.alpha_f = DEFAULT_ALPHA_F.get(self.name, 0.0)

    @classmethod
    def from_dict(cls, d: Any) -> SchedulerConfig:
        from mptkit.train.config import parse_duration

        if isinstance(d, SchedulerConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError("scheduler: expected a mapping with name, t_warmup, alpha_f")
        _check_keys(d, cls.keys_allowed(), "scheduler")
        d = dict(d)
        decay = d.pop("alpha_f_decay", None)
        if d.get("alpha_f") is None and decay is not None:
            d["alpha_f"] = decay
        c = cls(**d)
        if c.name not in SCHEDULERS:
            raise ConfigError(
                f"scheduler.name: '{c.name}' is not one of {SCHEDULERS}" + _dym(c.name, SCHEDULERS)
            )
        parse_duration(c.t_warmup, "scheduler.t_warmup")
        if c.t_max is not None:
            parse_duration(c.t_max, "scheduler.t_max", allow_zero=False)
        _need_num("scheduler.alpha_f", c.alpha_f)
        return c


# ----------------------------------------------------------------------------------- algorithms


@dataclass
class ClippingConfig(Section):
    """``algorithms.gradient_clipping``: the global gradient norm clipped to ``clipping_threshold``."""

    clipping_type: str = "norm"
    clipping_threshold: float = 1.0


@dataclass
class AlgorithmsConfig(Section):
    gradient_clipping: ClippingConfig | None = None  # None: no clipping

    @classmethod
    def from_dict(cls, d: Any) -> AlgorithmsConfig:
        if isinstance(d, AlgorithmsConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError(
                "algorithms: expected a mapping (e.g. gradient_clipping: {clipping_type: norm, ...})"
            )
        _check_keys(d, cls.keys_allowed(), "algorithms")
        gc = d.get("gradient_clipping")
        if gc is None:
            return cls()
        _check_keys(gc, ClippingConfig.keys_allowed(), "algorithms.gradient_clipping")
        c = ClippingConfig(**gc)
        if c.clipping_type != "norm":
            raise ConfigError("algorithms.gradient_clipping.clipping_type: only 'norm' is supported")
        _need_num("algorithms.gradient_clipping.clipping_threshold", c.clipping_threshold, positive=True)
        return cls(gradient_clipping=c)

    @property
    def clip(self) -> float | None:
        """The gradient-norm threshold, None without clipping."""
        return (
            float(self.gradient_clipping.clipping_threshold) if self.gradient_clipping is not None else None
        )


# ----------------------------------------------------------------------------------- loaders

LOADERS = ("text", "finetuning")
# the split a loader reads when its dataset names none
DEFAULT_SPLIT = {
    ("text", "train_loader"): "train",
    ("text", "eval_loader"): "val",
    ("finetuning", "train_loader"): "train",
    ("finetuning", "eval_loader"): "test",
}
# DataLoader keys of llm-foundry loaders: mptkit reads batches in the training process from memory-mapped
# shards (no DataLoader, no worker processes), so these change nothing
LOADER_IGNORED = {
    "num_workers": "batches are read in the training process (memory-mapped shards, no DataLoader workers)",
    "pin_memory": "there is no DataLoader; batches are copied to the device as they are",
    "prefetch_factor": "there are no DataLoader workers to prefetch",
    "persistent_workers": "there are no DataLoader workers",
    "timeout": "there are no DataLoader workers to wait for",
}
# llm-foundry's finetuning options that mptkit.data.finetune.FinetuneOptions reads (its defaults apply)
FINETUNE_OPTION_KEYS = {
    "allow_pad_trimming",
    "packing_ratio",
    "target_prompts",
    "target_responses",
    "preprocessing_fn",
    "system_prompt",
    "append_eos",
    "strict",
    "eos_token_id",
}


@dataclass
class TextDatasetConfig(Section):
    """``dataset`` of a ``text`` loader: shards prepared by `mptkit data prepare` in ``local``.
    ``shuffle_seed`` None = the run's seed. ``eos_token_id`` / ``bos_token_id`` are accepted and ignored."""

    local: str | None = None
    remote: str | None = None
    split: str | None = None  # None: DEFAULT_SPLIT
    shuffle: bool = True
    max_seq_len: int | None = None
    shuffle_seed: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # a mixture (llm-foundry / mosaicml-streaming): {name: {local, split, proportion | repeat | choose}}
    streams: dict | None = None
    epoch_size: int | None = None
    sampling_method: str | None = None  # balanced (default) | fixed


# the keys of one stream of ``dataset.streams``; STREAM_IGNORED are mosaicml-streaming's download settings
STREAM_KEYS = {"local", "remote", "split", "proportion", "repeat", "choose"}
STREAM_IGNORED = {"download_retry", "download_timeout", "validate_hash", "keep_zip"}


def _check_streams(dc: TextDatasetConfig, lname: str) -> None:
    """``dataset.streams`` (and ``epoch_size`` / ``sampling_method``): the shape, each stream's keys and
    weights, before any data is opened (the counts need the data: mptkit.data.mixture)."""
    where = f"{lname}.dataset.streams"
    if dc.streams is not None:
        if not isinstance(dc.streams, dict) or not dc.streams:
            raise ConfigError(f"{where}: expected a mapping of stream names to {{local, proportion | repeat | "
                              "choose}}")
        if dc.local:
            raise ConfigError(f"{lname}.dataset: give either local (one folder) or streams (a mixture), not both")
        relative = {}
        for name, st in dc.streams.items():
            w = f"{where}.{name}"
            if not isinstance(st, dict):
                raise ConfigError(f"{w}: expected a mapping with local and at most one of proportion, repeat, "
                                  "choose")
            _check_keys(st, STREAM_KEYS | STREAM_IGNORED, w)
            for k in sorted(STREAM_IGNORED & set(st)):
                log.warning("%s.%s is ignored: streams are read from local folders (nothing is downloaded)", w, k)
            if st.get("remote"):
                raise ConfigError(f"{w}.remote: streaming from a remote is not supported; prepare the data "
                                  f"locally (`mptkit data prepare`) and set {w}.local")
            if not st.get("local"):
                raise ConfigError(f"{w}.local: the stream's folder (prepared or MDS) is required")
            given = [k for k in ("proportion", "repeat", "choose") if st.get(k) is not None]
            if len(given) > 1:
                raise ConfigError(f"{w}: give at most one of proportion, repeat, choose (it has "
                                  f"{' and '.join(given)})")
            for k in given:
                v = st[k]
                if k == "choose":
                    _need_int(f"{w}.choose", v, 1)
                else:
                    _need_num(f"{w}.{k}", v, positive=True)
            relative[name] = given == ["proportion"]
            if st.get("split") not in (None, "train", "val", "validation", "test"):
                raise ConfigError(f"{w}.split: expected train or val, got '{st['split']}'")
        if any(relative.values()) and not all(relative.values()):
            a = next(n for n, r in relative.items() if r)
            b = next(n for n, r in relative.items() if not r)
            raise ConfigError(f"{where}.{b}: relative (proportion, as {where}.{a} has) and absolute (repeat, choose "
                              "or none) stream weights cannot be mixed: give every stream a proportion, or none")
        if dc.epoch_size is not None and not all(relative.values()) and any(
                st.get("repeat") is not None or st.get("choose") is not None for st in dc.streams.values()):
            raise ConfigError(f"{lname}.dataset.epoch_size: only with relative stream weights (proportion) or none; "
                              "with repeat / choose the epoch is the sum of the streams' samples")
    if dc.epoch_size is not None:
        _need_int(f"{lname}.dataset.epoch_size", dc.epoch_size, 1)
    if dc.sampling_method not in (None, "balanced", "fixed"):
        raise ConfigError(f"{lname}.dataset.sampling_method: balanced or fixed, got '{dc.sampling_method}'")


@dataclass
class FinetuneDatasetConfig(Section):
    """``dataset`` of a ``finetuning`` loader: examples in ``hf_name`` (or ``path``) as local files, or
    llm-foundry's ``hf_name: json`` + ``hf_kwargs``. ``options``: the FINETUNE_OPTION_KEYS given (flat keys
    in the YAML), for :class:`mptkit.data.finetune.FinetuneOptions`."""

    hf_name: str | None = None
    hf_kwargs: dict | None = None
    path: str | None = None
    split: str | None = None  # None: DEFAULT_SPLIT
    max_seq_len: int | None = None
    shuffle: bool = True
    shuffle_seed: int | None = None
    decoder_only_format: bool = True
    safe_load: Any = None  # accepted, ignored (mptkit never runs a dataset's code)
    tokenizer_name: str | None = None  # llm-foundry's older key: must name the run's tokenizer
    options: dict = field(default_factory=dict)

    @classmethod
    def keys_allowed(cls) -> set[str]:
        return (super().keys_allowed() - {"options"}) | FINETUNE_OPTION_KEYS

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(out.pop("options", {}))
        return out

    def __getattr__(self, name: str) -> Any:  # an option given flat: ds.packing_ratio, as in the YAML
        if name != "options" and name in FINETUNE_OPTION_KEYS:
            opts = self.__dict__.get("options", {})
            if name in opts:
                return opts[name]
        raise AttributeError(name)


@dataclass
class LoaderConfig(Section):
    """``train_loader`` / ``eval_loader``: ``name`` text (prepared token shards) or finetuning. The
    DataLoader keys (LOADER_IGNORED, ``drop_last``) are accepted for llm-foundry YAMLs and change nothing."""

    name: str = "text"
    dataset: TextDatasetConfig | FinetuneDatasetConfig = field(default_factory=TextDatasetConfig)
    drop_last: bool | None = None
    num_workers: int | None = None
    pin_memory: Any = None
    prefetch_factor: Any = None
    persistent_workers: Any = None
    timeout: Any = None

    @property
    def finetuning(self) -> bool:
        return self.name == "finetuning"

    @classmethod
    def from_dict(cls, d: Any, lname: str, *, data_prep: bool = False) -> LoaderConfig:
        if isinstance(d, LoaderConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError(f"{lname}: expected a mapping with name, dataset {{local, split, ...}}")
        _check_keys(d, cls.keys_allowed(), lname)
        _warn_ignored_loader_keys(d, lname)
        name = d.get("name", "text")
        if name not in LOADERS:
            raise ConfigError(
                f"{lname}.name: 'text' (prepared token shards) or 'finetuning' (prompt/response or "
                f"chat examples) are supported by `mptkit train`; got '{name}'"
            )
        ds = d.get("dataset") or {}
        if not isinstance(ds, dict):
            raise ConfigError(f"{lname}.dataset: expected a mapping with local, split, ...")
        if name == "finetuning":
            _check_keys(ds, FinetuneDatasetConfig.keys_allowed(), f"{lname}.dataset")
            opts = {k: v for k, v in ds.items() if k in FINETUNE_OPTION_KEYS}
            dc = FinetuneDatasetConfig(
                **{k: v for k, v in ds.items() if k not in FINETUNE_OPTION_KEYS}, options=opts
            )
            if not (dc.hf_name or dc.path):
                raise ConfigError(
                    f"{lname}.dataset.hf_name: the finetuning data (a local JSONL/JSON/CSV/Parquet "
                    "file, a folder of them, or a datasets save_to_disk folder) is required"
                )
            if dc.decoder_only_format is not True:
                raise ConfigError(
                    f"{lname}.dataset.decoder_only_format: only true (decoder-only models) is supported"
                )
            if data_prep and lname == "train_loader":
                raise ConfigError(
                    "data_prep prepares pretraining shards; a finetuning train_loader reads its "
                    "examples directly: remove data_prep"
                )
        else:
            _check_keys(ds, TextDatasetConfig.keys_allowed(), f"{lname}.dataset")
            dc = TextDatasetConfig(**ds)
            if dc.remote:
                raise ConfigError(
                    f"{lname}.dataset.remote: streaming from a remote is not supported; "
                    "prepare the data locally (`mptkit data prepare`) and set dataset.local"
                )
            _check_streams(dc, lname)
            if not dc.local and not dc.streams:
                raise ConfigError(f"{lname}.dataset.local: the folder of prepared shards is required (or "
                                  "streams: a mixture of folders)")
            if dc.split not in (None, "train", "val", "validation", "test"):
                raise ConfigError(f"{lname}.dataset.split: expected train or val, got '{dc.split}'")
        if dc.split is None:
            dc.split = DEFAULT_SPLIT[(name, lname)]
        return cls(name=name, dataset=dc, **{k: v for k, v in d.items() if k not in ("name", "dataset")})


def _warn_ignored_loader_keys(ld: dict, lname: str) -> None:
    """llm-foundry loader keys that change nothing in mptkit: one warning per key, naming it and why."""
    for k, why in LOADER_IGNORED.items():
        if k in ld and not (k == "num_workers" and ld[k] == 0):
            log.warning("%s.%s is ignored: %s", lname, k, why)
    if "drop_last" in ld:
        if lname == "train_loader" and ld["drop_last"] is not True:
            log.warning(
                "train_loader.drop_last is ignored: training always uses whole global batches (each "
                "epoch's last partial batch is left out)"
            )
        if lname == "eval_loader" and ld["drop_last"] is not False:
            log.warning(
                "eval_loader.drop_last is ignored: evaluation always covers every sample (up to "
                "eval_subset_num_batches)"
            )
    ds = ld.get("dataset") or {}
    if ld.get("name", "text") == "text":
        for k in ("eos_token_id", "bos_token_id"):
            if k in ds:
                log.warning(
                    "%s.dataset.%s is ignored: in a prepared folder documents are separated as prepared (the "
                    "separators in the folder's manifest.json set sequence_id); only an MDS folder uses it",
                    lname,
                    k,
                )
    elif "safe_load" in ds:
        log.warning(
            "%s.dataset.safe_load is ignored: mptkit reads only JSON/CSV/Parquet/Arrow files and never "
            "runs code from a dataset (only an explicit preprocessing_fn)",
            lname,
        )


# ----------------------------------------------------------------------------------- callbacks


@dataclass
class SpikeConfig(Section):
    """``callbacks.kill_loss_spike`` (llm-foundry's defaults; always on, log only unless ``log_only: false``).
    ``window_size`` None = the run's length rule; ``loss_cap`` None = the first full window's largest loss."""

    patience: int = 4
    outlier_multiplier: float = 2.0
    window_size: int | None = None
    loss_cap: float | None = None
    log_only: bool = True


@dataclass
class ScheduledGCConfig(Section):
    """``callbacks.scheduled_gc``: ``batch_interval`` is required (as in llm-foundry)."""

    batch_interval: int = 0
    eval_keep_disabled: bool = False


@dataclass
class OptimizerMonitorConfig(Section):
    batch_log_interval: int = 10
    log_optimizer_metrics: bool = True


@dataclass
class SpeedMonitorConfig(Section):
    """``callbacks.speed_monitor``: the throughput window; ``gpu_flops_available`` the per-device peak for MFU."""

    window_size: int = 10
    gpu_flops_available: float | None = None


HF_PRECISIONS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}


@dataclass
class HFCheckpointerConfig(Section):
    """``callbacks.hf_checkpointer`` (llm-foundry's ``HuggingFaceCheckpointer``): every ``save_interval`` (a bare
    integer counts epochs) and at the end of training, an HF folder of the model in ``precision`` at
    ``{save_folder}/huggingface/{huggingface_folder_name}`` (``ba{batch}``). The MLflow registry options must
    stay unset; ``flatten_imports`` and ``register_wait_seconds`` concern MosaicML's remote-code files and the
    registry, which mptkit's folders (transformers' MptForCausalLM layout) do not use."""

    save_folder: str | None = None
    save_interval: Any = None
    huggingface_folder_name: str = "ba{batch}"
    precision: str = "float32"
    overwrite: bool = True
    mlflow_registered_model_name: str | None = None
    mlflow_logging_config: dict | None = None
    flatten_imports: Any = None
    final_register_only: bool = False
    register_wait_seconds: int | None = None

    @classmethod
    def from_dict(cls, d: Any) -> HFCheckpointerConfig:
        from mptkit.train.config import parse_duration

        where = "callbacks.hf_checkpointer"
        _check_keys(d, cls.keys_allowed(), where)
        d = dict(d or {})
        for k in ("save_folder", "save_interval"):
            if d.get(k) in (None, ""):
                raise ConfigError(f"{where}.{k}: required (as in llm-foundry)")
        c = cls(**d)
        parse_duration(c.save_interval, f"{where}.save_interval", int_unit="ep", allow_zero=False)
        if str(c.precision) not in HF_PRECISIONS:
            raise ConfigError(f"{where}.precision: {c.precision!r} is not one of float32, bfloat16, float16"
                              + _dym(c.precision, HF_PRECISIONS))
        _need_bool(f"{where}.overwrite", c.overwrite)
        if c.mlflow_registered_model_name or c.mlflow_logging_config or c.final_register_only:
            raise ConfigError(f"{where}: registering the model in an MLflow model registry "
                              "(mlflow_registered_model_name, mlflow_logging_config, final_register_only) is not "
                              "supported; the HF folders are written under save_folder")
        if not isinstance(c.huggingface_folder_name, str) or "/" in c.huggingface_folder_name.strip("/"):
            raise ConfigError(f"{where}.huggingface_folder_name: expected one folder name such as 'ba{{batch}}'")
        return c

    def folder_name(self, **values) -> str:
        try:
            return self.huggingface_folder_name.format(**values)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"callbacks.hf_checkpointer.huggingface_folder_name: "
                              f"{self.huggingface_folder_name!r} names an unknown field ({e}); use {{batch}}, "
                              "{epoch}, {sample}, {token}, {run_name}, {rank}") from None


# composer callbacks whose metrics mptkit always logs its own way: their options change nothing (a warning)
ALWAYS_ON_CALLBACKS = {
    "lr_monitor": "the lr is logged every step (metrics.jsonl 'lr')",
    "memory_monitor": "memory is logged every step (mem_peak_gb on CUDA, mem_rss_peak_gb on CPU)",
    "runtime_estimator": "the console log and progress bar show an ETA from the speed-monitor window",
}


@dataclass
class CallbacksConfig(Section):
    """``callbacks``: the loss-spike monitor and speed monitor always run; ``scheduled_gc`` and
    ``optimizer_monitor`` when named (``optimizer_monitor:`` with no options: its defaults)."""

    kill_loss_spike: SpikeConfig = field(default_factory=SpikeConfig)
    scheduled_gc: ScheduledGCConfig | None = None
    optimizer_monitor: OptimizerMonitorConfig | None = None
    speed_monitor: SpeedMonitorConfig = field(default_factory=SpeedMonitorConfig)
    hf_checkpointer: HFCheckpointerConfig | None = None
    lr_monitor: dict | None = None
    memory_monitor: dict | None = None
    runtime_estimator: dict | None = None

    @classmethod
    def from_dict(cls, cb: Any) -> CallbacksConfig:
        if isinstance(cb, CallbacksConfig):
            return cb
        if not isinstance(cb, dict):
            raise ConfigError("callbacks: expected a mapping of callback name -> options")
        _check_keys(cb, cls.keys_allowed(), "callbacks")
        out = cls()
        spike = cb.get("kill_loss_spike")
        if spike is not None:
            _check_keys(spike, SpikeConfig.keys_allowed(), "callbacks.kill_loss_spike")
            s = out.kill_loss_spike = SpikeConfig(**spike)
            _need_int("callbacks.kill_loss_spike.patience", s.patience, 0)
            _need_num("callbacks.kill_loss_spike.outlier_multiplier", s.outlier_multiplier, positive=True)
            if s.window_size is not None:
                _need_int("callbacks.kill_loss_spike.window_size", s.window_size, 1)
            if s.loss_cap is not None:
                _need_num("callbacks.kill_loss_spike.loss_cap", s.loss_cap, positive=True)
            _need_bool("callbacks.kill_loss_spike.log_only", s.log_only)
        if "scheduled_gc" in cb:
            sgc = cb["scheduled_gc"]
            _check_keys(sgc, ScheduledGCConfig.keys_allowed(), "callbacks.scheduled_gc")
            if not isinstance(sgc, dict) or "batch_interval" not in sgc:
                raise ConfigError(
                    "callbacks.scheduled_gc.batch_interval: required (batches between gc.collect() "
                    "calls; automatic garbage collection is off during training), as in llm-foundry"
                )
            g = out.scheduled_gc = ScheduledGCConfig(**sgc)
            _need_int("callbacks.scheduled_gc.batch_interval", g.batch_interval, 1)
            _need_bool("callbacks.scheduled_gc.eval_keep_disabled", g.eval_keep_disabled)
        if "optimizer_monitor" in cb:
            om = cb["optimizer_monitor"]
            om = {} if om is None else om
            _check_keys(om, OptimizerMonitorConfig.keys_allowed(), "callbacks.optimizer_monitor")
            o = out.optimizer_monitor = OptimizerMonitorConfig(**om)
            _need_int("callbacks.optimizer_monitor.batch_log_interval", o.batch_log_interval, 1)
            _need_bool("callbacks.optimizer_monitor.log_optimizer_metrics", o.log_optimizer_metrics)
        sm = cb.get("speed_monitor")
        if sm is not None:
            _check_keys(sm, SpeedMonitorConfig.keys_allowed(), "callbacks.speed_monitor")
            m = out.speed_monitor = SpeedMonitorConfig(**sm)
            _need_int("callbacks.speed_monitor.window_size", m.window_size, 1)
            if m.gpu_flops_available is not None:
                _need_num("callbacks.speed_monitor.gpu_flops_available", m.gpu_flops_available, positive=True)
        if cb.get("hf_checkpointer") is not None:
            out.hf_checkpointer = HFCheckpointerConfig.from_dict(cb["hf_checkpointer"])
        for name, what in ALWAYS_ON_CALLBACKS.items():
            if name not in cb:
                continue
            opts = cb[name]
            if opts is None:
                setattr(out, name, {})
                continue
            if not isinstance(opts, dict):
                raise ConfigError(
                    f"callbacks.{name}: expected a mapping (or nothing), got {type(opts).__name__}"
                )
            for k in opts:
                log.warning("callbacks.%s.%s is ignored: %s", name, k, what)
            setattr(out, name, dict(opts))
        return out


# ----------------------------------------------------------------------------------- watchdog


@dataclass
class WatchdogConfig(Section):
    """``watchdog`` (mptkit): the step watchdog of every rank (train/watchdog.py). ``timeout`` None = derived:
    ``max(min_timeout, step_multiplier x the slowest step)``, ``first_step_timeout`` before the first step of an
    attempt has finished; ``checkpoint_timeout`` None = ``max(timeout or min_timeout, 600)`` seconds without
    the checkpoint's temporary folder growing."""

    enabled: bool = True
    timeout: float | None = None
    min_timeout: float = 300.0
    step_multiplier: float = 10.0
    first_step_timeout: float = 1800.0
    checkpoint_timeout: float | None = None

    @classmethod
    def from_dict(cls, d: Any) -> WatchdogConfig:
        if isinstance(d, WatchdogConfig):
            return d
        if d is None:
            return cls()
        if isinstance(d, bool):  # watchdog: false
            return cls(enabled=d)
        if not isinstance(d, dict):
            raise ConfigError("watchdog: expected a mapping (enabled, timeout, min_timeout, ...) or true/false")
        _check_keys(d, cls.keys_allowed(), "watchdog")
        c = cls(**d)
        _need_bool("watchdog.enabled", c.enabled)
        for k in ("timeout", "checkpoint_timeout"):
            if getattr(c, k) is not None:
                _need_num(f"watchdog.{k}", getattr(c, k), positive=True)
        for k in ("min_timeout", "step_multiplier", "first_step_timeout"):
            _need_num(f"watchdog.{k}", getattr(c, k), positive=True)
        return c


# ----------------------------------------------------------------------------------- recovery

RECOVERY_ACTIONS = ("stop", "skip", "rollback")
SPIKE_ACTIONS = ("log", *RECOVERY_ACTIONS)


@dataclass
class RecoveryConfig(Section):
    """``recovery`` (mptkit): what the trainer does, without a human, on a non-finite loss or gradient norm
    (``nonfinite``) and on a ``callbacks.kill_loss_spike`` event (``loss_spike``): ``stop`` (exit code
    ``mptkit.errors.EXIT_DIVERGED``), ``skip`` (drop the step's update and its batch), ``rollback`` (reload the
    newest checkpoint from before the trouble and skip the batches since it; PaLM's recipe); ``loss_spike`` also
    ``log``. ``loss_spike`` None: ``kill_loss_spike.log_only`` decides (true: log, false: stop), as in llm-foundry.
    ``skip_batches`` None: a rollback skips every batch from the checkpoint to the bad step, N: the last N of them.
    After a skip or rollback the lr is multiplied by ``lr_factor`` for ``lr_steps`` steps. More than
    ``max_recoveries`` skips and rollbacks in one run stop it. See train/recovery.py and docs/training.md."""

    nonfinite: str = "stop"
    loss_spike: str | None = None
    skip_batches: int | None = None
    lr_factor: float = 1.0
    lr_steps: int = 0
    max_recoveries: int = 20

    @classmethod
    def from_dict(cls, d: Any, *, spike: Any = None) -> RecoveryConfig:
        """``d``: the ``recovery`` mapping; ``spike``: the recipe's ``callbacks.kill_loss_spike`` mapping as
        written (an explicit ``log_only`` must agree with ``loss_spike``)."""
        if isinstance(d, RecoveryConfig):
            return d
        d = {} if d is None else d
        _check_keys(d, cls.keys_allowed(), "recovery")
        c = cls(**d)
        if c.nonfinite not in RECOVERY_ACTIONS:
            raise ConfigError(f"recovery.nonfinite: expected one of {', '.join(RECOVERY_ACTIONS)}, got "
                              f"{c.nonfinite!r}" + _dym(c.nonfinite, RECOVERY_ACTIONS))
        if c.loss_spike is not None and c.loss_spike not in SPIKE_ACTIONS:
            raise ConfigError(f"recovery.loss_spike: expected one of {', '.join(SPIKE_ACTIONS)} (or null: "
                              f"callbacks.kill_loss_spike.log_only decides), got {c.loss_spike!r}"
                              + _dym(c.loss_spike, SPIKE_ACTIONS))
        log_only = spike.get("log_only") if isinstance(spike, dict) else None
        if c.loss_spike is not None and isinstance(log_only, bool) and log_only != (c.loss_spike == "log"):
            raise ConfigError(
                f"recovery.loss_spike: {c.loss_spike} contradicts callbacks.kill_loss_spike.log_only: {log_only} "
                f"(log_only true only logs, false acts); remove callbacks.kill_loss_spike.log_only, or set it to "
                f"{str(c.loss_spike == 'log').lower()}")
        if c.skip_batches is not None:
            _need_int("recovery.skip_batches", c.skip_batches, 1, hint="(or null: every batch since the checkpoint)")
        if isinstance(c.lr_factor, bool) or not isinstance(c.lr_factor, (int, float)) or not 0 < c.lr_factor <= 1:
            raise ConfigError(f"recovery.lr_factor: expected a number in (0, 1] (the lr multiplier after a "
                              f"recovery), got {c.lr_factor!r}")
        _need_int("recovery.lr_steps", c.lr_steps, 0)
        if c.lr_factor != 1 and c.lr_steps == 0:
            raise ConfigError(f"recovery.lr_steps: lr_factor {c.lr_factor} lowers the lr for lr_steps steps after "
                              "a recovery; set lr_steps >= 1")
        _need_int("recovery.max_recoveries", c.max_recoveries, 0)
        return c

    def spike_action(self, log_only: bool) -> str:
        """The action on a kill_loss_spike event: ``loss_spike``, else log (log_only) or stop."""
        return self.loss_spike if self.loss_spike is not None else ("log" if log_only else "stop")

    def actions(self, log_only: bool) -> set[str]:
        return {self.nonfinite, self.spike_action(log_only)}


# ----------------------------------------------------------------------------------- views of top-level keys


@dataclass(frozen=True)
class CheckpointSettings:
    """The recipe's checkpointing keys (top-level, llm-foundry's names), read together."""

    save_folder: str | None
    save_interval: Any
    save_num_checkpoints_to_keep: int
    save_overwrite: bool
    autoresume: bool
    load_path: str | None
    resume_accept_data_change: bool
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: tuple = ()
    save_weights_only: bool = False


@dataclass(frozen=True)
class SampleSettings:
    """The end-of-run sample (``sample_prompt``, ``sample_max_new_tokens``, ``sample_temperature``: 0 = greedy,
    ``sample_top_k``), generated by `mptkit train`; ``seed`` is the run's."""

    prompt: str | None
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int
