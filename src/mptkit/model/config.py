"""MPTConfig: every key of MPT's config.json, its default, validation, and config.json I/O.

Key names and defaults follow MosaicML's MPT (the ``configuration_mpt.py`` shipped with mosaicml/mpt-7b
and llm-foundry), so a user's config.json or YAML works unchanged. Two on-disk layouts are read and
written:

* MosaicML's original: ``"architectures": ["MPTForCausalLM"]`` with an ``auto_map`` to remote code;
* transformers' native: ``"architectures": ["MptForCausalLM"]`` (``model_type: mpt``), loadable by
  ``transformers.AutoModelForCausalLM`` without ``trust_remote_code``.

Keys this class does not know are kept in ``extra`` and written back unchanged, except a key that looks
like a misspelling of a known key that the file does not set (``n_head`` for ``n_heads``): that is an
error naming both, because silently falling back to a default would build the wrong model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import ConfigError
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")


def attn_impls() -> tuple[str, ...]:
    """The valid ``attn_config.attn_impl`` values: "auto" (picks the fastest exact backend for the device), the
    backends of the attention registry (``mptkit.model.attention.BACKENDS``, in registration order: one added
    with ``register_backend`` is valid too), and "triton" (old MPT files), which maps to auto. Read from the
    registry when asked (also as ``ATTN_IMPLS``, see ``__getattr__``): this module never imports attention.py
    at import time."""
    from mptkit.model.attention import BACKENDS

    return ("auto", *BACKENDS, "triton")


def __getattr__(name: str):
    if name == "ATTN_IMPLS":
        return attn_impls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


NORM_TYPES = ("low_precision_layernorm", "layernorm", "rmsnorm", "low_precision_rmsnorm")
FFN_TYPES = ("mptmlp", "mptglu")
INIT_NAMES = (
    "kaiming_normal_",
    "kaiming_uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "baseline_",
    "small_init_",
    "neox_init_",
    "default_",
)

ATTN_DEFAULTS: dict[str, Any] = {
    "attn_type": "multihead_attention",
    "attn_pdrop": 0.0,
    "attn_impl": "auto",
    "qk_ln": False,
    "clip_qkv": None,
    "softmax_scale": None,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "alibi": False,
    "alibi_bias_max": 8,
    "kv_n_heads": None,
}

FFN_DEFAULTS: dict[str, Any] = {"ffn_type": "mptmlp", "ffn_hidden_size": None}

# MPT-7B's init (the remote code published with the weights): kaiming_normal_, fan_in, relu,
# residual projections divided by sqrt(2 * n_layers).
INIT_DEFAULTS: dict[str, Any] = {
    "name": "kaiming_normal_",
    "fan_mode": "fan_in",
    "init_nonlinearity": "relu",
    "init_div_is_residual": True,
    "emb_init_std": None,
    "emb_init_uniform_lim": None,
    "init_std": None,
    "init_gain": 0.0,
}

# Top-level keys of the files that are not model hyper-parameters; always allowed, kept verbatim.
PASSTHROUGH_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "tokenizer_name",
    "verbose",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "fc_type",
    "use_pad_tok_in_ffn",
    "residual_modification",
    "residual_coeff",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}

MOSAIC_AUTO_MAP = {
    "AutoConfig": "configuration_mpt.MPTConfig",
    "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
}


class FrozenSection(dict):
    """A section (``attn_config`` …, ``extra``) of a built model's config: reads as a dict, refuses changes.

    Copies (``copy.copy``/``copy.deepcopy``/``dict(...)``, pickling) are plain, changeable dicts."""

    def _refuse(self, *args: Any, **kwargs: Any):
        raise ConfigError(READ_ONLY_HINT)

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo: dict) -> dict:
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self):
        return (dict, (dict(self),))


READ_ONLY_HINT = (
    "a built model's config is read-only (its modules were made from it, so a change would not reach them): "
    "make a new config with config.replace(...) and build a new model from it, or give the overrides when "
    "loading (MPTForCausalLM.from_pretrained(folder, attn_config={...}, ...); a recipe's "
    "model.config_overrides)"
)


def _merge_defaults(section: str, given: dict | None, defaults: dict, where: str) -> tuple[dict, dict]:
    """Defaults overlaid by ``given``; returns (known, unknown). Misspellings of unset keys raise."""
    given = dict(given or {})
    known = copy.deepcopy(defaults)
    unknown: dict[str, Any] = {}
    for k, v in given.items():
        if k in defaults:
            known[k] = v
        else:
            unknown[k] = v
    for k in unknown:
        near = closest(k, defaults.keys(), cutoff=0.8)
        if near is not None and near not in given:
            raise ConfigError(
                f"{where}: unknown key '{section}{k}' — did you mean '{section}{near}'? "
                f"(the file does not set '{section}{near}', so its default would be used silently)"
            )
    return known, unknown


@dataclass
class MPTConfig:
    """MPT model hyper-parameters (names and meaning as in MPT's config.json)."""

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    attn_config: dict = field(default_factory=lambda: copy.deepcopy(ATTN_DEFAULTS))
    ffn_config: dict = field(default_factory=lambda: copy.deepcopy(FFN_DEFAULTS))
    init_device: str = "cpu"
    logit_scale: float | str | None = None
    no_bias: bool = True
    embedding_fraction: float = 1.0
    norm_type: str = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    use_cache: bool = False
    init_config: dict = field(default_factory=lambda: copy.deepcopy(INIT_DEFAULTS))
    tie_word_embeddings: bool = True
    # Keys we do not interpret, kept and written back verbatim (top level and inside attn/ffn/init).
    extra: dict = field(default_factory=dict)
    layout: str = "transformers"  # "transformers" (MptForCausalLM) or "mosaicml" (MPTForCausalLM)

    def __post_init__(self) -> None:
        self.attn_config, unk_a = _merge_defaults("attn_config.", self.attn_config, ATTN_DEFAULTS, "config")
        self.ffn_config, unk_f = _merge_defaults("ffn_config.", self.ffn_config, FFN_DEFAULTS, "config")
        self.init_config, unk_i = _merge_defaults("init_config.", self.init_config, INIT_DEFAULTS, "config")
        # Sub-section unknowns are stored in the section dicts themselves so they round-trip.
        self.attn_config.update(unk_a)
        self.ffn_config.update(unk_f)
        self.init_config.update(unk_i)
        self.validate()

    # ------------------------------------------------------------------ read-only once a model is built
    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise ConfigError(f"config.{name}: {READ_ONLY_HINT}")
        object.__setattr__(self, name, value)

    def freeze(self) -> MPTConfig:
        """Make this config read-only (a model does this to the config it is built from); returns self."""
        if not self.frozen:
            for name in ("attn_config", "ffn_config", "init_config", "extra"):
                object.__setattr__(self, name, FrozenSection(getattr(self, name)))
            object.__setattr__(self, "_frozen", True)
        return self

    @property
    def frozen(self) -> bool:
        return bool(self.__dict__.get("_frozen"))

    def __deepcopy__(self, memo: dict) -> MPTConfig:
        c = self.replace()
        return c.freeze() if self.frozen else c  # a deep-copied model keeps a read-only config

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        t = self.attn_config["attn_type"]
        if t == "multihead_attention":
            return self.n_heads
        if t == "multiquery_attention":
            return 1
        kv = self.attn_config.get("kv_n_heads")
        return self.n_heads if kv is None else int(kv)

    @property
    def alibi(self) -> bool:
        return bool(self.attn_config["alibi"])

    @property
    def use_learned_pos_emb(self) -> bool:
        """MPT's rule: with ALiBi on, ``learned_pos_emb`` is ignored (MPT-7B's file sets both)."""
        return bool(self.learned_pos_emb) and not self.alibi

    @property
    def ffn_hidden_size(self) -> int:
        h = self.ffn_config.get("ffn_hidden_size")
        return int(h) if h is not None else int(self.expansion_ratio * self.d_model)

    @property
    def softmax_scale(self) -> float:
        s = self.attn_config.get("softmax_scale")
        return float(s) if s is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def logit_scale_value(self) -> float | None:
        s = self.logit_scale
        if s is None:
            return None
        if isinstance(s, str):
            if s == "inv_sqrt_d_model":
                return 1.0 / math.sqrt(self.d_model)
            raise ConfigError(f"logit_scale: expected a number or 'inv_sqrt_d_model', got '{s}'")
        return float(s)

    @property
    def attn_impl(self) -> str:
        return self.attn_config["attn_impl"]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need_int(name: str, v: Any, lo: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"config: '{name}' must be an integer >= {lo}, got {v!r}")

        def need_prob(name: str, v: Any) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"config: '{name}' must be a probability in [0, 1], got {v!r}")

        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            need_int(name, getattr(self, name))
        if not isinstance(self.expansion_ratio, (int, float)) or self.expansion_ratio <= 0:
            raise ConfigError(f"config: 'expansion_ratio' must be a positive number, got {self.expansion_ratio!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        for name in ("resid_pdrop", "emb_pdrop"):
            need_prob(name, getattr(self, name))
        a = self.attn_config
        need_prob("attn_config.attn_pdrop", a["attn_pdrop"])
        if a["attn_type"] not in ATTN_TYPES:
            raise ConfigError(f"config: attn_config.attn_type '{a['attn_type']}' is not one of {ATTN_TYPES}")
        if a["attn_impl"] not in (impls := attn_impls()):
            raise ConfigError(f"config: attn_config.attn_impl '{a['attn_impl']}' is not one of {impls}")
        if a["attn_type"] == "grouped_query_attention":
            kv = a.get("kv_n_heads")
            if kv is None:
                raise ConfigError("config: attn_config.kv_n_heads is required for grouped_query_attention")
            need_int("attn_config.kv_n_heads", kv)
            if self.n_heads % kv:
                raise ConfigError(
                    f"config: attn_config.kv_n_heads ({kv}) must divide n_heads ({self.n_heads})"
                )
        if a.get("prefix_lm"):
            raise ConfigError("config: attn_config.prefix_lm is not supported by mptkit (MPT-7B sets it false)")
        for k in ("rope", "qk_gn"):
            if a.get(k):
                raise ConfigError(f"config: attn_config.{k}=true is not supported by mptkit (use alibi)")
        sw = a.get("sliding_window_size", -1)
        if sw not in (-1, None):
            raise ConfigError("config: attn_config.sliding_window_size is not supported by mptkit")
        if a["clip_qkv"] is not None and (not isinstance(a["clip_qkv"], (int, float)) or a["clip_qkv"] <= 0):
            raise ConfigError(f"config: attn_config.clip_qkv must be null or a positive number, got {a['clip_qkv']!r}")
        if a["softmax_scale"] is not None and not isinstance(a["softmax_scale"], (int, float)):
            raise ConfigError("config: attn_config.softmax_scale must be null or a number")
        if not isinstance(a["alibi_bias_max"], (int, float)) or a["alibi_bias_max"] <= 0:
            raise ConfigError(f"config: attn_config.alibi_bias_max must be positive, got {a['alibi_bias_max']!r}")
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"config: norm_type '{self.norm_type}' is not one of {NORM_TYPES}")
        if self.ffn_config["ffn_type"] not in FFN_TYPES:
            raise ConfigError(
                f"config: ffn_config.ffn_type '{self.ffn_config['ffn_type']}' is not one of {FFN_TYPES}"
            )
        if self.init_config["name"] not in INIT_NAMES:
            raise ConfigError(f"config: init_config.name '{self.init_config['name']}' is not one of {INIT_NAMES}")
        if not 0.0 < float(self.embedding_fraction) <= 1.0:
            raise ConfigError(f"config: embedding_fraction must be in (0, 1], got {self.embedding_fraction!r}")
        self.logit_scale_value  # noqa: B018  (validates)
        if self.layout not in ("transformers", "mosaicml"):
            raise ConfigError(f"config: layout must be 'transformers' or 'mosaicml', got {self.layout!r}")
        if self.learned_pos_emb and self.alibi:
            log.debug("alibi is on: learned_pos_emb is ignored (MPT behaviour)")

    # ------------------------------------------------------------------ dict / file I/O
    _FIELDS = (
        "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "resid_pdrop", "emb_pdrop",
        "learned_pos_emb", "attn_config", "ffn_config", "init_device", "logit_scale", "no_bias", "embedding_fraction",
        "norm_type", "layer_norm_epsilon", "use_cache", "init_config", "tie_word_embeddings",
    )

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config", strict: bool = False) -> MPTConfig:
        """Build from a config.json-style dict.

        ``strict=True`` (recipes, CLI overrides) rejects every unknown key with the closest valid one;
        otherwise unknown keys are kept in ``extra`` unless they look like a misspelled known key.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of MPT config keys, got {type(d).__name__}")
        d = copy.deepcopy(d)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k in cls._FIELDS or k == "layout":
                kwargs[k] = v
            elif k in PASSTHROUGH_KEYS:
                extra[k] = v
            else:
                near = closest(k, cls._FIELDS, cutoff=0.8 if not strict else 0.6)
                if strict:
                    hint = f" — did you mean '{near}'?" if near else ""
                    raise ConfigError(f"{where}: unknown model key '{k}'{hint}")
                if near is not None and near not in d:
                    raise ConfigError(
                        f"{where}: unknown key '{k}' — did you mean '{near}'? "
                        f"(the file does not set '{near}', so its default would be used silently)"
                    )
                extra[k] = v
        # Layout: MosaicML's files name MPTForCausalLM; transformers' name MptForCausalLM.
        arch = d.get("architectures") or []
        if "layout" not in kwargs:
            kwargs["layout"] = "mosaicml" if ("MPTForCausalLM" in arch or "auto_map" in d) else "transformers"
        # transformers' MptAttentionConfig defaults alibi to true; its files always write it, but be safe.
        if (kwargs["layout"] == "transformers" and "attn_config" in kwargs
                and "alibi" not in (kwargs["attn_config"] or {}) and "MptForCausalLM" in arch):
            kwargs["attn_config"] = {**kwargs["attn_config"], "alibi": True}
        for sub in ("attn_config", "ffn_config", "init_config"):
            if sub in kwargs and kwargs[sub] is not None and not isinstance(kwargs[sub], dict):
                raise ConfigError(f"{where}: '{sub}' must be a mapping, got {type(kwargs[sub]).__name__}")
            if sub in kwargs and kwargs[sub] is None:
                kwargs.pop(sub)
        if strict:
            for sub, defaults in (("attn_config", ATTN_DEFAULTS), ("ffn_config", FFN_DEFAULTS), ("init_config", INIT_DEFAULTS)):
                for k in kwargs.get(sub, {}) or {}:
                    if k not in defaults:
                        near = closest(k, defaults.keys())
                        hint = f" — did you mean '{sub}.{near}'?" if near else ""
                        raise ConfigError(f"{where}: unknown model key '{sub}.{k}'{hint}")
        try:
            cfg = cls(**kwargs, extra=extra)
        except ConfigError as e:
            msg = str(e)
            if msg.startswith("config:"):
                msg = where + msg[len("config"):]
            raise ConfigError(msg) from None
        except TypeError as e:  # wrong value types that dataclass math trips over
            raise ConfigError(f"{where}: {e}") from None
        return cfg

    def to_dict(self, layout: str | None = None) -> dict:
        """The config.json dict. ``layout`` defaults to the one this config was read in."""
        layout = layout or self.layout
        out: dict[str, Any] = {}
        extra = copy.deepcopy(self.extra)
        if layout == "mosaicml":
            out["architectures"] = ["MPTForCausalLM"]
            out["auto_map"] = extra.pop("auto_map", dict(MOSAIC_AUTO_MAP))
        else:
            out["architectures"] = ["MptForCausalLM"]
            extra.pop("auto_map", None)
        extra.pop("architectures", None)
        out["model_type"] = "mpt"
        extra.pop("model_type", None)
        for k in self._FIELDS:
            out[k] = copy.deepcopy(getattr(self, k))
        if layout == "transformers":
            # transformers' strict MptAttentionConfig types attn_pdrop and alibi_bias_max as int.
            ac = out["attn_config"]
            for k in ("attn_pdrop", "alibi_bias_max"):
                if isinstance(ac.get(k), float) and float(ac[k]).is_integer():
                    ac[k] = int(ac[k])
        out.update(extra)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MPTConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a model folder needs a config.json)") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        mt = d.get("model_type") if isinstance(d, dict) else None
        if mt not in (None, "mpt"):
            raise ConfigError(f"{path}: model_type is '{mt}', expected 'mpt' (mptkit loads MPT models only)")
        return cls.from_dict(d, where=str(path))

    def save(self, folder: str | os.PathLike, layout: str | None = None) -> Path:
        from mptkit.utils.fs import atomic_write_json

        p = Path(folder) / "config.json"
        atomic_write_json(p, self.to_dict(layout))
        return p

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MPTConfig:
        """A model recipe (configs/model/*.yaml): MPT config keys, strictly checked."""
        import yaml

        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such model recipe") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        return cls.from_dict(d or {}, where=str(path), strict=True)

    def replace(self, **changes: Any) -> MPTConfig:
        """A new (changeable) config with ``changes``; ``attn_config``/``ffn_config``/``init_config`` mappings
        are merged into the current sections. The new config is validated."""
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("attn_config", "ffn_config", "init_config") and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return MPTConfig.from_dict(d, where="config", strict=False)


def recipes_dir() -> Path:
    """The folder of bundled model recipes: package data, ``mptkit/recipes/model/*.yaml`` (in a checkout
    ``configs/model`` is a link to it)."""
    from mptkit.recipes import model_recipes_dir

    return model_recipes_dir()


def load_model_config(spec: str | os.PathLike | dict | MPTConfig) -> MPTConfig:
    """An MPTConfig from: an MPTConfig, a dict of keys, a recipe name (``mpt-7b``), a YAML file,
    a config.json, or a model folder holding config.json."""
    if isinstance(spec, MPTConfig):
        return spec
    if isinstance(spec, dict):
        return MPTConfig.from_dict(spec, strict=True)
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        return MPTConfig.from_json_file(p / "config.json")
    if p.suffix == ".json" and p.exists():
        return MPTConfig.from_json_file(p)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return MPTConfig.from_yaml(p)
    r = recipes_dir() / f"{s}.yaml"
    if r.exists():
        return MPTConfig.from_yaml(r)
    names = sorted(x.stem for x in recipes_dir().glob("*.yaml"))
    near = closest(s, names)
    hint = f" Did you mean '{near}'?" if near else ""
    raise ConfigError(
        f"model '{s}': not a model folder, config.json, YAML recipe or bundled recipe name "
        f"(bundled: {', '.join(names)}).{hint}"
    )


def fields_of(cfg: MPTConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def transformers_incompatibilities(cfg: MPTConfig) -> list[str]:
    """What transformers' native MptForCausalLM cannot express (it hard-codes these); empty if none.

    transformers' MPT always uses ALiBi with bias max 8, a 4x MLP with GELU, LayerNorm without bias, MHA,
    no qk_ln, no logit_scale and no learned positions; and it refuses sequences past max_seq_len.
    """
    out = []
    a = cfg.attn_config
    if not cfg.alibi:
        out.append("attn_config.alibi=false (transformers' MPT always applies ALiBi)")
    if float(a["alibi_bias_max"]) != 8:
        out.append(f"attn_config.alibi_bias_max={a['alibi_bias_max']} (transformers uses 8)")
    if cfg.kv_n_heads != cfg.n_heads:
        out.append(f"{a['attn_type']} with {cfg.kv_n_heads} kv heads (transformers' MPT is multi-head only)")
    if a["qk_ln"]:
        out.append("attn_config.qk_ln=true")
    if cfg.ffn_hidden_size != 4 * cfg.d_model or cfg.ffn_config["ffn_type"] != "mptmlp":
        out.append("an FFN other than mptmlp with 4*d_model hidden units")
    if not cfg.no_bias:
        out.append("no_bias=false (biases)")
    if cfg.norm_type not in ("layernorm", "low_precision_layernorm"):
        out.append(f"norm_type={cfg.norm_type}")
    if cfg.logit_scale is not None:
        out.append("logit_scale")
    if cfg.use_learned_pos_emb:
        out.append("learned_pos_emb without alibi")
    return out
