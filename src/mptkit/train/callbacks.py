"""The recipe's ``callbacks`` that change what the trainer does, under llm-foundry's / composer's names.

``kill_loss_spike`` is :class:`mptkit.train.metrics.LossSpikeMonitor`; this module holds the other two:

* ``scheduled_gc`` (llm-foundry's ``ScheduledGarbageCollector``): :class:`ScheduledGC`. Python's automatic
  garbage collection is switched off for the run and ``gc.collect()`` runs (with
  ``torch.cuda.empty_cache()`` on CUDA) at the start of the run, before every ``batch_interval``-th batch
  (counting the batches done, so also before the first), around each evaluation (during which automatic
  collection is on again unless ``eval_keep_disabled``) and at the end, which restores the interpreter's
  previous setting (also when the run fails).
* ``optimizer_monitor`` (composer's ``OptimizerMonitor``): :class:`OptimizerMonitor`. Every
  ``batch_log_interval``-th step it adds to that step's ``metrics.jsonl`` line the L2 norm of each
  parameter's gradient as the optimizer used it (after unscaling and clipping), ``l2_norm/grad/<name>``,
  and their global norm ``l2_norm/grad/global``; with ``log_optimizer_metrics`` (default) also each
  parameter's first-moment (``exp_avg``) norm ``l2_norm/moment/<name>`` and weight norm
  ``l2_norm/param/<name>`` after the step. Names are the model's parameter names
  (``transformer.blocks.0.attn.Wqkv.weight``; composer's carry its wrapper's ``model.`` prefix).
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any

import torch
from torch import nn

from mptkit.train.sections import CallbacksConfig, OptimizerMonitorConfig, ScheduledGCConfig

log = logging.getLogger(__name__)


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class ScheduledGC:
    """llm-foundry's ScheduledGarbageCollector: automatic gc off during training, a full collection every
    ``batch_interval`` batches (see the module docstring for every point it collects at)."""

    def __init__(self, batch_interval: int, eval_keep_disabled: bool = ScheduledGCConfig.eval_keep_disabled):
        self.batch_interval = int(batch_interval)
        self.eval_keep_disabled = bool(eval_keep_disabled)
        self._was_enabled: bool | None = None

    def fit_start(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        _collect()

    def before_batch(self, batches_done: int) -> None:
        if batches_done % self.batch_interval == 0:
            _collect()

    def eval_start(self) -> None:
        _collect()
        if not self.eval_keep_disabled:
            gc.enable()

    def eval_end(self) -> None:
        if not self.eval_keep_disabled:
            gc.disable()
        _collect()

    def fit_end(self) -> None:
        if self._was_enabled is None:  # fit_start never ran
            return
        _collect()
        if self._was_enabled:
            gc.enable()
        else:
            gc.disable()
        self._was_enabled = None


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """Each tensor's L2 norm, with one ``torch._foreach_norm`` per kind of tensor and one copy to the host.
    FSDP2 shards (DTensor): the whole tensor's norm, from the squared norms of the local shards summed over
    the sharded mesh dimensions in one all-reduce for all of them (not one per tensor)."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        key = (t.device_mesh, tuple(t.placements)) if hasattr(t, "to_local") else None
        groups.setdefault(key, []).append(i)
    order: list[int] = []
    parts: list[torch.Tensor] = []
    for key, idx in groups.items():
        if key is None:
            parts.append(torch.stack(torch._foreach_norm([tensors[i].detach() for i in idx], 2.0)))
        elif all(pl.is_shard() or pl.is_replicate() for pl in key[1]):
            from torch.distributed.tensor import DTensor, Partial, Replicate

            mesh, placements = key
            local = torch.stack(torch._foreach_norm([tensors[i].detach().to_local() for i in idx], 2.0))
            sq = local.float().square() if local.dtype in (torch.float16, torch.bfloat16) else local.square()
            spread = [Partial() if pl.is_shard() else Replicate() for pl in placements]
            parts.append(DTensor.from_local(sq, mesh, spread, run_check=False).full_tensor().sqrt())
        else:  # a pending (Partial) placement: DTensor's own norm of each
            parts.append(torch.stack([torch.linalg.vector_norm(tensors[i].detach(), 2.0).full_tensor() for i in idx]))
        order += idx
    if not parts:
        return []
    dev = parts[0].device
    vals = torch.cat([p.to(dev) for p in parts]).tolist()
    out = [0.0] * len(tensors)
    for i, v in zip(order, vals):
        out[i] = v
    return out


class OptimizerMonitor:
    """composer's OptimizerMonitor: per-parameter gradient norms every ``batch_log_interval`` steps and, with
    ``log_optimizer_metrics``, moment and weight norms (see the module docstring). Under FSDP every rank
    takes part (one all-reduce for all the norms at a logged step); only rank 0 writes."""

    def __init__(self, batch_log_interval: int = OptimizerMonitorConfig.batch_log_interval,
                 log_optimizer_metrics: bool = OptimizerMonitorConfig.log_optimizer_metrics):
        self.interval = int(batch_log_interval)
        self.log_optimizer_metrics = bool(log_optimizer_metrics)

    def due(self, step: int) -> bool:
        """Whether the step numbered ``step`` (1-based: the count of steps done after it) is logged."""
        return step % self.interval == 0

    @torch.no_grad()
    def collect(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The metrics, read after ``optimizer.step()`` and before the gradients are zeroed."""
        keys: list[str] = []
        tensors: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            if p.grad is None or not p.requires_grad:
                continue
            keys.append(f"l2_norm/grad/{name}")
            tensors.append(p.grad)
            if self.log_optimizer_metrics:
                st = optimizer.state.get(p) or {}
                if "exp_avg" in st:
                    keys.append(f"l2_norm/moment/{name}")
                    tensors.append(st["exp_avg"])
                keys.append(f"l2_norm/param/{name}")
                tensors.append(p)
        vals = dict(zip(keys, _norms(tensors)))
        sq = sum(v * v for k, v in vals.items() if k.startswith("l2_norm/grad/"))
        vals["l2_norm/grad/global"] = math.sqrt(sq)
        return vals


def build_callbacks(callbacks: CallbacksConfig | dict | None) -> tuple[ScheduledGC | None, OptimizerMonitor | None]:
    """(scheduled_gc, optimizer_monitor) from the recipe's ``callbacks`` (None when it does not name them)."""
    cb = CallbacksConfig.from_dict(callbacks or {})
    sgc, om = cb.scheduled_gc, cb.optimizer_monitor
    return (ScheduledGC(sgc.batch_interval, sgc.eval_keep_disabled) if sgc is not None else None,
            OptimizerMonitor(om.batch_log_interval, om.log_optimizer_metrics) if om is not None else None)
