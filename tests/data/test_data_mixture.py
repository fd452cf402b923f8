"""Data mixtures (``train_loader.dataset.streams``): per-epoch sample counts as mosaicml-streaming resolves
them, the realised proportions through `mptkit train`, exact resumption (also under another world size), and
clear refusals of bad streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mptkit.cli import main
from mptkit.data.mixture import MixtureDataset, MixtureSampler, StreamWeight, resolve_counts
from mptkit.data.prepare import prepare_dataset
from mptkit.errors import EXIT_NOT_RETRYABLE, ConfigError, DataError
from tests.helpers import kill_after_checkpoint

SEQ = 16


def _docs(word: str, n: int) -> str:
    return "".join(json.dumps({"text": f"{word} {i} " + f"{word} " * (i % 7 + 3)}) + "\n" for i in range(n))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_folders):
    """Two prepared folders of distinguishable text (A: 'alpha' documents, B: 'beta'), one tokenizer, and a
    third folder prepared with another tokenizer."""
    base = tmp_path_factory.mktemp("mix")
    tok = tokenizer_folders.make(base / "tok")
    out = {"tok": tok}
    for name, word, n in (("a", "alpha", 12), ("b", "beta", 60)):
        (base / f"{name}.jsonl").write_text(_docs(word, n))
        prepare_dataset([str(base / f"{name}.jsonl")], tok, base / name, SEQ, val_fraction=0.0, progress=False)
        out[name] = base / name
    other = tokenizer_folders.make(base / "tok2", vocab_size=320)
    prepare_dataset([str(base / "a.jsonl")], other, base / "other", SEQ, val_fraction=0.0, progress=False)
    out["other"] = base / "other"
    return out


def _rows(folder: Path) -> set[tuple]:
    from mptkit.data.shards import TokenDataset

    ds = TokenDataset(folder)
    return {tuple(ds.row(i).tolist()) for i in range(len(ds))}


def _recipe(tmp: Path, folders, streams: dict, **over) -> dict:
    d = {
        "max_seq_len": SEQ,
        "model": {"name": "mpt_causal_lm", "d_model": 32, "n_heads": 2, "n_layers": 2, "expansion_ratio": 2,
                  "max_seq_len": SEQ, "vocab_size": 448, "learned_pos_emb": False, "attn_config": {"alibi": True}},
        "tokenizer": {"name": str(folders["tok"])},
        "train_loader": {"name": "text", "dataset": {"streams": streams, "split": "train", "shuffle": True,
                                                     "max_seq_len": SEQ, **over.pop("dataset", {})}},
        "max_duration": "1ep", "global_train_batch_size": 8, "device_train_microbatch_size": 8,
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "0ba"},
        "eval_interval": "0ba", "save_interval": "0ba", "run_folder": str(tmp / "run"), "run_name": "mix",
        "progress_bar": False, "log_to_console": False, "peak_tflops": 1.0, "torch_threads": 1, "seed": 3,
    }
    d.update(over)
    return d


def _write(tmp: Path, d: dict) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_counts_follow_mosaicml_streaming_rules():
    """Relative weights: floor shares of epoch_size plus a seeded shortfall; absolute: repeat x n, choose, n;
    no weights + epoch_size: shares by size; the two kinds cannot be mixed, epoch_size needs relative."""
    w = [StreamWeight("a", proportion=3), StreamWeight("b", proportion=1)]
    assert resolve_counts(w, [10, 100], epoch_size=40).tolist() == [30, 10]
    assert resolve_counts(w, [10, 30]).tolist() == [30, 10]  # epoch_size default: the streams' total
    c = resolve_counts([StreamWeight("a", proportion=1)] * 3, [5, 5, 5], epoch_size=10, seed=1)
    assert c.sum() == 10 and sorted(c.tolist()) == [3, 3, 4]
    ab = [StreamWeight("a", repeat=2.5), StreamWeight("b", choose=7), StreamWeight("c")]
    assert resolve_counts(ab, [4, 100, 9]).tolist() == [10, 7, 9]
    assert resolve_counts([StreamWeight("a"), StreamWeight("b")], [10, 30], epoch_size=8).tolist() == [2, 6]
    with pytest.raises(DataError, match="cannot be mixed"):
        resolve_counts([StreamWeight("a", proportion=1), StreamWeight("b", repeat=1)], [1, 1])
    with pytest.raises(DataError, match="epoch_size: only with relative"):
        resolve_counts(ab, [4, 100, 9], epoch_size=5)


def test_picks_repeat_and_subsample_within_a_stream():
    """k picks of a stream of n: k // n full copies plus k % n distinct samples (redrawn per epoch with
    balanced, the same with fixed); the epoch's order visits every pick once."""

    class D:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    mix = MixtureDataset([D(4), D(10)], ["a", "b"], np.array([10, 3]), seed=0)
    v = np.arange(mix.epoch_size)
    e0, e1 = mix.picks(v, 0), mix.picks(v, 1)
    assert np.bincount(e0[:10], minlength=4).tolist() in ([3, 3, 2, 2], [3, 2, 3, 2], [3, 2, 2, 3], [2, 3, 3, 2],
                                                          [2, 3, 2, 3], [2, 2, 3, 3])
    assert len(set(e0[10:].tolist())) == 3 and all(4 <= i < 14 for i in e0[10:])
    assert set(e0[10:].tolist()) != set(e1[10:].tolist()) or set(e0[:10].tolist()) != set(e1[:10].tolist())
    fixed = MixtureDataset([D(4), D(10)], ["a", "b"], np.array([10, 3]), sampling_method="fixed")
    assert fixed.picks(v, 0).tolist() == fixed.picks(v, 5).tolist()
    s = MixtureSampler(mix, seed=0, world_size=1)
    assert sorted(s.at(np.arange(13), 0).tolist()) == sorted(e0.tolist())


