"""LoRA adapters (low-rank updates of frozen Linears), with peft's semantics and names.

``LoraSettings`` holds a recipe's ``model.peft_config`` (llm-foundry's / peft's keys: ``peft_type: LORA``, ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``modules_to_save``). :func:`apply_lora`
wraps every matching ``nn.Linear`` of a model in a :class:`LoRALinear` (names matched as peft matches them: a
list entry matches a module whose name is it or ends with ``.`` + it; a single string is a regular expression
the whole name must match), freezes everything else, and leaves the adapters (and ``modules_to_save``)
trainable in fp32.

``LoRALinear(x) = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``); ``lora_A`` is initialised as peft does (Kaiming-uniform,
a = sqrt(5)) and ``lora_B`` to zeros, so a fresh adapter leaves the model's output exactly unchanged.

A ``LoRALinear`` is a module the fast paths do not know (``model/fastpath.py``): the fast decoder, the compiled
kernels and the CPU training MLP see it is not a plain ``nn.Linear`` and run the model's own forward, so an
adapter is never silently dropped. It has no ``weight`` attribute on purpose: code that reads a Linear's weight
directly fails loudly instead of computing without the adapter.

:func:`adapter_state_dict` gives peft's key names (``base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight``
— mptkit's module names are transformers' ``MptForCausalLM`` names), the file format is ``mptkit.io.adapter``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.errors import ConfigError

DEFAULT_TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # peft's prefix of a causal LM's keys in adapter_model.safetensors
_BASE_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# peft config keys accepted and checked against the only value mptkit computes (anything else is refused)
_PEFT_FIXED = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "layers_to_transform": None,
               "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
               "use_qalora": False, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "exclude_modules": None}
# peft config keys that do not change the computation (accepted, ignored)
_PEFT_IGNORED = {"task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
                 "peft_version", "megatron_config", "megatron_core", "loftq_config", "qalora_group_size",
                 "runtime_config", "eva_config", "corda_config", "alora_invocation_tokens", "arrow_config",
                 "ensure_weight_tying", "init_lora_weights"}  # init_lora_weights: how peft initialised it


@dataclass(frozen=True)
class LoraSettings:
    """``model.peft_config``: LoRA's hyperparameters (peft's names and defaults where mptkit has them)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    base_dtype: str | None = None  # mptkit's: the frozen base Linears held in fp32 / bf16 / fp16 (None: as loaded)
    peft_type: str = "LORA"
    extra: dict = field(default_factory=dict, compare=False)  # peft keys kept for adapter_config.json

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model.peft_config", *, peft_file: bool = False) -> LoraSettings:
        """From a recipe's ``model.peft_config`` or (``peft_file``) a peft ``adapter_config.json``; every key
        checked. In a peft file, keys of newer peft versions that are unset (null, false, empty) are ignored;
        one that is set is refused, naming it."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping (peft_type: LORA, r, lora_alpha, ...), got {d!r}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {}
        for k in list(d):
            if k in _PEFT_FIXED:
                v = d.pop(k)
                ok = v == _PEFT_FIXED[k] or (v in (None, {}, [], False) and _PEFT_FIXED[k] in (None, {}, False))
                if not ok:
                    raise ConfigError(f"{where}.{k}: {v!r} is not supported by mptkit's LoRA (only "
                                      f"{_PEFT_FIXED[k]!r}); remove it or set it to {_PEFT_FIXED[k]!r}")
            elif k in _PEFT_IGNORED:
                extra[k] = d.pop(k)
            elif k not in known and peft_file and d[k] in (None, False, {}, [], ""):
                d.pop(k)
            elif k not in known and peft_file:
                raise ConfigError(f"{where}.{k}: {d[k]!r}: an option of peft's LoRA that mptkit does not compute")
            elif k not in known:
                from mptkit.utils.keys import did_you_mean

                raise ConfigError(f"{where}: unknown key '{k}'" + did_you_mean(k, sorted(known | set(_PEFT_FIXED))))
        pt = str(d.get("peft_type", "LORA")).upper()
        if pt != "LORA":
            raise ConfigError(f"{where}.peft_type: '{d['peft_type']}' is not supported; mptkit trains LORA adapters")
        d["peft_type"] = pt
        r = d.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"{where}.r: the rank must be a whole number >= 1, got {r!r}")
        a = d.get("lora_alpha", 16)
        if not isinstance(a, (int, float)) or isinstance(a, bool) or a <= 0:
            raise ConfigError(f"{where}.lora_alpha: expected a number > 0, got {a!r}")
        p = d.get("lora_dropout", 0.05)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
            raise ConfigError(f"{where}.lora_dropout: expected a probability in [0, 1), got {p!r}")
        tm = d.get("target_modules", DEFAULT_TARGETS)
        if tm is None:
            tm = DEFAULT_TARGETS
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ConfigError(f"{where}.target_modules: '{tm}' is not a regular expression ({e})") from None
        elif isinstance(tm, (list, tuple, set)) and tm and all(isinstance(t, str) and t for t in tm):
            tm = tuple(sorted(tm)) if isinstance(tm, set) else tuple(tm)
        else:
            raise ConfigError(f"{where}.target_modules: expected a list of module names (e.g. {list(DEFAULT_TARGETS)}) "
                              f"or one regular expression, got {tm!r}")
        d["target_modules"] = tm
        ms = d.get("modules_to_save")
        if ms is not None:
            if isinstance(ms, str):
                ms = [ms]
            if not isinstance(ms, (list, tuple)) or not all(isinstance(t, str) and t for t in ms):
                raise ConfigError(f"{where}.modules_to_save: expected a list of module names, got {ms!r}")
            d["modules_to_save"] = tuple(ms) or None
        bd = d.get("base_dtype")
        if bd not in _BASE_DTYPES:
            raise ConfigError(f"{where}.base_dtype: expected one of fp32, bf16, fp16 (or null), got {bd!r}")
        if not isinstance(d.get("use_rslora", False), bool):
            raise ConfigError(f"{where}.use_rslora: expected true or false, got {d['use_rslora']!r}")
        return cls(**d, extra=extra)

    def to_peft_config(self, base_name: str | None = None) -> dict:
        """The ``adapter_config.json`` peft writes for this adapter (``PeftModel.from_pretrained`` reads it)."""
        tm = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": tm, "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "inference_mode": True, "revision": None,
        }


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a trainable low-rank update (``lora_A``, ``lora_B``)."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if type(base) is not nn.Linear:
            raise ConfigError(f"LoRA wraps nn.Linear layers, not {type(base).__name__}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        dev = base.weight.device
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        if dev.type != "meta":
            self.reset_lora()

    def reset_lora(self) -> None:
        """peft's default initialisation: A Kaiming-uniform (a = sqrt(5)), B zero (the update starts at 0)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the base weight: scaling * B @ A (out, in), fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        if x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type):
            y = self.base_layer(x)
        else:  # a base held in bf16/fp16 (``base_dtype``) under fp32 activations
            b = self.base_layer.bias
            y = F.linear(x.to(w.dtype), w, b).to(x.dtype)
        a = self.lora_dropout(x)
        if a.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            a = a.to(self.lora_A.weight.dtype)
        u = self.lora_B(self.lora_A(a)) * self.scaling
        return y + u.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------------- matching and applying


def matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """peft's rule: a string is a regular expression the whole module name must match; a list entry matches a
    module called exactly that or whose name ends with ``.`` + it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last components of the model's Linear module names (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} or {"(none)"})


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: nn.Module, settings: LoraSettings, *, where: str = "model.peft_config") -> list[str]:
    """Wrap ``model``'s matching Linears in :class:`LoRALinear` (in place), freeze every other parameter (the
    ``modules_to_save`` stay trainable), record ``model.peft_config = settings``; returns the wrapped names.
    ``target_modules`` that match no Linear is a :class:`ConfigError` naming the Linears there are."""
    if has_lora(model):
        raise ConfigError(f"{where}: the model already has LoRA adapters")
    targets = [n for n, m in model.named_modules() if n and type(m) is nn.Linear and matches(n, settings.target_modules)]
    if not targets:
        raise ConfigError(f"{where}.target_modules: {settings.target_modules!r} matches no Linear of the model; "
                          f"its Linear layers are named {_linear_names(model)} (e.g. "
                          f"{next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), '-')})")
    bad = [n for n, m in model.named_modules() if n and matches(n, settings.target_modules)
           and not isinstance(m, nn.Linear) and not any(n.startswith(t + ".") for t in targets)]
    if bad and not isinstance(settings.target_modules, str):
        raise ConfigError(f"{where}.target_modules: {bad[0]} is a {type(model.get_submodule(bad[0])).__name__}, "
                          "not a Linear layer; LoRA wraps Linears only")
    save = []
    for t in settings.modules_to_save or ():
        found = [n for n, _ in model.named_modules() if n and (n == t or n.endswith("." + t))]
        if not found:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
            raise ConfigError(f"{where}.modules_to_save: '{t}' names no module of the model; its modules are named "
                              f"{names}")
        save += found
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and any(
            n.endswith(("wte", "lm_head")) for n in save):
        raise ConfigError(f"{where}.modules_to_save: the embedding is tied to the LM head in this model; training "
                          "a copy of it is not supported (leave wte / lm_head out)")
    for p in model.parameters():
        p.requires_grad_(False)
    bdt = _BASE_DTYPES[settings.base_dtype]
    for n in targets:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if bdt is not None:
            base.to(bdt)
        lora = LoRALinear(base, settings.r, settings.lora_alpha, settings.lora_dropout, settings.use_rslora)
        setattr(parent, child, lora.train(base.training))  # a model in eval mode: its adapters' dropout off too
    for n in save:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    model.peft_config = settings
    model._lora_modules_to_save = tuple(save)
    return targets


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names: ``base_model.model.{module}.lora_A.weight`` / ``lora_B.weight``
    and, for ``modules_to_save``, ``base_model.model.{module}.{param}`` (as peft's save strips its wrapper)."""
    out = {}
    for n, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight
    for n in getattr(model, "_lora_modules_to_save", ()):
        for pn, p in model.get_submodule(n).named_parameters():
            out[f"{PEFT_PREFIX}{n}.{pn}"] = p
    return out


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], *, where: str = "the adapter",
                            convert=None) -> None:
    """Copy ``sd`` (peft's names, or the same without the ``base_model.model.`` prefix) into ``model``'s adapters;
    missing, unexpected and mis-shaped tensors are a :class:`ConfigError` naming them. ``convert(full, param)``:
    the value to copy into ``param`` (an FSDP-sharded model's: this rank's shard of ``full``)."""
    want = adapter_state_dict(model)
    got = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in sd.items()}
    # peft may save an adapter name inside the key (``lora_A.default.weight``) in older files: accept it
    got = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in got.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[0]}")
        raise ConfigError(f"{where} does not fit the model: {'; '.join(parts)} (its target_modules / "
                          "modules_to_save must name the same layers of the same architecture)")
    for k, t in want.items():
        v = got[k]
        if tuple(v.shape) != tuple(t.shape):
            raise ConfigError(f"{where}: {k} has shape {tuple(v.shape)}, the model needs {tuple(t.shape)}: the adapter "
                              "was made for a base model of other dimensions (d_model, n_heads, ffn size)")
    with torch.no_grad():
        for k, t in want.items():
            v = got[k].to(t.dtype)
            t.copy_(convert(v, t) if convert is not None else v)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B @ A, computed in fp32) and put the plain Linear
    back, in place: the result is an ordinary model the fast paths cover. Returns ``model``."""
    for n, m in lora_layers(model).items():
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = m.base_layer
        with torch.no_grad():
            w = base.weight.float() + m.delta_weight().to(base.weight.device)
            base.weight.copy_(w.to(base.weight.dtype))
        setattr(parent, child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    for a in ("peft_config", "_lora_modules_to_save"):
        model.__dict__.pop(a, None)
    return model


def base_named_tensors(model: nn.Module):
    """(name, tensor) of the base model's parameters, under the base's own names (``.base_layer`` removed),
    adapters left out."""
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            continue
        yield n.replace(".base_layer.", "."), p


def base_fingerprint(model: nn.Module, samples: int = 256) -> str:
    """A fingerprint of the base weights an adapter was made on: every tensor's name, shape, and ``samples``
    evenly spaced values (fp32); cheap on a 7B (reads ~2M values), and different for any other base (another
    finetune changes almost every value). The values are rounded to bf16 first, so the same base loaded in fp32
    or bf16 gives the same fingerprint (taken before a ``base_dtype`` cast)."""
    h = hashlib.sha256()
    for n, p in sorted(base_named_tensors(model), key=lambda kv: kv[0]):
        if p.is_meta:
            raise ConfigError("LoRA: the base model's weights are not loaded (meta device): start from a model folder")
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        vals = flat[::step][:samples].to(torch.bfloat16).float().cpu().contiguous()
        h.update(f"{n}:{tuple(p.shape)}:".encode())
        h.update(vals.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


__all__ = [
    "DEFAULT_TARGETS", "PEFT_PREFIX", "LoRALinear", "LoraSettings", "adapter_state_dict", "apply_lora",
    "base_fingerprint", "base_named_tensors", "has_lora", "load_adapter_state_dict", "lora_layers", "matches",
    "merge_lora", "param_counts",
]
