"""``fsdp_config`` (llm-foundry / composer key names) read and checked, without torch.distributed: the recipe
validator (:mod:`mptkit.train.config`) uses it before any process group exists, the runtime
(:mod:`mptkit.train.fsdp`) applies the :class:`FSDPSettings` it returns.

* :func:`parse_fsdp_config` validates the mapping into :class:`FSDPSettings` (unknown keys name the closest
  valid one; keys FSDP2 has no use for are accepted at their defaults only).
* :func:`notes`: one line per accepted key that FSDP2 implements differently from FSDP1.
* :func:`compute_dtypes`: the parameter and reduction dtypes that ``mixed_precision`` and the run's
  ``precision`` give on a device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mptkit.errors import ConfigError
from mptkit.utils.dtypes import ALIASES, PRECISIONS, any_torch_dtype

log = logging.getLogger(__name__)

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
MIXED_PRECISIONS = ("DEFAULT", "PURE", "FULL")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NONE")
STATE_DICT_TYPES = ("full", "sharded")
_DTYPES = {n: any_torch_dtype(n) for n in (*ALIASES, *PRECISIONS)}  # mptkit.utils.dtypes' names, amp_* too

# implemented keys (see docs/training.md) and composer keys accepted at their defaults only
FSDP_KEYS = {
    "sharding_strategy",
    "mixed_precision",
    "activation_checkpointing",
    "activation_checkpointing_reentrant",
    "activation_cpu_offload",
    "cpu_offload",
    "limit_all_gathers",
    "forward_prefetch",
    "forward_prefetch_limit",
    "backward_prefetch",
    "backward_prefetch_limit",
    "sync_module_states",
    "state_dict_type",
    "verbose",
    "use_orig_params",
    "auto_wrap",
    "reshard_after_forward",
    "data_parallel_shard_degree",
    "data_parallel_replicate_degree",
    "load_monolith_rank0_only",
    "sharded_ckpt_prefix_dir",
    "keep_low_precision_grads",
    "ignored_modules",
    "process_group",
    "device_mesh",
    "load_planner",
    "save_planner",
    "te_checkpoint_wrapper",
    "te_shard_fp8_weight",
}
# accepted only when null / false (they take Python objects or Transformer Engine in composer)
_MUST_BE_UNSET = {
    "ignored_modules": "mptkit shards every parameter",
    "process_group": "the process group is torchrun's (world) group",
    "load_planner": "DCP's default planner is used",
    "save_planner": "DCP's default planner is used",
    "te_checkpoint_wrapper": "Transformer Engine is not used by mptkit",
    "te_shard_fp8_weight": "Transformer Engine is not used by mptkit",
    "keep_low_precision_grads": "gradients are reduced in mixed_precision's reduce dtype and kept in fp32",
}


@dataclass(frozen=True)
class FSDPSettings:
    sharding_strategy: str = "FULL_SHARD"
    mixed_precision: Any = "DEFAULT"  # DEFAULT | PURE | FULL | {param_dtype, reduce_dtype, buffer_dtype}
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    cpu_offload: bool = False
    forward_prefetch: bool = False
    forward_prefetch_limit: int = 1
    backward_prefetch: str = "BACKWARD_POST"
    backward_prefetch_limit: int = 1
    sync_module_states: bool = False
    state_dict_type: str = "full"
    verbose: bool = False
    auto_wrap: bool = True
    reshard_after_forward: bool | None = None  # None: from sharding_strategy
    data_parallel_shard_degree: int = -1
    data_parallel_replicate_degree: int | None = None

    @property
    def sharded_checkpoints(self) -> bool:
        return self.state_dict_type == "sharded"

    @property
    def hybrid(self) -> bool:
        return self.sharding_strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")

    @property
    def reshard(self) -> bool:
        if self.reshard_after_forward is not None:
            return self.reshard_after_forward
        return self.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"fsdp_config.{key}: expected true or false, got {v!r}")
    return v


def _choice(d: dict, key: str, default: str, options: tuple[str, ...], *, upper: bool = True) -> str:
    from mptkit.utils.keys import closest

    v = d.get(key, default)
    s = str(v).upper() if upper and isinstance(v, str) else v
    if s not in options:
        near = closest(str(v), options)
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ConfigError(f"fsdp_config.{key}: '{v}' is not one of {', '.join(options)}{hint}")
    return s


def _int(d: dict, key: str, default: int | None, lo: int) -> int | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (v < lo and v != -1):
        raise ConfigError(f"fsdp_config.{key}: expected an integer >= {lo} (or -1 = all ranks), got {v!r}")
    return v


def _dtype(key: str, v: Any) -> torch.dtype:
    if isinstance(v, str) and v.lower() in _DTYPES:
        return _DTYPES[v.lower()]
    raise ConfigError(f"fsdp_config.mixed_precision.{key}: '{v}' is not one of fp32, bf16, fp16")


def parse_fsdp_config(d: dict | None) -> FSDPSettings | None:
    """Validate ``fsdp_config`` (llm-foundry / composer key names) into :class:`FSDPSettings`.

    Raises :class:`ConfigError` naming the key (and the closest valid key or value) for anything it
    cannot honour; keys that are meaningless under FSDP2 are accepted and explained in a log line."""
    if d is None:
        return None
    from mptkit.train.config import _check_keys

    if d == {}:
        return FSDPSettings()
    _check_keys(d, FSDP_KEYS, "fsdp_config")
    for k, why in _MUST_BE_UNSET.items():
        if d.get(k) not in (None, False):
            raise ConfigError(f"fsdp_config.{k}: not supported ({why}); remove it or set it to null")
    mp = d.get("mixed_precision", "DEFAULT")
    if isinstance(mp, dict):
        _check_keys(mp, {"param_dtype", "reduce_dtype", "buffer_dtype"}, "fsdp_config.mixed_precision")
        for k, v in mp.items():
            _dtype(k, v)
    else:
        mp = _choice(d, "mixed_precision", "DEFAULT", MIXED_PRECISIONS)
    state_dict_type = d.get("state_dict_type", "full")
    if state_dict_type == "local":
        raise ConfigError(
            "fsdp_config.state_dict_type: 'local' (FSDP1 flat-parameter shards) is not supported; "
            "use 'sharded' (torch.distributed.checkpoint) or 'full'"
        )
    state_dict_type = _choice(d, "state_dict_type", "full", STATE_DICT_TYPES, upper=False)
    strategy = _choice(d, "sharding_strategy", "FULL_SHARD", SHARDING_STRATEGIES)
    shard_degree = _int(d, "data_parallel_shard_degree", -1, 1)
    replicate_degree = _int(d, "data_parallel_replicate_degree", None, 1)
    if d.get("device_mesh") is not None:
        strategy, shard_degree, replicate_degree = _device_mesh(d["device_mesh"], strategy, shard_degree,
                                                                replicate_degree)
    s = FSDPSettings(
        sharding_strategy=strategy,
        mixed_precision=mp,
        activation_checkpointing=_bool(d, "activation_checkpointing", False),
        activation_cpu_offload=_bool(d, "activation_cpu_offload", False),
        cpu_offload=_bool(d, "cpu_offload", False),
        forward_prefetch=_bool(d, "forward_prefetch", False),
        forward_prefetch_limit=_int(d, "forward_prefetch_limit", 1, 1),
        backward_prefetch=_choice(d, "backward_prefetch", "BACKWARD_POST", BACKWARD_PREFETCH),
        backward_prefetch_limit=_int(d, "backward_prefetch_limit", 1, 1),
        sync_module_states=_bool(d, "sync_module_states", False),
        state_dict_type=state_dict_type,
        verbose=_bool(d, "verbose", False),
        auto_wrap=_bool(d, "auto_wrap", True),
        reshard_after_forward=(
            None if d.get("reshard_after_forward") is None else _bool(d, "reshard_after_forward", True)
        ),
        data_parallel_shard_degree=shard_degree,
        data_parallel_replicate_degree=replicate_degree,
    )
    for k in (
        "limit_all_gathers",
        "use_orig_params",
        "activation_checkpointing_reentrant",
        "load_monolith_rank0_only",
    ):
        if k in d:
            _bool(d, k, True)
    if s.data_parallel_replicate_degree not in (None, -1, 1) and not s.hybrid:
        raise ConfigError(
            "fsdp_config.data_parallel_replicate_degree > 1 needs sharding_strategy: HYBRID_SHARD"
        )
    if d.get("sharded_ckpt_prefix_dir") not in (None, "ep{epoch}-ba{batch}"):
        raise ConfigError(
            "fsdp_config.sharded_ckpt_prefix_dir: mptkit names every checkpoint ep{E}-ba{B}; remove the key"
        )
    return s


_TO_HYBRID = {"FULL_SHARD": "HYBRID_SHARD", "SHARD_GRAD_OP": "_HYBRID_SHARD_ZERO2"}


def _device_mesh(mesh: Any, strategy: str, shard: int, replicate: int | None) -> tuple[str, int, int | None]:
    """composer's (FSDP1) ``device_mesh``: ``[shard]``, or ``[replicate, shard]`` (HSDP: replicate across groups,
    shard within each), mapped onto the strategy and the data_parallel degrees FSDP2's mesh is built from."""
    if (not isinstance(mesh, (list, tuple)) or len(mesh) not in (1, 2)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in mesh)):
        raise ConfigError(f"fsdp_config.device_mesh: expected [shard] or [replicate, shard] (positive integers, "
                          f"their product the number of ranks), got {mesh!r}")
    rep, sh = (1, mesh[0]) if len(mesh) == 1 else (mesh[0], mesh[1])
    if shard not in (-1, sh) or replicate not in (None, -1, rep if rep > 1 else replicate):
        raise ConfigError(f"fsdp_config.device_mesh {list(mesh)} disagrees with data_parallel_shard_degree / "
                          "data_parallel_replicate_degree; give one of them")
    if rep == 1:
        if strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
            raise ConfigError(f"fsdp_config.device_mesh {list(mesh)}: HYBRID_SHARD needs [replicate, shard] with "
                              "replicate > 1")
        return strategy, sh, replicate
    if strategy == "NO_SHARD":
        raise ConfigError(f"fsdp_config.device_mesh {list(mesh)}: a 2-D mesh shards; NO_SHARD does not")
    return _TO_HYBRID.get(strategy, strategy), sh, rep


