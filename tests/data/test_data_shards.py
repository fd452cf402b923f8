"""Reading prepared shards (TokenDataset) and the exactly-resumable, rank-sharded ResumableSampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mptkit.data.prepare import prepare_dataset
from mptkit.data.shards import ResumableSampler, TokenDataset, check_compatible, sequence_ids
from mptkit.data.tokenizer import train_tokenizer
from mptkit.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    tok = train_tokenizer(None, 512, base / "tok", max_files=4)
    docs = [f"doc {i}: " + "word " * (i % 13 + 1) for i in range(300)]
    src = base / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # small shards so that samples span several shard files
    prepare_dataset([str(src)], tok, base / "ds", 16, val_fraction=0.1, shard_bytes=16 * 2 * 37, progress=False)
    return base / "ds", tok


def test_dataset_items_and_manifest_contract(prepared):
    """Items are LongTensors of max_seq_len; sequence_id starts at 0 and increments right after each EOS;
    the manifest carries the fields the trainer relies on; samples span several shard files."""
    folder, _ = prepared
    ds = TokenDataset(folder)
    m = ds.manifest
    for k in ("tokenizer_fingerprint", "vocab_size", "max_seq_len", "eos_token_id", "num_samples"):
        assert k in m
    assert m["num_samples"]["train"] == len(ds) > 0 and m["num_samples"]["val"] == len(TokenDataset(folder, "val"))
    assert len(TokenDataset(folder, "validation")) == m["num_samples"]["val"]
    assert len(m["splits"]["train"]["shards"]) > 2 and m["dtype"] == "uint16" and m["vocab_size"] % 64 == 0
    it = ds[5]
    assert it["input_ids"].dtype == torch.long and it["input_ids"].shape == (16,)
    assert it["sequence_id"].dtype == torch.long and it["sequence_id"].shape == (16,)
    ids, seq = it["input_ids"].tolist(), it["sequence_id"].tolist()
    eos = m["eos_token_id"]
    assert seq[0] == 0
    for t in range(1, 16):
        assert seq[t] == seq[t - 1] + (1 if ids[t - 1] == eos else 0)
    assert (ds[-1]["input_ids"] == ds[len(ds) - 1]["input_ids"]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    all_rows = np.concatenate([np.fromfile(folder / s["file"], dtype="<u2") for s in m["splits"]["train"]["shards"]])
    assert all_rows.reshape(-1, 16)[7].tolist() == ds[7]["input_ids"].tolist()
    with pytest.raises(DataError, match="no split"):
        TokenDataset(folder, "nope")


def test_sequence_ids_modes():
    """sequence_ids: EOS closes its document (llm-foundry), BOS opens one, neither gives zeros."""
    x = np.array([5, 0, 6, 7, 0, 0, 8])
    assert sequence_ids(x, eos_token_id=0).tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert sequence_ids(x, bos_token_id=0).tolist() == [0, 1, 1, 1, 2, 3, 3]
    assert sequence_ids(x).tolist() == [0] * 7


def test_check_compatible_refuses_other_tokenizer_and_small_vocab(prepared, tmp_path, make_tokenizer):
    """A model whose tokenizer fingerprint differs, whose vocab is smaller than the tokenizer, or whose
    max_seq_len is shorter than the samples is refused with a DataError saying what to do."""
    folder, tok = prepared
    ds = TokenDataset(folder)
    ds.check_compatible(tokenizer=tok, vocab_size=512, max_seq_len=16)
    ds.check_compatible(tokenizer=ds.manifest["tokenizer_fingerprint"])
    with pytest.raises(DataError, match="different tokenizer"):
        ds.check_compatible(tokenizer=make_tokenizer(tmp_path / "other"))
    with pytest.raises(DataError, match="vocab_size is 300"):
        ds.check_compatible(vocab_size=300)
    with pytest.raises(DataError, match="max_seq_len 8"):
        check_compatible(ds.manifest, max_seq_len=8)


def test_damaged_folder_is_refused(prepared, tmp_path):
    """A truncated shard, a missing shard or a missing manifest is reported (file and expectation), never
    read as a silently shorter dataset; verify=True catches a same-size corruption by sha256."""
    import shutil

    folder, _ = prepared
    bad = tmp_path / "copy"
    shutil.copytree(folder, bad)
    first = bad / json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    data = first.read_bytes()
    first.write_bytes(data[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(bad)
    first.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    TokenDataset(bad)
    with pytest.raises(DataError, match="sha256"):
        TokenDataset(bad, verify=True)
    first.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenDataset(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        TokenDataset(bad)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_sampler_deterministic_shuffle_per_epoch():
    """The order is a permutation fixed by (seed, epoch): equal for equal seeds, different across epochs and
    seeds; shuffle=False is the identity; the iterator moves to the next epoch when exhausted."""
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    e0 = list(a)
    assert e0 == list(b) and sorted(e0) == list(range(50)) and e0 != list(range(50))
    e1 = list(a)
    assert a.epoch == 2 and sorted(e1) == list(range(50)) and e1 != e0
    b.set_epoch(1)
    assert list(b) == e1
    assert list(ResumableSampler(50, seed=4)) != e0
    assert list(ResumableSampler(10, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("n,world,drop_last", [(60, 4, True), (61, 4, True), (61, 4, False), (7, 3, False)])
def test_rank_sharding_covers_every_sample_once(n, world, drop_last):
    """Ranks never overlap and together take every sample exactly once per epoch (drop_last drops only the
    n % W tail; without it the order is padded so every rank gets the same count)."""
    per_rank = [list(ResumableSampler(n, seed=1, rank=r, world_size=world, drop_last=drop_last))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ResumableSampler(
        n, rank=0, world_size=world, drop_last=drop_last))
    flat = [i for p in per_rank for i in p]
    if drop_last:
        assert len(flat) == len(set(flat)) == n - n % world
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world


@pytest.mark.parametrize("k", [0, 1, 37, 64, 100])
def test_resume_at_sample_k_equals_uninterrupted(k):
    """Stopping after k samples, saving state_dict, and restarting a fresh sampler from it yields exactly
    the samples an uninterrupted run yields after k (across the epoch boundary too)."""
    ref = ResumableSampler(64, seed=7)
    stream = list(ref) + list(ref)
    s = ResumableSampler(64, seed=7)
    it = iter(s)
    got = _take(it, k % 64)
    if k >= 64:
        got += list(it)
        it = iter(s)
        got += _take(it, k - 64)
    sd = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    s2 = ResumableSampler(64, seed=7)
    s2.load_state_dict(sd)
    s2.set_epoch(sd["epoch"])  # what a trainer loop does; must not rewind
    rest = list(s2)
    if k < 64:
        rest += list(s2)
    assert got + rest == stream


def test_resume_through_dataloader_with_ranks_and_changed_world_size(prepared):
    """With a DataLoader (num_workers=0) over TokenDataset: 2 ranks stop after 3 batches and resume (a) with
    2 ranks: each rank's remaining batches equal the uninterrupted ones; (b) with 4 ranks: every global
    batch of the same global size holds the same samples as uninterrupted 2-rank training (up to the epoch's
    last, partial batch)."""
    folder, _ = prepared
    ds = TokenDataset(folder)
    n, mb = len(ds), 4

    def loader(rank, world, bs, sd=None):
        s = ResumableSampler(n, seed=11, rank=rank, world_size=world)
        if sd:
            s.load_state_dict(sd)
        return s, torch.utils.data.DataLoader(ds, batch_size=bs, sampler=s)

    full = [[b["input_ids"] for b in loader(r, 2, mb)[1]] for r in range(2)]
    states, seen = [], []
    for r in range(2):
        s, dl = loader(r, 2, mb)
        it = iter(dl)
        seen.append([next(it)["input_ids"] for _ in range(3)])
        states.append(s.state_dict())
    assert states[0]["position"] == states[1]["position"] == 3 * mb * 2
    for r in range(2):
        rest = [b["input_ids"] for b in loader(r, 2, mb, states[r])[1]]
        assert all(torch.equal(x, y) for x, y in zip(seen[r] + rest, full[r])) and len(seen[r] + rest) == len(full[r])

    def rows(batches):
        return sorted(tuple(x.tolist()) for b in batches for x in b)

    # global batch j of the 2-rank run = rank0 batch j + rank1 batch j (8 samples)
    glob2 = [rows([full[0][j], full[1][j]]) for j in range(3, len(full[0]))]
    four = [[b["input_ids"] for b in loader(r, 4, mb // 2, states[0])[1]] for r in range(4)]
    glob4 = [rows([four[r][j] for r in range(4)]) for j in range(len(four[0]))]
    # all full global batches agree; only the epoch's last partial batch follows the n % W tail of the new W
    assert glob4[: len(glob2) - 1] == glob2[:-1] and len(glob2) > 20


def test_state_dict_with_prefetch_count_and_mismatch_refused():
    """state_dict(consumed=k) records what was actually trained on (worker prefetch yields ahead); a state
    for another dataset size or seed is refused with a DataError."""
    s = ResumableSampler(30, seed=2)
    it = iter(s)
    first = _take(it, 12)  # the loader prefetched 12, the trainer used 5
    sd = s.state_dict(consumed=5)
    s2 = ResumableSampler(30, seed=2)
    s2.load_state_dict(sd)
    assert list(s2)[:7] == first[5:12]
    with pytest.raises(DataError, match="num_samples"):
        ResumableSampler(31, seed=2).load_state_dict(sd)
    with pytest.raises(DataError, match="seed"):
        ResumableSampler(30, seed=3).load_state_dict(sd)


def test_dataloader_workers_do_not_copy_memmaps(prepared):
    """The dataset pickles without its memory maps (each worker opens its own) and a 2-worker DataLoader
    returns the same batches as the main process."""
    import pickle

    folder, _ = prepared
    ds = TokenDataset(folder)
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    s = ResumableSampler(len(ds), seed=0)
    a = [b["input_ids"] for b in torch.utils.data.DataLoader(ds, batch_size=8, sampler=s, num_workers=2)]
    s.set_epoch(0)
    b = [b["input_ids"] for b in torch.utils.data.DataLoader(ds, batch_size=8, sampler=s, num_workers=0)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_large_corpus_order_is_a_seeded_bijection(n, monkeypatch):
    """Above PERMUTATION_LIMIT the order is a Feistel permutation computed per position: a bijection of
    [0, n) (every sample exactly once), fixed by (seed, epoch), different across epochs; ranks, padding and
    resumption work the same as with the array permutation."""
    monkeypatch.setattr(ResumableSampler, "PERMUTATION_LIMIT", 0)
    s = ResumableSampler(n, seed=5)
    o0, o1 = s.order(0), s.order(1)
    assert sorted(o0.tolist()) == list(range(n)) and sorted(o1.tolist()) == list(range(n))
    assert o0.tolist() == ResumableSampler(n, seed=5).order(0).tolist()
    if n >= 64:
        assert o0.tolist() != o1.tolist() and o0.tolist() != ResumableSampler(n, seed=6).order(0).tolist()
        assert o0.tolist() != list(range(n))
    world = 3 if n >= 3 else 1
    per_rank = [list(ResumableSampler(n, seed=5, rank=r, world_size=world, drop_last=False)) for r in range(world)]
    flat = [i for p in per_rank for i in p]
    assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    it = iter(s)
    head = [next(it) for _ in range(n // 2)]
    s2 = ResumableSampler(n, seed=5)
    s2.load_state_dict(s.state_dict())
    assert head + list(s2) == o0.tolist()
