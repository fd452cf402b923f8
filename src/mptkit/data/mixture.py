"""Data mixtures: several token datasets (streams) drawn in set amounts per epoch (llm-foundry's
``train_loader.dataset.streams``, with mosaicml-streaming's semantics for sample counts).

Each stream is a prepared folder or an MDS folder with ``n`` samples and at most one weight:

* **relative** (``proportion``; then every stream must have one): an epoch has ``epoch_size`` samples
  (default: the streams' total), stream ``s`` gets ``floor(epoch_size * p_s / sum(p))``, and the shortfall
  (what the floors left) goes one sample each to streams drawn without replacement by
  ``numpy.random.default_rng(seed).choice`` -- the numbers mosaicml-streaming's ``Stream.apply_weights`` gives
  for the same seed;
* **absolute** (``repeat`` or ``choose``, or none): ``int(repeat * n)``, ``choose``, or ``n`` samples; the epoch
  is their sum (``epoch_size`` is refused, as in streaming); with no weight on any stream and an
  ``epoch_size``, streams get shares proportional to their sizes.

Within a stream, ``k`` samples of ``n`` are ``k // n`` full copies plus ``k % n`` distinct samples drawn by a
seeded permutation of the stream (redrawn every epoch with ``sampling_method: balanced``, the default; the
same every epoch with ``fixed``). The epoch's order is a permutation of these ``sum(k)`` picks
(:class:`MixtureSampler`: a :class:`~mptkit.data.shards.ResumableSampler` over the picks), so ranks, resume
and a change of world size work exactly as for one folder.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mptkit.data.shards import ResumableSampler, _feistel_permute
from mptkit.errors import DataError

WEIGHT_KEYS = ("proportion", "repeat", "choose")
SAMPLING_METHODS = ("balanced", "fixed")


@dataclass
class StreamWeight:
    """One stream's name and weight (at most one of ``proportion``, ``repeat``, ``choose``)."""

    name: str
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    where: str = ""  # for messages: the recipe key of the stream

    def kind(self) -> str | None:
        given = [k for k in WEIGHT_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise DataError(f"{self.where or self.name}: give at most one of proportion, repeat, choose "
                            f"(it has {' and '.join(given)})")
        return given[0] if given else None


def _spread_shortfall(choose: np.ndarray, target: int, seed: int) -> np.ndarray:
    short = int(target - choose.sum())
    if short > 0:
        pick = np.random.default_rng(seed).choice(len(choose), short, replace=False)
        choose[pick] += 1
    return choose


def resolve_counts(weights: list[StreamWeight], sizes: list[int], *, epoch_size: int | None = None,
                   seed: int = 0) -> np.ndarray:
    """Samples each stream contributes to one epoch (int64 array), see the module docstring."""
    if not weights:
        raise DataError("a mixture needs at least one stream")
    sizes_a = np.asarray(sizes, dtype=np.int64)
    for w, n in zip(weights, sizes_a):
        if n <= 0:
            raise DataError(f"{w.where or w.name}: the stream has no samples")
    kinds = [w.kind() for w in weights]
    relative = [k == "proportion" for k in kinds]
    if any(relative) and not all(relative):
        a = next(w for w, r in zip(weights, relative) if r)
        b = next(w for w, r in zip(weights, relative) if not r)
        raise DataError(f"{b.where or b.name}: relative (proportion, as {a.where or a.name} has) and absolute "
                        "(repeat, choose or none) stream weights cannot be mixed: give every stream a proportion, "
                        "or none of them")
    if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1):
        raise DataError(f"epoch_size: expected a positive number of samples, got {epoch_size!r}")
    if all(relative):
        p = np.asarray([float(w.proportion) for w in weights], dtype=np.float64)
        for w, v in zip(weights, p):
            if not (math.isfinite(v) and v > 0):
                raise DataError(f"{w.where or w.name}.proportion: expected a positive number, got {w.proportion!r}")
        total = int(epoch_size) if epoch_size else int(sizes_a.sum())
        choose = (total * (p / p.sum())).astype(np.int64)
        return _spread_shortfall(choose, total, seed)
    if all(k is None for k in kinds) and epoch_size:
        choose = (int(epoch_size) * (sizes_a / sizes_a.sum())).astype(np.int64)
        return _spread_shortfall(choose, int(epoch_size), seed)
    if epoch_size:
        raise DataError("epoch_size: only with relative stream weights (proportion) or no weights at all; with "
                        "repeat / choose the epoch is the sum of the streams' samples")
    out = np.zeros(len(weights), dtype=np.int64)
    for i, (w, k, n) in enumerate(zip(weights, kinds, sizes_a)):
        if k == "repeat":
            if isinstance(w.repeat, bool) or not isinstance(w.repeat, (int, float)) or not w.repeat > 0:
                raise DataError(f"{w.where or w.name}.repeat: expected a positive number, got {w.repeat!r}")
            out[i] = int(float(w.repeat) * int(n))
        elif k == "choose":
            if isinstance(w.choose, bool) or not isinstance(w.choose, int) or w.choose < 1:
                raise DataError(f"{w.where or w.name}.choose: expected a positive number of samples, got "
                                f"{w.choose!r}")
            out[i] = int(w.choose)
        else:
            out[i] = int(n)
        if out[i] < 1:
            raise DataError(f"{w.where or w.name}: draws no sample per epoch ({k} {getattr(w, k)} of {n} samples)")
    return out


