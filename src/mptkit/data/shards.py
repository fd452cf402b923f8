"""Reading prepared shards: :class:`TokenDataset`, and :class:`ResumableSampler` for exact resumption.

``TokenDataset(folder, split)`` memory-maps the shard files listed in ``manifest.json`` (opened lazily,
per process, so DataLoader workers do not copy them) and returns ``{"input_ids", "sequence_id"}``
LongTensors of length ``max_seq_len``. ``sequence_id`` numbers the documents inside a sample from the
EOS positions as llm-foundry does (an EOS belongs to the document it ends), for
``attn_uses_sequence_id``.

``ResumableSampler`` walks one global order per epoch (a permutation seeded by ``(seed, epoch)``) and
gives rank ``r`` of ``W`` the positions ``r, r+W, r+2W, ...`` of it, so ranks never overlap and, at any
moment when all ranks have taken ``k`` samples, exactly the first ``k*W`` positions are consumed. Its
state is that global position; a restart continues at the exact next sample, with the same or a different
world size (see the class docstring).
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import numpy as np
import torch

from mptkit.data.prepare import read_manifest
from mptkit.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"validation": "val", "valid": "val", "eval": "val", "test": "val"}


def sequence_ids(ids: np.ndarray, eos_token_id: int | None = None, bos_token_id: int | None = None) -> np.ndarray:
    """Document index of every token of ``ids`` (last axis). With an EOS id the EOS closes its document
    (ids after it start the next one); else with a BOS id the BOS opens a new one; else all zeros."""
    ids = np.asarray(ids)
    if eos_token_id is not None:
        sep = np.cumsum(ids == eos_token_id, axis=-1)
        out = np.zeros_like(sep)
        out[..., 1:] = sep[..., :-1]
        return out
    if bos_token_id is not None:
        return np.cumsum(ids == bos_token_id, axis=-1)
    return np.zeros(ids.shape, dtype=np.int64)


def check_compatible(manifest: dict, *, vocab_size: int | None = None, tokenizer=None,
                     max_seq_len: int | None = None, where: str = "dataset") -> None:
    """Refuse (``DataError``) a prepared dataset that does not fit a model: a different tokenizer
    (fingerprint; ``tokenizer`` may be a tokenizer, a folder or a fingerprint string), token ids beyond the
    model's ``vocab_size``, or samples longer than the model's ``max_seq_len``."""
    if tokenizer is not None:
        from mptkit.data.tokenizer import tokenizer_fingerprint

        fp = tokenizer if isinstance(tokenizer, str) and tokenizer.startswith("sha256:") else \
            tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_fingerprint") != fp:
            raise DataError(f"{where} was tokenized with a different tokenizer (fingerprint "
                            f"{manifest.get('tokenizer_fingerprint')}, from {manifest.get('tokenizer', {}).get('path')!r}) "
                            f"than the model's ({fp}); prepare the data again with the model's tokenizer")
    if vocab_size is not None:
        n = int(manifest.get("tokenizer_vocab_size") or manifest.get("vocab_size"))
        if n > int(vocab_size):
            raise DataError(f"{where} holds token ids up to {n - 1} (tokenizer of {n} tokens) but the model's "
                            f"vocab_size is {vocab_size}; use a model with vocab_size >= {manifest.get('vocab_size')}")
    if max_seq_len is not None and int(manifest["max_seq_len"]) > int(max_seq_len):
        raise DataError(f"{where} has samples of {manifest['max_seq_len']} tokens, longer than the model's "
                        f"max_seq_len {max_seq_len}; prepare with --max-seq-len {max_seq_len}")


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length samples of a prepared folder (``mptkit data prepare``).

    ``ds[i] -> {"input_ids": LongTensor (T,), "sequence_id": LongTensor (T,)}``; ``ds.manifest`` is the
    folder's manifest. ``split`` is ``"train"`` or ``"val"`` (``"validation"`` is accepted).
    ``verify=True`` checks every shard's sha256 (reads everything once).
    """

    def __init__(self, folder, split: str = "train", *, verify: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        split = SPLIT_ALIASES.get(split, split)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.folder}: no split {split!r} (has {sorted(splits)})")
        self.split = split
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.eos_token_id = self.manifest.get("eos_token_id")
        self.bos_token_id = self.manifest.get("bos_token_id")
        self._shards = []
        counts = []
        row = self.max_seq_len * self.dtype.itemsize
        for s in splits[split]["shards"]:
            p = self.folder / s["file"]
            if not p.is_file():
                raise DataError(f"{self.folder}: shard {s['file']} listed in manifest.json is missing")
            size = p.stat().st_size
            if size != s["num_samples"] * row:
                raise DataError(f"{p}: {size} bytes, expected {s['num_samples'] * row} "
                                f"({s['num_samples']} samples x {self.max_seq_len} x {self.dtype.itemsize} B): "
                                "truncated or replaced; prepare the data again")
            if verify:
                from mptkit.utils.fs import sha256_file

                if sha256_file(p) != s["sha256"]:
                    raise DataError(f"{p}: sha256 differs from manifest.json (corrupt shard); prepare the data again")
            self._shards.append((p, int(s["num_samples"])))
            counts.append(int(s["num_samples"]))
        self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._maps: list | None = None

    def __len__(self) -> int:
        return self._cum[-1]

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_maps"] = None  # each process opens its own memory maps
        return d

    def _open(self) -> list:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n, self.max_seq_len)) if n else None
                          for p, n in self._shards]
        return self._maps

    def row(self, i: int) -> np.ndarray:
        """Sample ``i`` as a numpy array of token ids (shard dtype, a copy)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        s = bisect.bisect_right(self._cum, i) - 1
        try:
            return np.array(self._open()[s][i - self._cum[s]])
        except OSError as e:  # EIO, a vanished file, too many open files...: a read, named as one
            from mptkit.utils.outputs import describe_os_error

            raise DataError(describe_os_error(e, self._shards[s][0], "cannot read the shard")) from e

    def locate(self, i: int) -> tuple[Path, int]:
        """(shard file, row in it) of sample ``i``."""
        s = bisect.bisect_right(self._cum, int(i)) - 1
        return self._shards[s][0], int(i) - self._cum[s]

    def __getitem__(self, i: int) -> dict:
        r = self.row(int(i)).astype(np.int64)
        return {"input_ids": torch.from_numpy(r),
                "sequence_id": torch.from_numpy(sequence_ids(r, self.eos_token_id, self.bos_token_id))}

    def check_compatible(self, **kw) -> None:
        """See :func:`check_compatible` (``vocab_size=``, ``tokenizer=``, ``max_seq_len=``)."""
        check_compatible(self.manifest, where=str(self.folder), **kw)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel_permute(q: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """A seeded pseudo-random bijection of ``[0, n)`` evaluated at ``q``, in O(len(q)) memory: a balanced
    Feistel network on ``2*h`` bits (``4**h >= n``) with splitmix64 round functions, and cycle walking
    (re-apply until the value falls below ``n``; a bijection of the larger domain restricted this way is a
    bijection of ``[0, n)``)."""
    h = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    keys = np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(rounds, dtype=np.uint64)
    with np.errstate(over="ignore"):
        def enc(x: np.ndarray) -> np.ndarray:
            left, right = x >> np.uint64(h), x & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            return (left << np.uint64(h)) | right

        x = enc(q.astype(np.uint64))
        bad = x >= np.uint64(n)
        while bad.any():
            x[bad] = enc(x[bad])
            bad = x >= np.uint64(n)
    return x.astype(np.int64)


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, rank-sharded, exactly resumable sampler over ``num_samples`` indices.

    Each epoch has one global order: ``numpy.random.default_rng([seed, epoch]).permutation(num_samples)``
    (or ``0..n-1`` without shuffle); above ``PERMUTATION_LIMIT`` (16M) samples, a seeded Feistel-network
    permutation computed per position, so a trillion-token corpus needs no multi-GB index array. Rank ``r`` of ``world_size`` W takes positions ``r, r+W, ...``:
    no overlap, every sample once per epoch. With ``drop_last`` the last ``n % W`` positions are skipped
    (every rank gets the same count); without it the order is padded by repeating its start.

    The iterator moves to the next epoch by itself when exhausted; ``set_epoch(e)`` (as with
    DistributedSampler) jumps to epoch ``e`` from its start unless it is already the current epoch.

    ``state_dict()`` holds the epoch and the global position = start + (samples this rank took) x W, which
    is exact when every rank took the same number of samples (lockstep data parallelism). By default
    "took" is what the iterator yielded: exact for a DataLoader with ``num_workers=0``; with worker
    prefetching pass ``state_dict(consumed=k)``, the samples this rank actually used since the iterator
    started. ``load_state_dict`` continues at that position: with the same world size each rank gets the
    same samples in the same order as without the interruption; with a different world size the global
    order continues exactly (positions ``pos+r, pos+r+W', ...``), so every global batch of the same global
    size holds the same samples; only which rank holds which changes (and with ``drop_last`` the dropped
    tail of the epoch, ``n % W``, follows the new W).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if int(num_samples) <= 0:
            raise DataError(f"ResumableSampler needs num_samples > 0, got {num_samples}")
        if not 0 <= int(rank) < int(world_size):
            raise DataError(f"rank {rank} out of range for world_size {world_size}")
        self.num_samples, self.seed, self.shuffle = int(num_samples), int(seed), bool(shuffle)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        if self.drop_last and self.num_samples < self.world_size:
            raise DataError(f"{num_samples} samples cannot feed {world_size} ranks with drop_last")
        self.epoch = 0
        self._pos = 0          # global position where the next/current iteration started
        self._yielded = 0      # samples this rank yielded in the current iteration

    # -- order
    def _total(self) -> int:
        n, w = self.num_samples, self.world_size
        return (n // w) * w if self.drop_last else -(-n // w) * w

    # above this many samples the order is computed per position (no O(n) permutation array)
    PERMUTATION_LIMIT = 1 << 24

    def at(self, positions, epoch: int | None = None) -> np.ndarray:
        """Sample indices at global ``positions`` of an epoch's order (positions >= num_samples wrap around,
        the padding of ``drop_last=False``)."""
        e = self.epoch if epoch is None else int(epoch)
        q = np.asarray(positions, dtype=np.int64) % self.num_samples
        if not self.shuffle:
            return q
        if self.num_samples <= self.PERMUTATION_LIMIT:
            key = (e, "perm")
            if getattr(self, "_cache_key", None) != key:
                self._cache = np.random.default_rng([self.seed, e]).permutation(self.num_samples)
                self._cache_key = key
            return self._cache[q]
        return _feistel_permute(q, self.num_samples, self.seed, e)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of an epoch (all ranks), length ``num_samples``."""
        return self.at(np.arange(self.num_samples), epoch)

    def __len__(self) -> int:
        return self._total() // self.world_size

    def remaining(self) -> int:
        """Samples this rank has left in the current epoch."""
        pos = self._pos + self._yielded * self.world_size
        return len(range(pos + self.rank, self._total(), self.world_size))

    def __iter__(self):
        total = self._total()
        start = self._pos
        self._yielded = 0
        epoch = self.epoch
        block = 8192 * self.world_size
        for b in range(start + self.rank, total, block):
            for i in self.at(np.arange(b, min(b + block, total), self.world_size), epoch).tolist():
                self._yielded += 1
                yield i
        if self.epoch == epoch and self._pos == start:  # exhausted: next iteration is the next epoch
            self.epoch, self._pos, self._yielded = epoch + 1, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._pos, self._yielded = int(epoch), 0, 0

    # -- resumption
    def state_dict(self, consumed: int | None = None) -> dict:
        k = self._yielded if consumed is None else int(consumed)
        pos = self._pos + k * self.world_size
        epoch = self.epoch
        if pos >= self._total():
            epoch, pos = epoch + 1, 0
        return {"version": 1, "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "epoch": epoch, "position": pos, "world_size": self.world_size}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("num_samples", "seed", "shuffle"):
            if k in sd and sd[k] != getattr(self, k):
                raise DataError(f"sampler state is for {k}={sd[k]!r} but this sampler has {getattr(self, k)!r}: "
                                "the dataset or data seed changed since the checkpoint; exact resumption is "
                                "impossible (prepare the same data / use the same seed, or start a fresh run)")
        self.epoch, self._pos, self._yielded = int(sd["epoch"]), int(sd["position"]), 0
        if self._pos >= self._total():
            self.epoch, self._pos = self.epoch + 1, 0
        if sd.get("world_size", self.world_size) != self.world_size:
            log.info("resuming the data order at global position %d of epoch %d with world_size %d (was %d)",
                     self._pos, self.epoch, self.world_size, sd["world_size"])
