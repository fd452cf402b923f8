"""Sharded data parallelism: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) behind llm-foundry's
``fsdp_config``.

With ``fsdp_config`` in a recipe and more than one rank, every ``MPTBlock`` becomes its own FSDP unit and the
model root (embeddings, final norm, the tied LM head) one more; each rank keeps ``1/world`` of every
parameter, gradient and optimizer state as a ``DTensor`` shard and all-gathers a block's weights only while
it runs. FSDP2 runs on CPU with gloo as well as on CUDA with NCCL (verified on CPU/gloo with torch 2.13.0;
FSDP1 is not used).

The pieces, in the order the trainer uses them:

* :func:`parse_fsdp_config` validates the recipe's mapping (llm-foundry / composer key names; unknown keys
  name the closest valid one) into :class:`FSDPSettings`.
* :func:`build_mesh`, :func:`mp_policy` and :func:`shard_model` apply ``fully_shard`` per block, then the root.
* :func:`materialize_sharded` allocates a ``meta``-built model's shards and initialises them *leaf module by
  leaf module*: each rank initialises one full leaf (a Linear, an Embedding, a norm) from the same seed, in
  the same order as the unsharded ``init_weights``, keeps its own shard and frees the rest. The initial
  weights are therefore bitwise those of a single-process or DDP run with the same seed, and no rank ever
  holds more than one full leaf tensor beside its shards.
* :func:`gather_full_state_dict` / :func:`gather_full_optimizer_state` build the full (unsharded) state on
  rank 0, one tensor at a time, in the exact layout a DDP or single-process run writes (so checkpoints are
  interchangeable); :func:`load_full_state_dict` / :func:`shard_optimizer_state` go the other way.
* :func:`dcp_save` / :func:`dcp_load`: ``torch.distributed.checkpoint`` (sharded checkpoints), which also load
  into an unsharded model (another world size, DDP, one process) because DCP reshards on load.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptkit.errors import CheckpointError, ConfigError, TrainError
from mptkit.utils.dtypes import ALIASES, PRECISIONS, any_torch_dtype

log = logging.getLogger(__name__)

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
MIXED_PRECISIONS = ("DEFAULT", "PURE", "FULL")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NONE")
STATE_DICT_TYPES = ("full", "sharded")
_DTYPES = {n: any_torch_dtype(n) for n in (*ALIASES, *PRECISIONS)}  # mptkit.utils.dtypes' names, amp_* too

# implemented keys (see docs/training.md) and composer keys accepted at their defaults only
FSDP_KEYS = {
    "sharding_strategy", "mixed_precision", "activation_checkpointing", "activation_checkpointing_reentrant",
    "activation_cpu_offload", "cpu_offload", "limit_all_gathers", "forward_prefetch", "forward_prefetch_limit",
    "backward_prefetch", "backward_prefetch_limit", "sync_module_states", "state_dict_type", "verbose",
    "use_orig_params", "auto_wrap", "reshard_after_forward", "data_parallel_shard_degree",
    "data_parallel_replicate_degree", "load_monolith_rank0_only", "sharded_ckpt_prefix_dir",
    "keep_low_precision_grads", "ignored_modules", "process_group", "device_mesh", "load_planner", "save_planner",
    "te_checkpoint_wrapper", "te_shard_fp8_weight",
}
# accepted only when null / false (they take Python objects or Transformer Engine in composer)
_MUST_BE_UNSET = {
    "ignored_modules": "mptkit shards every parameter",
    "process_group": "the process group is torchrun's (world) group",
    "device_mesh": "the mesh follows from sharding_strategy and data_parallel_shard_degree",
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
        raise ConfigError("fsdp_config.state_dict_type: 'local' (FSDP1 flat-parameter shards) is not supported; "
                          "use 'sharded' (torch.distributed.checkpoint) or 'full'")
    state_dict_type = _choice(d, "state_dict_type", "full", STATE_DICT_TYPES, upper=False)
    s = FSDPSettings(
        sharding_strategy=_choice(d, "sharding_strategy", "FULL_SHARD", SHARDING_STRATEGIES),
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
        reshard_after_forward=(None if d.get("reshard_after_forward") is None
                               else _bool(d, "reshard_after_forward", True)),
        data_parallel_shard_degree=_int(d, "data_parallel_shard_degree", -1, 1),
        data_parallel_replicate_degree=_int(d, "data_parallel_replicate_degree", None, 1),
    )
    for k in ("limit_all_gathers", "use_orig_params", "activation_checkpointing_reentrant",
              "load_monolith_rank0_only"):
        if k in d:
            _bool(d, k, True)
    if s.data_parallel_replicate_degree not in (None, -1, 1) and not s.hybrid:
        raise ConfigError("fsdp_config.data_parallel_replicate_degree > 1 needs sharding_strategy: HYBRID_SHARD")
    if d.get("sharded_ckpt_prefix_dir") not in (None, "ep{epoch}-ba{batch}"):
        raise ConfigError("fsdp_config.sharded_ckpt_prefix_dir: mptkit names every checkpoint ep{E}-ba{B}; "
                          "remove the key")
    return s


def notes(d: dict, s: FSDPSettings) -> list[str]:
    """One line per accepted key that FSDP2 implements differently from FSDP1 (logged once by rank 0)."""
    out = []
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
        out.append("backward_prefetch BACKWARD_POST: FSDP2 prefetches from the current block's pre-backward "
                   "(FSDP1's BACKWARD_PRE)")
    if isinstance(s.mixed_precision, dict) and "buffer_dtype" in s.mixed_precision:
        out.append("mixed_precision.buffer_dtype: FSDP2 does not manage buffers (MPT's only buffer, the ALiBi "
                   "slopes, stays fp32)")
    return out


# ----------------------------------------------------------------------------------- sharding


def build_mesh(s: FSDPSettings, world: int, device: torch.device):
    """A 1-D mesh over all ranks, or (replicate, shard) for HYBRID_SHARD (shard = ranks per node by
    default, from torchrun's LOCAL_WORLD_SIZE)."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = device.type
    if s.hybrid:
        shard = s.data_parallel_shard_degree
        if shard in (None, -1):
            if s.data_parallel_replicate_degree not in (None, -1):
                shard = world // s.data_parallel_replicate_degree
            else:
                shard = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        if shard < 1 or world % shard:
            raise ConfigError(f"fsdp_config: HYBRID_SHARD shards over {shard} ranks, which does not divide the "
                              f"{world} ranks; set data_parallel_shard_degree to a divisor of {world}")
        rep = world // shard
        if s.data_parallel_replicate_degree not in (None, -1, rep):
            raise ConfigError(f"fsdp_config: data_parallel_replicate_degree ({s.data_parallel_replicate_degree}) x "
                              f"data_parallel_shard_degree ({shard}) must equal the number of ranks ({world})")
        return init_device_mesh(dev, (rep, shard), mesh_dim_names=("replicate", "shard"))
    if s.data_parallel_shard_degree not in (-1, world):
        raise ConfigError(f"fsdp_config.data_parallel_shard_degree ({s.data_parallel_shard_degree}) differs from "
                          f"the number of ranks ({world}): use sharding_strategy HYBRID_SHARD to shard over part "
                          "of the ranks and replicate over the rest")
    return init_device_mesh(dev, (world,), mesh_dim_names=("shard",))


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
            raise ConfigError("precision amp_fp16 with fsdp_config is not supported (fp16 needs a sharded grad "
                              "scaler); use precision amp_bf16")
        key = "param_dtype" if pd == torch.float16 else "reduce_dtype"
        raise ConfigError(f"fsdp_config.mixed_precision.{key} fp16 is not supported (fp16 needs a sharded grad "
                          "scaler); use bf16")
    if device.type != "cuda" and (pd != torch.float32 or rd != torch.float32):
        log.warning("fsdp_config.mixed_precision: %s/%s parameters/reductions apply on CUDA only; on %s "
                    "FSDP computes and reduces in fp32", pd, rd, device.type)
        return torch.float32, torch.float32
    if device.type == "cuda" and torch.bfloat16 in (pd, rd) and not torch.cuda.is_bf16_supported():
        raise ConfigError("fsdp_config.mixed_precision: this GPU does not support bfloat16")
    return pd, rd


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: one FSDP unit each."""
    tr = getattr(model, "transformer", None)
    blocks = getattr(tr, "blocks", None)
    if blocks is None:
        raise ConfigError(f"fsdp_config: mptkit shards MPT models (model.transformer.blocks); "
                          f"{type(model).__name__} has no transformer.blocks")
    return list(blocks)


def shard_model(model: nn.Module, s: FSDPSettings, mesh, *, param_dtype: torch.dtype,
                reduce_dtype: torch.dtype, device: torch.device) -> list[nn.Module]:
    """``fully_shard`` every block (unless ``auto_wrap: false``), then the root; set prefetching.
    Returns the list of FSDP units in forward order (root last)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=None if reduce_dtype == torch.float32 else reduce_dtype)
    if s.cpu_offload and device.type != "cuda":
        log.warning("fsdp_config.cpu_offload: parameters are already in CPU memory on %s; ignored", device.type)
    offload = CPUOffloadPolicy(pin_memory=True) if s.cpu_offload and device.type == "cuda" else OffloadPolicy()
    kw = {"mesh": mesh, "reshard_after_forward": s.reshard, "mp_policy": mp, "offload_policy": offload}
    blocks = fsdp_blocks(model) if s.auto_wrap else []
    for b in blocks:
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    if s.forward_prefetch:
        for i, b in enumerate(blocks):
            nxt = blocks[i + 1:i + 1 + s.forward_prefetch_limit]
            if nxt:
                b.set_modules_to_forward_prefetch(nxt)
    if s.backward_prefetch_limit > 1:
        for i, b in enumerate(blocks):
            prev = blocks[max(0, i - s.backward_prefetch_limit):i][::-1]
            if prev:
                b.set_modules_to_backward_prefetch(prev)
    return [*blocks, model]


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(parameter elements held by this rank, elements of the whole model)."""
    from torch.distributed.tensor import DTensor

    loc = tot = 0
    for p in model.parameters():
        tot += p.numel()
        loc += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return loc, tot


def describe(units: list[nn.Module], mesh, s: FSDPSettings, pd, rd) -> str:
    names = [type(u).__name__.removeprefix("FSDP") for u in units]
    return (f"FSDP2 over mesh {tuple(mesh.shape)} {mesh.mesh_dim_names}: {len(units)} units "
            f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''}), strategy {s.sharding_strategy} "
            f"(reshard_after_forward={s.reshard}), param/reduce dtype {pd}/{rd}, cpu_offload={s.cpu_offload}, "
            f"forward_prefetch={s.forward_prefetch}, state_dict_type={s.state_dict_type}")


# ----------------------------------------------------------------------------------- materialise


@torch.no_grad()
def materialize_sharded(model: nn.Module, device: torch.device, init_module: Callable[[nn.Module], None], *,
                        sync_from_rank0: bool = False) -> None:
    """Allocate the shards of a ``meta``-built, already sharded model and initialise them.

    ``init_module(m)`` initialises one module's *own* parameters (plain full tensors); it is called for every
    module with parameters, in ``model.modules()`` order, so the random stream matches an unsharded init.
    Each rank keeps its shard of every full tensor (``sync_from_rank0``: rank 0's values are scattered
    instead, as FSDP1's ``sync_module_states``).

    The full tensors start as NaN, so a parameter that ``init_module`` does not initialise is a
    :class:`TrainError` naming it rather than silently kept uninitialised memory."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    names = {id(m): n for n, m in model.named_modules()}
    for mod in model.modules():
        own = [(n, p) for n, p in mod._parameters.items() if p is not None]
        if not own:
            continue
        full = {n: _nan_like(p, p.to_local().device if isinstance(p, DTensor) else p.device) for n, p in own}
        saved_params, saved_children = dict(mod._parameters), mod._modules
        try:
            for n, t in full.items():
                mod._parameters[n] = nn.Parameter(t, requires_grad=False)
            mod._modules = {}  # init_module sees this module only, not its children
            init_module(mod)
        finally:
            mod._parameters.update(saved_params)
            mod._modules = saved_children
        for n, t in full.items():
            if t.is_floating_point() and bool(torch.isnan(t).any()):
                where = ".".join(x for x in (names.get(id(mod), ""), n) if x)
                raise TrainError(f"model init left parameter {where} ({type(mod).__name__}.{n}) uninitialised "
                                 "(it still holds NaN after init_weights): the init function does not cover "
                                 f"{type(mod).__name__} modules")
        for n, p in own:
            if isinstance(p, DTensor):
                src = 0 if sync_from_rank0 else None
                shard = distribute_tensor(full[n], p.device_mesh, p.placements, src_data_rank=src)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full[n])
        del full


