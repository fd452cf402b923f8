"""Sharded data parallelism: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) behind llm-foundry's
``fsdp_config``.

With ``fsdp_config`` in a recipe and more than one rank, every ``MPTBlock`` becomes its own FSDP unit and the
model root (embeddings, final norm, the tied LM head) one more; each rank keeps ``1/world`` of every
parameter, gradient and optimizer state as a ``DTensor`` shard and all-gathers a block's weights only while
it runs. FSDP2 runs on CPU with gloo as well as on CUDA with NCCL (verified on CPU/gloo with torch 2.13.0;
FSDP1 is not used).

The recipe's ``fsdp_config`` is read and checked by :mod:`mptkit.train.fsdp_config` (no torch.distributed
there: the recipe validator uses it); its :func:`parse_fsdp_config`, :func:`notes`, :func:`compute_dtypes`
and :class:`FSDPSettings` are re-exported here, so the trainer has one module for FSDP. This module is the
torch.distributed runtime, in the order the trainer uses it:

* :func:`build_mesh` and :func:`shard_model` apply ``fully_shard`` per block, then the root.
* :func:`materialize_sharded` allocates a ``meta``-built model's shards and initialises them *leaf module by
  leaf module*: each rank initialises one full leaf (a Linear, an Embedding, a norm) from the same seed, in
  the same order as the unsharded ``init_weights``, keeps its own shard and frees the rest. The initial
  weights are therefore bitwise those of a single-process or DDP run with the same seed, and no rank ever
  holds more than one full leaf tensor beside its shards.
* :func:`gather_full_state_dict` / :func:`gather_full_optimizer_state` build the full (unsharded) state on
  rank 0, one tensor at a time, in the exact layout a DDP or single-process run writes (so checkpoints are
  interchangeable); :func:`load_full_state_dict` / :func:`shard_optimizer_state` go the other way.
* :func:`dcp_save` / :func:`dcp_load`: ``torch.distributed.checkpoint`` (sharded checkpoints), which also load
  into an unsharded model (another world size, DDP, one process) because DCP reshards on load; the safe
  reading of a DCP folder is :mod:`mptkit.io.dcp`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mptkit.errors import CheckpointError, ConfigError, TrainError
from mptkit.train.fsdp_config import FSDPSettings, compute_dtypes, notes, parse_fsdp_config

log = logging.getLogger(__name__)

__all__ = [  # the settings (from fsdp_config) and the runtime
    "FSDPSettings", "adapter_names", "build_mesh", "compute_dtypes", "dcp_load", "dcp_save",
    "describe", "fsdp_blocks", "gather_adapter_model", "gather_full_optimizer_state", "gather_full_state_dict", "load_full_state_dict",
    "local_numel", "materialize_sharded", "notes", "parse_fsdp_config", "plain_model_from_state",
    "shard_model", "shard_optimizer_state",
]

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
    """An unsharded CPU ``MPTForCausalLM`` holding ``sd`` (no copy: the tensors are assigned). A LoRA model's
    copy has the same adapters (``peft_config``, base reference and ``modules_to_save`` carried over)."""
    from mptkit.model import MPTForCausalLM
    from mptkit.model.lora import has_lora

    plain = MPTForCausalLM(model.config, init=False, device="meta")
    if has_lora(model):
        _same_lora(plain, model)
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.reset_buffers()
    plain.train(model.training)
    return plain


def _same_lora(plain: nn.Module, model: nn.Module) -> None:
    from mptkit.model.lora import apply_lora

    apply_lora(plain, model.peft_config)
    plain._lora_base = dict(getattr(model, "_lora_base", None) or {})
    plain._lora_modules_to_save = tuple(getattr(model, "_lora_modules_to_save", ()))


def adapter_names(model: nn.Module) -> list[str]:
    """The state-dict names of a LoRA model's adapter tensors (``lora_A`` / ``lora_B`` and ``modules_to_save``)."""
    from mptkit.model.lora import adapter_state_dict

    ids = {id(t) for t in adapter_state_dict(model).values()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def gather_adapter_model(model: nn.Module, is_main: bool) -> nn.Module | None:
    """A sharded LoRA model's adapter, unsharded on rank 0, in a model whose frozen base stays on the ``meta``
    device (never gathered): enough for :func:`mptkit.io.adapter.save_adapter`, which reads only the adapter,
    the settings and the base's reference. Collective; None on the other ranks."""
    from mptkit.model import MPTForCausalLM

    params = dict(model.named_parameters())
    sd = {}
    for k in adapter_names(model):
        full = _full(params[k].detach())
        if is_main:
            sd[k] = full.cpu().clone()
        del full
    if not is_main:
        return None
    plain = MPTForCausalLM(model.config, init=False, device="meta")
    _same_lora(plain, model)
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(adapter_names(plain)) & set(missing):
        raise CheckpointError(f"the adapter's tensors do not fit its model copy (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
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


def dcp_load(model: nn.Module, opt: torch.optim.Optimizer | None, folder: Path) -> None:
    """Read a DCP checkpoint into ``model`` (and ``opt``): sharded or not, any world size (DCP reshards).
    The safe reading itself (allow-listed metadata, weights-only items) is :mod:`mptkit.io.dcp`'s."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from mptkit.io.dcp import load_dcp_model_state, read_dcp, read_dcp_metadata

    if opt is None:
        load_dcp_model_state(model, folder)
        return
    read_dcp_metadata(folder)  # every rank: a refused file raises here, before any collective
    state = _dcp_state(model, opt)
    read_dcp(state, folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
