"""One optimizer step: a rank's share of a global batch split into microbatches (``auto`` halves the
microbatch on out-of-memory and retries the step), gradient accumulation weighted by each microbatch's
target tokens, precision (autocast, the fp16 grad scaler), gradient clipping and the optimizer monitor's
norms. The loss helpers a recipe's ``loss_fn`` builds on live here too (:func:`causal_lm_loss`,
:func:`count_targets`, :func:`count_tokens`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mptkit.errors import DataError, TrainError
from mptkit.train.distributed import DistInfo, all_reduce_sum
from mptkit.train.optim import set_lr

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- loss


def count_targets(mb: dict) -> int:
    """Positions that carry a next-token loss: labels[:, 1:] != -100 (labels default to input_ids)."""
    labels = mb.get("labels")
    if labels is None:
        ids = mb["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((labels[:, 1:] != -100).sum())


def count_tokens(mb: dict) -> int:
    """Tokens a microbatch holds, as llm-foundry counts them for ``tok`` durations and tokens/s: the samples'
    real (non-padding) lengths when the batch says (``num_tokens``, finetuning data), else every position."""
    n = mb.get("num_tokens")
    if n is not None:
        return int(n.sum())
    ids = mb["input_ids"]
    return ids.shape[0] * ids.shape[1]


def causal_lm_loss(model: nn.Module, mb: dict) -> torch.Tensor:
    """Mean next-token cross-entropy of a microbatch (labels = input_ids unless the batch has labels)."""
    labels = mb.get("labels", mb["input_ids"])
    kw = {}
    if mb.get("sequence_id") is not None:
        kw["sequence_id"] = mb["sequence_id"]
    if mb.get("attention_mask") is not None:
        kw["attention_mask"] = mb["attention_mask"]
    if _accepts_return_logits(model):
        kw["return_logits"] = False  # fused, chunked LM-head loss: the (B, T, V) logits are never held
    return model(mb["input_ids"], labels=labels, **kw).loss


_RL_CACHE: dict[type, bool] = {}


def _accepts_return_logits(model: nn.Module) -> bool:
    m = model.module if hasattr(model, "module") else model
    t = type(m)
    if t not in _RL_CACHE:
        try:
            _RL_CACHE[t] = "return_logits" in inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            _RL_CACHE[t] = False
    return _RL_CACHE[t]


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (FSDP's DTensor shards: over all of them)."""
    if not params:
        return torch.zeros(())
    if hasattr(params[0].grad, "full_tensor"):
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


# ----------------------------------------------------------------------------------- precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a recipe's ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str) -> torch.amp.GradScaler | None:
    """amp_fp16 scales the loss (a GPU grad scaler); the other precisions need none."""
    return torch.amp.GradScaler("cuda") if precision == "amp_fp16" else None


# ----------------------------------------------------------------------------------- the step


@dataclass
class StepResult:
    """What one optimizer step measured, summed over all ranks where it says so."""

    loss: float  # the mean loss over the step's target tokens (all ranks)
    grad_norm: float  # before clipping
    targets: int  # positions that carried loss, all ranks
    tokens: int  # tokens (non-padding for finetuning data), all ranks
    width: float  # positions per sample computed (after pad trimming), the ranks' mean
    optimizer_metrics: dict = field(default_factory=dict)  # the optimizer monitor's norms at its steps
    applied: bool = True  # False: ``guard`` dropped the update (no optimizer step)


