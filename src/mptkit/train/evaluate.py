"""The evaluation pass of a run: the mean next-token loss (and perplexity) over the eval dataset, split over
the ranks (rank r of W takes samples r, r+W, ...), the sums all-reduced."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mptkit.train.data import check_token_ids
from mptkit.train.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: Any,
    *,
    collate: Callable[[list], dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    count_targets: Callable[[dict], int],
    batch_size: int,
    subset_num_batches: int,
    dist: DistInfo,
    device: torch.device,
    autocast: Callable[[], Any],
    vocab_size: int | None,
    sharded: bool = False,
) -> dict | None:
    """``{eval_loss, eval_perplexity, eval_tokens, eval_s}`` over ``dataset`` (None when it has no targets).
    ``subset_num_batches`` > 0 caps the batches per rank (llm-foundry's ``eval_subset_num_batches``).
    ``sharded`` (FSDP): every rank runs every forward (its all-gathers), a rank with fewer batches pads with
    weight-0 forwards. The model is left in the training mode it was in."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    idx = list(range(dist.rank, len(dataset), dist.world_size))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = -(-len(idx) // batch_size)
    if subset_num_batches > 0:
        n_batches = min(n_batches, subset_num_batches)
    if sharded:  # pad to the longest rank
        import torch.distributed as tdist

        nb = torch.tensor(n_batches, device=device)
        tdist.all_reduce(nb, op=tdist.ReduceOp.MAX)
        n_batches = int(nb)
    for b in range(n_batches):
        chunk = idx[b * batch_size : (b + 1) * batch_size]
        pad = not chunk  # sharded only: a forward with weight 0 to keep this rank in step
        batch = collate([dataset[i] for i in (chunk or [0])])
        check_token_ids(batch, chunk or [0], dataset, vocab_size, what="evaluation")
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        n = 0 if pad else count_targets(batch)
        if n == 0 and not sharded:
            continue
        with autocast():
            loss = loss_fn(model, batch)
        if n:
            loss_sum += loss.double() * n
            n_sum += n
    all_reduce_sum(loss_sum, dist)
    all_reduce_sum(n_sum, dist)
    if was_training:
        model.train()
    if float(n_sum) == 0:
        return None
    val = float(loss_sum / n_sum)
    return {
        "eval_loss": val,
        "eval_perplexity": math.exp(min(val, 50.0)),
        "eval_tokens": int(n_sum),
        "eval_s": time.perf_counter() - t0,
    }
