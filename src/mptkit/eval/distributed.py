"""Evaluation split over the ranks of a ``torch.distributed`` process group (``torchrun``; gloo on CPU).

Record ``i`` of a task is scored on rank ``i % world_size``; every rank then gathers every rank's per-record
results and computes the task's figures from all of them, so each rank returns the same :class:`ICLResult`
as one process would (same records, same shots: the shots of record ``i`` are drawn from the whole file,
seeded with ``(seed, i)``; the same generation budget: the longest answer of the whole set). Only batching
differs (each rank batches its own share), which moves log-likelihoods by float rounding only.

Without an initialized process group (or with one rank) this is :func:`mptkit.eval.icl.icl_accuracy`.
Every rank must call it with the same arguments (it is a collective).
"""

from __future__ import annotations

import torch.distributed as dist

from mptkit.errors import EvalError
from mptkit.eval.icl import CHOICE_TYPES, ICLResult, _as_task, icl_accuracy


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The record indices rank ``rank`` scores: ``rank, rank + world_size, ...`` below ``n``."""
    return list(range(rank, n, world_size))


def merge_results(parts: list[ICLResult], examples: int) -> ICLResult:
    """One :class:`ICLResult` from the ranks' results over disjoint record sets: details by record index,
    accuracy / acc_norm over all records, truncated prompts summed."""
    first = parts[0]
    details = sorted((d for p in parts for d in p.details), key=lambda d: d["index"])
    if len(details) != examples or [d["index"] for d in details] != list(range(examples)):
        raise RuntimeError(
            f"gathered {len(details)} records of {examples}: the ranks did not score the same task"
        )
    n = max(1, len(details))
    norm = sum(bool(d.get("correct_norm")) for d in details) / n if first.task_type in CHOICE_TYPES else None
    return ICLResult(
        task=first.task,
        task_type=first.task_type,
        num_fewshot=first.num_fewshot,
        examples=len(details),
        accuracy=sum(bool(d["correct"]) for d in details) / n,
        accuracy_norm=norm,
        truncated=sum(p.truncated for p in parts),
        details=details,
    )


def icl_accuracy_sharded(
    model, tokenizer, task, *, task_type: str | None = None, max_examples: int | None = None, **kw
) -> ICLResult:
    """:func:`~mptkit.eval.icl.icl_accuracy` with the records split over the process group's ranks (see the
    module docstring); every rank gets the whole result, per-record details included."""
    rank, world = rank_and_world()
    if world == 1:
        return icl_accuracy(model, tokenizer, task, task_type=task_type, max_examples=max_examples, **kw)
    if max_examples is not None and int(max_examples) < 1:
        raise EvalError(f"--max-examples {max_examples}: must be >= 1")
    task = _as_task(task, task_type)
    n = len(task.examples) if max_examples is None else min(len(task.examples), int(max_examples))
    mine = icl_accuracy(model, tokenizer, task, indices=shard(n, rank, world), **kw)
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return merge_results(parts, n)