def notes(d: dict, s: FSDPSettings) -> list[str]:
    """One line per accepted key that FSDP2 implements differently from FSDP1 (logged once by rank 0)."""
    out = []
    if d.get("device_mesh") is not None:
        out.append(f"device_mesh {list(d['device_mesh'])}: {s.sharding_strategy}, shard over "
                   f"{s.data_parallel_shard_degree} ranks"
                   + (f", replicate over {s.data_parallel_replicate_degree}" if s.hybrid else "")
                   + " (composer's [replicate, shard] order)")
    if "limit_all_gathers" in d:
        out.append("limit_all_gathers: FSDP2 bounds in-flight all-gathers itself (no rate limiter to set)")
    if d.get("use_orig_params") is False:
        out.append("use_orig_params: FSDP2 always keeps the original parameters (as DTensor shards)")
    if d.get("activation_checkpointing_reentrant"):
        out.append("activation_checkpointing_reentrant: mptkit always uses non-reentrant checkpointing")
    if "backward_prefetch" not in d:
        pass
    elif s.backward_prefetch == "NONE":
        out.append("backward_prefetch NONE: FSDP2 always prefetches the next block in backward")
    elif s.backward_prefetch == "BACKWARD_POST":
        out.append(
            "backward_prefetch BACKWARD_POST: FSDP2 prefetches from the current block's pre-backward "
            "(FSDP1's BACKWARD_PRE)"
        )
    if isinstance(s.mixed_precision, dict) and "buffer_dtype" in s.mixed_precision:
        out.append(
            "mixed_precision.buffer_dtype: FSDP2 does not manage buffers (MPT's only buffer, the ALiBi "
            "slopes, stays fp32)"
        )
    return out


