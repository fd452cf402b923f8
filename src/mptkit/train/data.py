"""The trainer's data side: a resumable per-rank batch stream over any map-style dataset.

A dataset is anything with ``len(ds)`` and ``ds[i] -> dict`` of equal-length LongTensors: at least
``input_ids``; optionally ``labels`` (-100 = no loss), ``attention_mask``, ``sequence_id``. Pretraining
uses :class:`mptkit.data.shards.TokenDataset`; finetuning plugs in its own dataset (and, if needed, its
own ``collate`` and loss). :class:`BatchStream` orders samples with a sampler (the data package's
``ResumableSampler``, rank-sliced), and its position — ``(epoch, offset)`` — is what a
checkpoint stores to resume at exactly the next sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mptkit.data.shards import ResumableSampler
from mptkit.errors import DataError

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


def make_sampler(num_samples: int, *, seed: int, shuffle: bool, rank: int, world_size: int, drop_last: bool = True):
    """The data package's :class:`~mptkit.data.shards.ResumableSampler` (seeded order by position, rank-sliced)."""
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


# ----------------------------------------------------------------------------------- what resumption depends on


def dataset_content_hash(ds) -> str | None:
    """A fingerprint of a training dataset's content, cheap to take: prepared shards by the sha256 of each
    shard recorded in their manifest (no data is read), in-memory datasets (``input_ids`` / ``labels`` /
    ``sequence_id`` tensors) by their bytes; None for other datasets."""
    man, split = getattr(ds, "manifest", None), getattr(ds, "split", None)
    if isinstance(man, dict) and split in (man.get("splits") or {}):
        # the shards' content only: a re-prepare of the same data writes them under new names (genN/), and the
        # tokenizer is a key of its own in the fingerprint
        shards = [[s.get("sha256"), s.get("num_samples")] for s in man["splits"][split]["shards"]]
        payload = {"shards": shards, "max_seq_len": man.get("max_seq_len"), "dtype": man.get("dtype")}
        return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    tensors = [(k, getattr(ds, k, None)) for k in ("input_ids", "labels", "sequence_id")]
    tensors = [(k, t) for k, t in tensors if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    h = hashlib.sha256()
    for k, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def data_fingerprint(ds, *, shuffle: bool, shuffle_seed: int, global_batch_size: int, sample_len: int) -> dict:
    """What exact resumption of the data stream depends on; a checkpoint stores it and a resume compares."""
    man = getattr(ds, "manifest", None)
    return {"num_samples": len(ds), "sample_len": int(sample_len), "content": dataset_content_hash(ds),
            "tokenizer": man.get("tokenizer_fingerprint") if isinstance(man, dict) else None,
            "shuffle": bool(shuffle), "shuffle_seed": int(shuffle_seed),
            "global_train_batch_size": int(global_batch_size)}


_FINGERPRINT_NAMES = {"num_samples": "samples", "sample_len": "sample length", "tokenizer": "tokenizer fingerprint",
                      "content": "dataset content", "shuffle": "shuffle", "shuffle_seed": "shuffle seed",
                      "global_train_batch_size": "global_train_batch_size"}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two :func:`data_fingerprint` results (keys either lacks are
    skipped: checkpoints written before a key existed)."""
    out = []
    for k, name in _FINGERPRINT_NAMES.items():
        a, b = old.get(k), new.get(k)
        if a is None or b is None or a == b:
            continue
        fmt = (lambda v: f"{v:,}") if isinstance(a, int) and not isinstance(a, bool) else str
        out.append(f"{name} {fmt(a)} -> {fmt(b)}")
    return out


# ----------------------------------------------------------------------------------- token ids


def check_token_ids(batch: dict, indices: list[int], ds, vocab_size: int | None, *, what: str = "training") -> None:
    """Refuse (:class:`DataError`) a batch holding a token id outside ``[0, vocab_size)``: one min/max over the
    CPU batch. The error names the sample, and for prepared shards the folder, the shard file, the row in it
    and whether the shard still matches its manifest's sha256."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if vocab_size is None or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) >= 0 and int(hi) < vocab_size:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    row, col = (int(x) for x in torch.nonzero(bad)[0])
    sample = int(indices[row]) if row < len(indices) else row
    raise DataError(f"{_where(ds, sample, what)} holds token id {int(ids[row, col])} at position {col}, outside "
                    f"the model's vocabulary (vocab_size {vocab_size}){_shard_hint(ds, sample)}")


def _where(ds, sample: int, what: str) -> str:
    locate = getattr(ds, "locate", None)
    if callable(locate):
        shard, row = locate(sample)
        return f"{getattr(ds, 'folder', 'the dataset')}: {what} sample {sample} (row {row} of shard {shard.name})"
    return f"{what} sample {sample}"


def _shard_hint(ds, sample: int) -> str:
    locate, man = getattr(ds, "locate", None), getattr(ds, "manifest", None)
    if not callable(locate) or not isinstance(man, dict):
        return ": the data was tokenized for another model, or is corrupt"
    from mptkit.utils.fs import sha256_file

    shard, _ = locate(sample)
    want = next((s.get("sha256") for sp in man.get("splits", {}).values() for s in sp.get("shards", [])
                 if Path(getattr(ds, "folder", ".")) / s.get("file", "") == shard), None)
    if want and sha256_file(shard) != want:
        return (f"; {shard} no longer matches the sha256 in manifest.json: it was modified after `mptkit data "
                "prepare` (corrupted in place); prepare the data again")
    return ("; the shard matches its sha256 in manifest.json, so the data was prepared with a larger vocabulary "
            "than the model's: prepare it with the model's tokenizer")


class BatchStream:
    """Per-rank batches of ``batch_size`` samples, epoch after epoch, resumable at the exact sample.

    The sampler gives this rank's order of sample indices for an epoch (``set_epoch`` then ``iter``); the
    stream remembers ``(epoch, offset)`` = how many of this epoch's samples it has handed out. With
    ``vocab_size`` set, every batch's token ids are checked against it (:func:`check_token_ids`). A batch's id
    is ``(epoch, offset // batch_size)``: the same on every rank and under any number of ranks (rank r of W
    takes global positions r, r+W, ...); batches whose id is in ``skip`` are passed over."""

    def __init__(self, dataset, sampler, batch_size: int, collate: Callable[[list], Any] = default_collate,
                 vocab_size: int | None = None):
        self.ds, self.sampler, self.bs, self.collate = dataset, sampler, batch_size, collate
        self.vocab_size = vocab_size
        self.epoch = 0
        self.offset = 0
        # batch ids (epoch, batch in epoch) never handed out (the recovery's skipped batches: train/recovery.py)
        self.skip: Any = frozenset()
        self.last_batch: tuple[int, int] | None = None  # the id of the batch handed out last
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

    def _to_next_batch(self, epoch: int, offset: int) -> tuple[int, int]:
        """The position of the next batch handed out from ``(epoch, offset)``: into the next epoch when this one
        has no whole batch left, past the batches in ``skip``."""
        while True:
            if offset + self.bs > self.samples_per_epoch:
                epoch, offset = epoch + 1, 0
            if (epoch, offset // self.bs) not in self.skip:
                return epoch, offset
            offset += self.bs

    def batch_ids(self, position: dict, n: int) -> list[tuple[int, int]]:
        """The ids ``(epoch, batch in epoch)`` of the ``n`` batches the stream hands out from ``position`` (a
        :meth:`state_dict`), honouring ``skip``; reads no data."""
        epoch, offset = int(position["epoch"]), int(position["offset"])
        out = []
        for _ in range(n):
            epoch, offset = self._to_next_batch(epoch, offset)
            out.append((epoch, offset // self.bs))
            offset += self.bs
        return out

    def next_indices(self) -> list[int]:
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset has {self.samples_per_epoch} samples per rank, fewer than one batch "
                             f"of {self.bs}")
        self.epoch, self.offset = self._to_next_batch(self.epoch, self.offset)
        self.last_batch = (self.epoch, self.offset // self.bs)
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
        idx = self.next_indices()
        batch = self.collate([self.ds[i] for i in idx])
        check_token_ids(batch, idx, self.ds, self.vocab_size)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, st: dict) -> None:
        self.epoch = int(st["epoch"])
        self.offset = int(st["offset"])
        self._order = None