def test_three_to_one_over_an_epoch_through_mptkit_train(tmp_path, folders, capsys):
    """A 3:1 mixture of two prepared folders: one epoch of the recipe's data stream holds 3 A samples for
    every B sample (told apart by their tokens, not by the mixture's bookkeeping), and `mptkit train` for
    1ep reports those realised proportions in summary.json and metrics.jsonl."""
    from mptkit.train.config import config_from_dict
    from mptkit.train.data import BatchStream, make_sampler
    from mptkit.train.distributed import DistInfo
    from mptkit.train.recipe_data import build_data

    streams = {"web": {"local": str(folders["a"]), "proportion": 3}, "code": {"local": str(folders["b"]),
                                                                              "proportion": 1}}
    d = _recipe(tmp_path, folders, streams, dataset={"epoch_size": 64})
    cfg = config_from_dict(d)
    _, train, _, _ = build_data(cfg, DistInfo())
    assert train.epoch_size == 64 and train.choose.tolist() == [48, 16]
    stream = BatchStream(train, make_sampler(len(train), seed=3, shuffle=True, rank=0, world_size=1,
                                             dataset=train), 8)
    a_rows, b_rows = _rows(folders["a"]), _rows(folders["b"])
    assert len(a_rows) < 48 and len(b_rows) > 16  # A is upsampled (some samples twice), B subsampled
    seen = {"a": 0, "b": 0}
    for _ in range(stream.batches_per_epoch):
        for r in stream.next_batch()["input_ids"].tolist():
            seen["a" if tuple(r) in a_rows else "b" if tuple(r) in b_rows else "?"] += 1
    assert seen == {"a": 48, "b": 16}
    assert stream.mixture_report()["streams"]["web"]["samples"] == 48

    # an eval_loader with streams evaluates every stream's split once; one folder with epoch_size is resampled
    ev_cfg = {**d, "eval_loader": {"name": "text", "dataset": {"streams": streams, "split": "train"}},
              "train_loader": {"name": "text", "dataset": {"local": str(folders["a"]), "epoch_size": 10}}}
    _, one, ev, _ = build_data(config_from_dict(ev_cfg), DistInfo())
    from mptkit.data.shards import TokenDataset

    n_a, n_b = len(TokenDataset(folders["a"])), len(TokenDataset(folders["b"]))
    assert len(ev) == n_a + n_b == ev.epoch_size and one.epoch_size == 10 and n_a < 48 < 2 * n_a  # A: upsampled

    capsys.readouterr()
    assert main(["train", str(_write(tmp_path, d))]) == 0
    assert "mixture: web 48 samples (75.0%, asked 75.0%), code 16 samples (25.0%, asked 25.0%)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8
    mix = summary["mixture"]["streams"]
    assert (mix["web"]["samples"], mix["code"]["samples"]) == (48, 16)
    assert mix["web"]["realised_proportion"] == 0.75 and mix["web"]["proportion"] == 0.75
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if "train_loss" in r][-1]
    assert last["mixture/web"] == 0.75 and last["mixture/code"] == 0.25


