"""torch.distributed set-up for `torchrun`: read RANK / WORLD_SIZE / LOCAL_RANK, gloo on CPU, nccl on GPU.

Without those variables (a plain `mptkit train`) everything is single-process and no process group is
created. Only rank 0 writes files; every rank reads the same config and data and takes its slice of each
global batch from the data sampler (rank / world_size).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mptkit.errors import TrainError
from mptkit.utils.env import env_number

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return env_number(name, default, int, invalid=lambda v: TrainError(
        f"environment variable {name}={v!r} is not an integer (set by torchrun)"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainError("device: cuda was requested but no CUDA GPU is available (use device=cpu)")
    if torch.cuda.is_available() and requested in ("auto", "cuda"):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (no-op for one process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    device = pick_device(requested_device, local)
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=device)
    if world <= 1:
        return info
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise TrainError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(world, timeout)
        if store is not None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, store=store)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        info.initialized_here = True
        log.info("torch.distributed: rank %d of %d, backend %s, device %s", rank, world, backend, device)
    return info


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under torchrun's shared agent store (``TORCHELASTIC_USE_AGENT_STORE``), the process group's keys under a
    prefix of this restart (``TORCHELASTIC_RESTART_COUNT``). The agent's store outlives a restart, so without
    it a restarted worker can read the address a dead worker of the previous attempt published and fail to
    connect (gloo: "connectFullMesh failed ... Connection refused"), wasting a restart. None: the default."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                         is_master=False, timeout=timeout)
    return dist.PrefixStore(f"mptkit/attempt-{attempt}", base)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj, info: DistInfo, dst: int = 0) -> list | None:
    """Every rank's ``obj`` as a list by rank on ``dst``, None on the other ranks ([obj] for one process)."""
    if not (info.enabled and dist.is_initialized()):
        return [obj]
    out = [None] * info.world_size if info.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