def compute_dtypes(s: FSDPSettings, precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype, reduce_dtype) of the forward/backward compute and the gradient reduction.

    llm-foundry's names: FULL = fp32/fp32; DEFAULT = the run's low precision (``precision: amp_bf16`` → bf16)
    for parameters, fp32 reductions; PURE = low precision for both. Master weights and optimizer state stay
    fp32. On CPU everything stays fp32 (a warning says so when something else was asked for). fp16 anywhere
    is a :class:`ConfigError`: without loss scaling fp16 gradients underflow, and FSDP2 has no sharded scaler
    here."""
    low = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision, torch.float32)
    mp = s.mixed_precision
    if isinstance(mp, dict):
        pd = _dtype("param_dtype", mp.get("param_dtype", "fp32"))
        rd = _dtype("reduce_dtype", mp.get("reduce_dtype", "fp32"))
    elif mp == "FULL":
        pd = rd = torch.float32
    elif mp == "PURE":
        pd = rd = low
    else:
        pd, rd = low, torch.float32
    if torch.float16 in (pd, rd):  # before the CPU fallback: a recipe refused on GPU is refused everywhere
        if not isinstance(mp, dict):
            raise ConfigError(
                "precision amp_fp16 with fsdp_config is not supported (fp16 needs a sharded grad "
                "scaler); use precision amp_bf16"
            )
        key = "param_dtype" if pd == torch.float16 else "reduce_dtype"
        raise ConfigError(
            f"fsdp_config.mixed_precision.{key} fp16 is not supported (fp16 needs a sharded grad "
            "scaler); use bf16"
        )
    if device.type != "cuda" and (pd != torch.float32 or rd != torch.float32):
        log.warning(
            "fsdp_config.mixed_precision: %s/%s parameters/reductions apply on CUDA only; on %s "
            "FSDP computes and reduces in fp32",
            pd,
            rd,
            device.type,
        )
        return torch.float32, torch.float32
    if device.type == "cuda" and torch.bfloat16 in (pd, rd) and not torch.cuda.is_bf16_supported():
        raise ConfigError("fsdp_config.mixed_precision: this GPU does not support bfloat16")
    return pd, rd