class StepRunner:
    """Runs optimizer steps of ``model`` (``train_model``: the module that runs forward, e.g. its DDP
    wrapper) on this rank's batches. ``microbatch`` is the current microbatch size; with ``auto`` it is
    halved (to a divisor of ``per_rank_batch``) when a step runs out of memory, and the step is retried.

    ``schedule(step) -> lr multiplier`` sets the lr before each step; ``clip`` is the gradient-norm
    threshold (None: no clipping); ``sharded`` says the model is FSDP-sharded (gradients are
    reduce-scattered every microbatch, not all-reduced once as under DDP); ``activation_offload`` keeps
    the activations saved for backward in pinned CPU memory (CUDA)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        loss_fn: Callable[[nn.Module, dict], torch.Tensor],
        count_targets_fn: Callable[[dict], int],
        dist: DistInfo,
        device: torch.device,
        precision: str,
        per_rank_batch: int,
        microbatch: int,
        auto_microbatch: bool,
        clip: float | None,
        sharded: bool = False,
        activation_offload: bool = False,
        optimizer_monitor=None,
    ):
        self.model = model
        self.train_model = train_model
        self.optimizer = optimizer
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.count_targets = count_targets_fn
        self.dist = dist
        self.device = device
        self.precision = precision
        self.per_rank_batch = per_rank_batch
        self.microbatch = microbatch
        self.auto_microbatch = auto_microbatch
        self.clip = clip
        self.sharded = sharded
        self.activation_offload = activation_offload
        self.optimizer_monitor = optimizer_monitor
        self.scaler = grad_scaler(precision)
        # guard(loss, grad_norm) -> apply the update?, called before the optimizer step with the all-reduced loss
        # and the norm before clipping (the recovery's judgement: train/recovery.py); None: always apply
        self.guard: Callable[[float, float], bool] | None = None

    def autocast(self):
        return autocast(self.precision, self.device)

    def _offload(self):
        if not self.activation_offload or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    def _split(self, batch: dict, mb: int) -> list[dict]:
        n = batch["input_ids"].shape[0]
        out = []
        for s in range(0, n, mb):
            out.append(
                {
                    k: (
                        v[s : s + mb].to(self.device, non_blocking=True)
                        if isinstance(v, torch.Tensor)
                        else v[s : s + mb]
                    )
                    for k, v in batch.items()
                }
            )
        return out

    def run(self, batch: dict, step: int) -> StepResult:
        """The optimizer step numbered ``step`` (steps done before it) on this rank's share of a global batch."""
        while True:
            try:
                return self._run_once(batch, step, self.microbatch)
            except Exception as e:
                if not is_oom(e):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.auto_microbatch and self.microbatch > 1 and not self.dist.enabled:
                    new = self.microbatch // 2
                    while self.per_rank_batch % new:
                        new -= 1
                    log.warning(
                        "out of memory with microbatch %d: retrying the step with %d", self.microbatch, new
                    )
                    self.microbatch = new
                    continue
                hint = (
                    "lower device_train_microbatch_size, or set it to 'auto'"
                    if not self.auto_microbatch
                    else "even a microbatch of 1 does not fit: use a smaller model, a shorter max_seq_len, "
                    "activation_checkpointing=true or more GPUs"
                    if self.microbatch == 1
                    else "with several ranks set device_train_microbatch_size explicitly"
                )
                raise TrainError(
                    f"out of memory at step {step} with device_train_microbatch_size={self.microbatch}: {hint}"
                ) from None

    def _run_once(self, batch: dict, step: int, mb: int) -> StepResult:
        set_lr(self.optimizer, self.schedule(step))
        mbs = self._split(batch, mb)
        counts = [self.count_targets(m) for m in mbs]
        # targets, tokens and this rank's sample width (after pad trimming), summed over the ranks in one call
        both = torch.tensor(
            [
                float(sum(counts)),
                float(count_tokens(batch)),
                float(batch["input_ids"].shape[1]),
            ],  # no device sync
            dtype=torch.float64,
        )
        both = all_reduce_sum(
            both.to(self.device) if self.dist.enabled and self.device.type == "cuda" else both, self.dist
        )
        total, tokens = float(both[0]), int(both[1])
        width = float(both[2]) / self.dist.world_size  # the ranks' mean width: MFU counts every rank
        if total <= 0:
            raise DataError(f"step {step}: the batch has no target tokens (all labels are -100)")
        world = self.dist.world_size
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
        ddp = self.dist.enabled and not self.sharded
        for i, m in enumerate(mbs):
            last = i == len(mbs) - 1
            # DDP all-reduces once per step; FSDP reduce-scatters every microbatch into the sharded grads
            sync = self.train_model.no_sync() if (ddp and not last) else contextlib.nullcontext()
            with sync:
                with self.autocast(), self._offload():
                    loss = self.loss_fn(self.train_model, m)
                w = counts[i] / total
                scaled = loss * (w * world)  # DDP and FSDP average gradients over ranks
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_acc += loss.detach().float() * w
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.clip)  # FSDP: the global norm over all shards
        else:
            gnorm = total_norm(params)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        if self.guard is not None:  # judged before the update: the loss of every rank first
            loss_acc = all_reduce_sum(loss_acc, self.dist)
            if not self.guard(float(loss_acc), float(gnorm)):
                if self.scaler is not None:
                    self.scaler.update()  # unscale_ ran: the scaler's per-step state is reset for the next step
                self.optimizer.zero_grad(set_to_none=True)
                return StepResult(float(loss_acc), float(gnorm), int(total), tokens, width, {}, applied=False)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        metrics = {}
        if self.optimizer_monitor is not None and self.optimizer_monitor.due(step + 1):
            # the gradients as the optimizer used them (unscaled, clipped) and its state after the step
            metrics = self.optimizer_monitor.collect(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self.guard is None:
            loss_acc = all_reduce_sum(loss_acc, self.dist)
        return StepResult(float(loss_acc), float(gnorm), int(total), tokens, width, metrics)