@dataclass(eq=False)
class MixtureDataset:
    """Several token datasets as one: ``ds[i]`` indexes their concatenation (stream 0's samples, then stream
    1's, ...); :meth:`picks` maps an epoch's pick numbers to those indices. ``manifest`` holds what the trainer
    reads of one folder's manifest (tokenizer fingerprint, vocabulary, sample length, separators) plus the
    mixture (``mixture``: per stream its folder, samples and samples per epoch)."""

    datasets: list
    names: list[str]
    choose: np.ndarray
    seed: int = 0
    sampling_method: str = "balanced"
    folders: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sampling_method not in SAMPLING_METHODS:
            raise DataError(f"sampling_method: expected one of {', '.join(SAMPLING_METHODS)}, got "
                            f"{self.sampling_method!r}")
        self.sizes = np.asarray([len(d) for d in self.datasets], dtype=np.int64)
        self.choose = np.asarray(self.choose, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._pick_offsets = np.concatenate([[0], np.cumsum(self.choose)]).astype(np.int64)
        self._perm: dict[tuple[int, int], np.ndarray] = {}
        self.manifest = {**self.manifest, "mixture": self.describe()}

    # -- the Dataset protocol (concatenation)
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate_stream(self, i: int) -> tuple[int, int]:
        s = bisect.bisect_right(self._offsets.tolist(), int(i)) - 1
        return s, int(i) - int(self._offsets[s])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        s, j = self.locate_stream(i)
        return self.datasets[s][j]

    @property
    def epoch_size(self) -> int:
        return int(self._pick_offsets[-1])

    # -- the epoch's picks
    def _stream_perm(self, s: int, q: np.ndarray, epoch: int) -> np.ndarray:
        n = int(self.sizes[s])
        e = 0 if self.sampling_method == "fixed" else int(epoch)
        if n <= ResumableSampler.PERMUTATION_LIMIT:
            key = (s, e)
            perm = self._perm.get(key)
            if perm is None:
                if len(self._perm) > 2 * len(self.sizes):
                    self._perm.clear()
                perm = np.random.default_rng([int(self.seed), e, s, 0x313]).permutation(n)
                self._perm[key] = perm
            return perm[q]
        sub = int(np.random.SeedSequence([int(self.seed), s, 0x313]).generate_state(1)[0] >> 1)
        return _feistel_permute(q, n, sub, e)

    def picks(self, v, epoch: int) -> np.ndarray:
        """Indices (into the concatenation) of the epoch's picks ``v`` (ints in ``[0, epoch_size)``)."""
        v = np.asarray(v, dtype=np.int64)
        s_of = np.searchsorted(self._pick_offsets, v, side="right") - 1
        out = np.empty_like(v)
        for s in np.unique(s_of).tolist():
            m = s_of == s
            j = v[m] - self._pick_offsets[s]
            n = int(self.sizes[s])
            full = (int(self.choose[s]) // n) * n
            local = np.where(j < full, j % n, 0)
            part = j >= full
            if part.any():
                local[part] = self._stream_perm(s, j[part] - full, epoch)
            out[m] = local + self._offsets[s]
        return out

    def stream_of(self, idx) -> np.ndarray:
        """Stream number of concatenation indices ``idx``."""
        return np.searchsorted(self._offsets, np.asarray(idx, dtype=np.int64), side="right") - 1

    def describe(self) -> list[dict]:
        total = max(1, self.epoch_size)
        return [{"name": n, "folder": f, "samples": int(k), "samples_per_epoch": int(c),
                 "proportion": round(int(c) / total, 6), "repeat": round(int(c) / int(k), 6)}
                for n, f, k, c in zip(self.names, self.folders or [""] * len(self.names), self.sizes, self.choose)]

    def content_hash(self) -> str:
        """What resumption depends on: every stream's content and its samples per epoch."""
        payload = {"streams": [[n, _dataset_hash(d), int(k), int(c)] for n, d, k, c in
                               zip(self.names, self.datasets, self.sizes, self.choose)],
                   "sampling_method": self.sampling_method, "seed": int(self.seed)}
        return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dataset_hash(ds) -> Any:
    """A stream's content, cheap to take: its shards' sha256 (prepared) or its index.json's (MDS)."""
    man, split = getattr(ds, "manifest", None), getattr(ds, "split", None)
    if isinstance(man, dict) and split in (man.get("splits") or {}):
        return [[s.get("sha256"), s.get("num_samples")] for s in man["splits"][split]["shards"]]
    if isinstance(man, dict) and man.get("format") == "mds":
        return man.get("index_sha256")
    return None


class MixtureSampler(ResumableSampler):
    """A :class:`ResumableSampler` over a mixture's ``epoch_size`` picks, giving dataset indices: the epoch's
    order is the sampler's permutation of the picks, each pick mapped by :meth:`MixtureDataset.picks`."""

    def __init__(self, mixture: MixtureDataset, **kw):
        super().__init__(mixture.epoch_size, **kw)
        self.mixture = mixture

    def at(self, positions, epoch: int | None = None) -> np.ndarray:
        e = self.epoch if epoch is None else int(epoch)
        return self.mixture.picks(super().at(positions, e), e)

    def stream_counts(self, start: int, stop: int, epoch: int) -> np.ndarray:
        """Samples of each stream at global positions ``[start, stop)`` of an epoch's order (all ranks)."""
        out = np.zeros(len(self.mixture.sizes), dtype=np.int64)
        for b in range(int(start), int(stop), 1 << 20):
            idx = self.at(np.arange(b, min(b + (1 << 20), int(stop)), dtype=np.int64), epoch)
            out += np.bincount(self.mixture.stream_of(idx), minlength=len(out))
        return out