def _nan_like(p: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A full-size tensor for ``p`` filled with NaN (floating dtypes; others cannot hold NaN: zeros)."""
    fill = float("nan") if p.dtype.is_floating_point or p.dtype.is_complex else 0
    return torch.full(tuple(p.shape), fill, dtype=p.dtype, device=device)


# ----------------------------------------------------------------------------------- full state


def _full(v: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v


def gather_full_state_dict(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded model state on rank 0 (CPU tensors), gathered one tensor at a time; None elsewhere.
    Collective: every rank must call it."""
    out = {}
    for k, v in model.state_dict().items():
        full = _full(v.detach())
        if is_main:
            out[k] = full.cpu().clone()
        del full
    return out if is_main else None


def gather_full_optimizer_state(opt: torch.optim.Optimizer, is_main: bool) -> dict | None:
    """``opt.state_dict()`` with every sharded state tensor gathered: the layout an unsharded run saves
    (parameter indices, plain tensors). Collective; rank 0 gets it, others None."""
    sd = opt.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        st = {}
        for k, v in sd["state"][idx].items():
            if isinstance(v, torch.Tensor):
                full = _full(v)
                if is_main:
                    st[k] = full.cpu().clone()
            elif is_main:
                st[k] = v
        if is_main:
            state[idx] = st
    return {"state": state, "param_groups": sd["param_groups"]} if is_main else None


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    if tuple(full.shape) != tuple(like.shape):
        raise CheckpointError(f"a checkpoint tensor has shape {tuple(full.shape)}, the model's {tuple(like.shape)}")
    dev = like.device_mesh.device_type
    return distribute_tensor(full.to(dev, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, get: Callable[[str], torch.Tensor | None], where: str) -> None:
    """Load full (unsharded) tensors into a sharded model: ``get(name)`` returns each one (None = missing);
    every rank reads and keeps only its shard, one tensor at a time."""
    new = {}
    for k, v in model.state_dict().items():
        full = get(k)
        if full is None:
            raise CheckpointError(f"{where}: missing tensor {k}; the recipe's model changed since the checkpoint "
                                  "was written")
        new[k] = _shard_like(full, v)
    model.load_state_dict(new, strict=True)


def shard_optimizer_state(opt: torch.optim.Optimizer, full_sd: dict) -> dict:
    """An unsharded optimizer state dict (parameter-index layout) with every parameter-shaped state tensor
    cut to this rank's shard, ready for ``opt.load_state_dict``.

    One tensor at a time: each full tensor (typically memory-mapped from trainer_state.pt) is read, its
    shard copied out (``distribute_tensor`` clones the local piece) and the full one released from
    ``full_sd`` before the next, so a rank never holds more than one full state tensor of its own."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    full_state = full_sd.get("state", {})
    for idx in list(full_state):
        st = full_state[idx]
        i = int(idx)
        if i >= len(params):
            raise CheckpointError(f"optimizer state for parameter {i}, but the model has {len(params)}")
        p = params[i]
        out = {}
        for k in list(st):
            v = st[k]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                out[k] = _shard_like(v, p)
                st[k] = None  # drop the full tensor now
            else:
                out[k] = v
            del v
        state[idx] = out
    return {"state": state, "param_groups": full_sd["param_groups"]}


def plain_model_from_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU ``MPTForCausalLM`` holding ``sd`` (no copy: the tensors are assigned)."""
    from mptkit.model import MPTForCausalLM

    plain = MPTForCausalLM(model.config, init=False, device="meta")
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.reset_buffers()
    plain.train(model.training)
    return plain


# ----------------------------------------------------------------------------------- sharded checkpoints


def _dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def dcp_save(model: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Write model and optimizer shards with torch.distributed.checkpoint (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, opt), checkpoint_id=str(folder))


# What a DCP ``.metadata`` pickle (torch 2.13, FileSystemWriter) legitimately references: DCP's metadata
# dataclasses, torch.Size, dtypes and layouts, the checkpoint path. Anything else is refused.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


def _metadata_unpickler(f, where: str):
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_METADATA_GLOBALS or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise CheckpointError(f"{where}: refusing to load this sharded checkpoint: its metadata pickle "
                                  f"references {module}.{name}, which is not a torch.distributed.checkpoint "
                                  "metadata type (a tampered file, or written by an incompatible torch)")

        def persistent_load(self, pid):
            raise CheckpointError(f"{where}: refusing to load this sharded checkpoint: its metadata pickle holds "
                                  "a persistent reference")

    return _Restricted(f)


def _safe_reader(folder: Path):
    """A DCP ``FileSystemReader`` whose ``read_metadata`` unpickles through an allow-list (torch's own uses
    plain ``pickle.load`` on the user-given ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import Metadata

            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(path, "rb") as f:
                    md = _metadata_unpickler(f, str(path)).load()
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle raises many types
                raise CheckpointError(f"{path}: unreadable sharded checkpoint metadata "
                                      f"({type(e).__name__}: {e})") from None
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata ({type(md).__name__})")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(str(folder))


def _safe_planner():
    """DCP's default load planner, except that non-tensor items (optimizer hyper-parameters) are read with
    ``torch.load(weights_only=True)``; torch's own planner uses ``weights_only=False`` on the shard bytes."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises UnpicklingError and more
                raise CheckpointError(f"refusing a non-tensor item of the sharded checkpoint "
                                      f"({read_item.dest_index.fqn}): {str(e).splitlines()[0][:300]}") from None
            buf = io.BytesIO()  # plain data only now: hand it on in the form the parent planner reads
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return SafeLoadPlanner()


def dcp_load(model: nn.Module, opt: torch.optim.Optimizer | None, folder: Path) -> None:
    """Read a DCP checkpoint into ``model`` (and ``opt``): sharded or not, any world size (DCP reshards).

    The metadata pickle is read through an allow-list and non-tensor items with ``weights_only=True``; a
    file that references anything else is a :class:`CheckpointError` before any of it is unpickled."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    no_dist = not (dist.is_available() and dist.is_initialized())  # one process reads every shard
    _safe_reader(folder).read_metadata()  # every rank: a refused file raises here, before any collective

    def load(state: dict) -> None:
        with warnings.catch_warnings():  # DCP warns that no_dist means a single process: it does
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            try:
                dcp.load(state, checkpoint_id=str(folder), storage_reader=_safe_reader(folder),
                         planner=_safe_planner(), no_dist=no_dist)
            except CheckpointException as e:  # a BaseException: name the first rank's error
                errs = [pair[0] for pair in e.failures.values()]
                own = next((x for x in errs if isinstance(x, CheckpointError)), None)
                if own is not None:
                    raise own from None
                first = errs[0] if errs else e
                raise CheckpointError(f"{folder}: {type(first).__name__}: {str(first).splitlines()[0][:300]}") \
                    from None

    if opt is None:
        state = {"model": get_model_state_dict(model)}
        load(state)
        set_model_state_dict(model, state["model"])
        return
    state = _dcp_state(model, opt)
    load(state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate_sharded_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a sharded checkpoint's weights into an HF folder (config.json + safetensors + tokenizer) in one
    process, e.g. for ``mptkit export`` or ``transformers``."""
    from mptkit.model import MPTForCausalLM, load_model_config
    from mptkit.train import checkpoint as ck
    from mptkit.utils.fs import atomic_dir

    ckpt = Path(ckpt)
    model = MPTForCausalLM(load_model_config(ckpt / ck.MODEL_DIR), init=False, device="cpu")
    dcp_load(model, None, ckpt / ck.SHARDED_DIR)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, tokenizer=ckpt / ck.MODEL_DIR)
    return out