def test_resume_under_another_world_size_gives_the_same_samples(folders):
    """Five global batches on one rank, then the checkpointed position resumed on two ranks: every following
    global batch (both ranks' samples together) is the uninterrupted run's, and the realised counts carry on."""
    from mptkit.data.shards import TokenDataset
    from mptkit.train import state as state_mod
    from mptkit.train.data import BatchStream

    a, b = TokenDataset(folders["a"]), TokenDataset(folders["b"])
    mix = MixtureDataset([a, b], ["a", "b"], resolve_counts([StreamWeight("a", repeat=2), StreamWeight("b")],
                                                            [len(a), len(b)]), seed=7)

    def stream(rank, world, bs):
        return BatchStream(mix, MixtureSampler(mix, seed=7, rank=rank, world_size=world), bs)

    ref = stream(0, 1, 8)
    full = [ref.next_indices() for _ in range(5 + 3 * ref.batches_per_epoch)]  # past two epoch ends
    one = stream(0, 1, 8)
    for _ in range(5):
        one.next_indices()
    st = {"data": [one.state_dict()], "world_size": 1}
    ranks = []
    for r in range(2):
        s = stream(r, 2, 4)
        s.load_state_dict(state_mod.data_position(st, r, 2))
        ranks.append(s)
    assert ranks[0].mixture_counts.tolist() == one.mixture_counts.tolist()
    for want in full[5:]:
        got = [s.next_indices() for s in ranks]
        assert sorted(got[0] + got[1]) == sorted(want)
        assert [got[i % 2][i // 2] for i in range(8)] == want  # rank r holds positions r, r+2, ...
    assert ranks[1].mixture_counts.tolist() == ref.mixture_counts.tolist()


def test_bad_streams_are_refused_naming_the_key(tmp_path, folders, capsys):
    """Unknown stream key, two weights, relative beside absolute, a missing folder, streams of two tokenizers:
    `mptkit train` stops before any step with one line naming the stream key (and the folder)."""
    a, b = str(folders["a"]), str(folders["b"])
    cases = [
        ({"x": {"local": a, "proportoin": 1}}, "unknown key 'train_loader.dataset.streams.x.proportoin'.*proportion"),
        ({"x": {"local": a, "proportion": 1, "repeat": 2}}, r"streams.x: give at most one of.*proportion and repeat"),
        ({"x": {"local": a, "proportion": 1}, "y": {"local": b, "repeat": 2}}, r"streams.y: relative .* cannot be mixed"),
        ({"x": {"local": a}, "y": {"local": str(tmp_path / "nope")}}, r"streams.y.local: .*nope does not exist"),
        ({"x": {"local": a}, "y": {"local": str(folders["other"])}},
         r"streams.y \(.*other\): .*not the tokenizer of train_loader.dataset.streams.x"),
    ]
    for streams, msg in cases:
        assert main(["train", str(_write(tmp_path, _recipe(tmp_path, folders, streams)))]) == EXIT_NOT_RETRYABLE
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        import re

        assert re.search(msg, err), (msg, err)
    with pytest.raises(ConfigError, match="either local .* or streams"):
        from mptkit.train.config import config_from_dict

        config_from_dict(_recipe(tmp_path, folders, {"x": {"local": a}}, dataset={"local": a}))
    assert not (tmp_path / "run" / "summary.json").exists()


def _train_process(recipe: Path, save: Path, kill_after_step: int | None = None):
    import os
    import subprocess
    import sys


    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "mptkit.cli", "train", str(recipe)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_step is not None:
        kill_after_checkpoint(p, save, kill_after_step, poll=0.005)
    _, err = p.communicate(timeout=300)
    return p.returncode, err.decode()


@pytest.mark.slow
def test_sigkill_mid_mixture_then_autoresume_is_bitwise_identical(tmp_path, folders):
    """`mptkit train` on a mixture (upsampled A, subsampled B, 2.5 epochs), killed with SIGKILL after a
    mid-epoch checkpoint and run again (autoresume): the final weights and the realised stream counts equal an
    uninterrupted run's, bit for bit."""
    import signal

    import torch
    from safetensors.torch import load_file

    from mptkit.train import checkpoint as ck

    streams = {"a": {"local": str(folders["a"]), "proportion": 3}, "b": {"local": str(folders["b"]),
                                                                          "proportion": 1}}
    runs = {}
    for name in ("full", "killed"):
        t = tmp_path / name
        t.mkdir()
        d = _recipe(t, folders, streams, dataset={"epoch_size": 64}, max_duration="36ba", save_interval="3ba",
                    save_folder=str(t / "ck"), autoresume=True, save_num_checkpoints_to_keep=2)
        runs[name] = (_write(t, d), t / "ck")
    rc, err = _train_process(*runs["full"])
    assert rc == 0, err[-2000:]
    rc, err = _train_process(*runs["killed"], kill_after_step=9)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    before = ck.find_latest_checkpoint(runs["killed"][1])
    assert before is not None and int(before.name.split("-ba")[1]) % 8, before  # mid-epoch (8 batches an epoch)
    rc, err = _train_process(*runs["killed"])
    assert rc == 0 and f"resumed from {before}" in err, err[-2000:]
    a = load_file(str(ck.find_latest_checkpoint(runs["full"][1]) / "model" / "model.safetensors"))
    last = ck.find_latest_checkpoint(runs["killed"][1])
    assert last.name.endswith("-ba36")
    b = load_file(str(last / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s_full, s_killed = (json.loads((tmp_path / n / "run" / "summary.json").read_text()) for n in ("full", "killed"))
    assert s_full["mixture"] == s_killed["mixture"] and s_full["mixture"]["streams"]["a"]["samples"] > 0
