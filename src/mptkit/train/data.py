"""The trainer's data side: a resumable per-rank batch stream over any map-style dataset.

A dataset is anything with ``len(ds)`` and ``ds[i] -> dict`` of equal-length LongTensors: at least
``input_ids``; optionally ``labels`` (-100 = no loss), ``attention_mask``, ``sequence_id``. Pretraining
uses :class:`mptkit.data.shards.TokenDataset`; finetuning plugs in its own dataset (and, if needed, its
own ``collate`` and loss). :class:`BatchStream` orders samples with a sampler (the data package's
``ResumableSampler`` when present, rank-sliced), and its position — ``(epoch, offset)`` — is what a
checkpoint stores to resume at exactly the next sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class TensorDataset:
    """An in-memory dataset of fixed-length samples: a (N, T) LongTensor -> {"input_ids": row}."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError("TensorDataset: input_ids must be (num_samples, seq_len)")
        self.input_ids = input_ids.long()
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        d = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            d["labels"] = self.labels[i]
        return d


class _PermutationSampler:
    """Fallback sampler: a seeded permutation per epoch, rank-sliced, last partial slice dropped."""

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world = rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, e: int) -> None:
        self.epoch = e

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        usable = (self.n // self.world) * self.world if self.drop_last else self.n
        return iter(order[self.rank:usable:self.world])

    def __len__(self) -> int:
        return self.n // self.world if self.drop_last else -(-self.n // self.world)


def make_sampler(num_samples: int, *, seed: int, shuffle: bool, rank: int, world_size: int, drop_last: bool = True):
    """The data package's ResumableSampler when available, else a seeded permutation sampler."""
    try:
        from mptkit.data.shards import ResumableSampler
    except ImportError:
        return _PermutationSampler(num_samples, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                                   drop_last=drop_last)
    return ResumableSampler(num_samples, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                            drop_last=drop_last)


def default_collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        v = items[0][k]
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack([it[k] for it in items]).long() if v.dtype != torch.bool else torch.stack(
                [it[k] for it in items])
        else:
            out[k] = [it[k] for it in items]
    return out


class BatchStream:
    """Per-rank batches of ``batch_size`` samples, epoch after epoch, resumable at the exact sample.

    The sampler gives this rank's order of sample indices for an epoch (``set_epoch`` then ``iter``); the
    stream remembers ``(epoch, offset)`` = how many of this epoch's samples it has handed out."""

    def __init__(self, dataset, sampler, batch_size: int, collate: Callable[[list], Any] = default_collate):
        self.ds, self.sampler, self.bs, self.collate = dataset, sampler, batch_size, collate
        self.epoch = 0
        self.offset = 0
        self._order: list[int] | None = None
        self._order_epoch = -1

    @property
    def samples_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // self.bs

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order_epoch != self.epoch:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(self.epoch)
            if hasattr(self.sampler, "load_state_dict") and hasattr(self.sampler, "state_dict"):
                # a resumable sampler iterates from its own position: rewind it to the epoch start
                st = self.sampler.state_dict()
                if isinstance(st, dict) and any(k in st for k in ("offset", "position", "consumed", "index")):
                    for k in ("offset", "position", "consumed", "index"):
                        if k in st:
                            st[k] = 0
                    if "epoch" in st:
                        st["epoch"] = self.epoch
                    self.sampler.load_state_dict(st)
            self._order = list(iter(self.sampler))
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset has {self.samples_per_epoch} samples per rank, fewer than one batch "
                             f"of {self.bs}")
        if self.offset + self.bs > self.samples_per_epoch:
            self.epoch += 1
            self.offset = 0
        if hasattr(self.sampler, "at") and hasattr(self.sampler, "world_size"):
            # positional access: this rank's j-th sample of the epoch is global position j*W + rank, so no
            # per-epoch list of every index is built (at 1T tokens that list would hold ~500M entries)
            w, r = int(self.sampler.world_size), int(self.sampler.rank)
            pos = np.arange(self.offset, self.offset + self.bs, dtype=np.int64) * w + r
            idx = [int(i) for i in self.sampler.at(pos, self.epoch)]
        else:
            idx = self._epoch_order()[self.offset:self.offset + self.bs]
        self.offset += self.bs
        return idx

    def next_batch(self):
        return self.collate([self.ds[i] for i in self.next_indices()])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, st: dict) -> None:
        self.epoch = int(st["epoch"])
        self.offset = int(st["offset"])
        self._order = None
