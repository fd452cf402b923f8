"""Reading llm-foundry MDS datasets (mptkit.data.mds): natively for uncompressed shards and for zstd / gz / bz2
ones (decompressed into mptkit's cache), through the optional mosaicml-streaming package for brotli / snappy
(with a clear message when it is absent). The MDS
folders of the comparison tests are written by mosaicml-streaming's own MDSWriter, run in a child process
(streaming_child.py) from the --no-deps install .ci/run makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mptkit.data.mds import MDSTokenDataset, open_token_dataset
from mptkit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
# mosaicml-streaming installed with --no-deps (.ci/run): its own MDSWriter runs in streaming_child.py
STREAMING_DIR = Path(os.environ.get("MPTKIT_STREAMING_DIR") or ROOT / ".cache" / "mosaicml-streaming")


def _run_streaming(tmp_path, writes, read=()) -> dict:
    """Write each (folder, int32 rows, size_limit) with mosaicml-streaming's MDSWriter and read each folder in
    ``read`` with its StreamingDataset (to ``folder.read.npy``), in one child process; its report."""
    if not (STREAMING_DIR / "streaming" / "base" / "format" / "mds" / "writer.py").is_file():
        pytest.skip(f"mosaicml-streaming's own MDSWriter is not installed in {STREAMING_DIR}: .ci/run installs it "
                    "(pip install --no-deps --target .cache/mosaicml-streaming mosaicml-streaming zstd brotli "
                    "python-snappy cramjam catalogue), or set MPTKIT_STREAMING_DIR")
    job = {"write": [], "read": [str(f) for f in read]}
    for k, (folder, rows, size_limit, *compression) in enumerate(writes):
        np.save(tmp_path / f"rows{k}.npy", np.asarray(rows, dtype=np.int32))
        job["write"].append({"out": str(folder), "rows": str(tmp_path / f"rows{k}.npy"), "size_limit": size_limit,
                             "compression": compression[0] if compression else None})
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("streaming_child.py")), str(STREAMING_DIR),
                        str(tmp_path / "job.json")], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ndarray_dynamic(arr: np.ndarray) -> bytes:
    """MDS 'ndarray:<dtype>' value: [ndim<<2 | shape dtype code][shape][values]."""
    shape = np.array(arr.shape, dtype=np.uint16)
    return bytes([(arr.ndim << 2) | 1]) + shape.tobytes() + arr.tobytes()


def _write_mds(folder, samples, columns, *, per_shard=3, compression=None):
    """A small MDS writer following the format spec: samples = list of {column: encoded bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    shards = []
    for k in range(0, len(samples), per_shard):
        chunk = samples[k:k + per_shard]
        blobs = []
        for smp in chunk:
            sizes = np.array([len(smp[c]) for c in names if columns[c][1] is None], dtype=np.uint32)
            blobs.append(sizes.tobytes() + b"".join(smp[c] for c in names))
        config = b'{"version": 2}'
        n = len(blobs)
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.uint32) + 4 + 4 * (n + 1) + len(config)
        data = np.uint32(n).tobytes() + offsets.tobytes() + config + b"".join(blobs)
        name = f"shard.{k // per_shard:05d}.mds"
        (folder / name).write_bytes(data)
        shards.append({"column_encodings": [columns[c][0] for c in names], "column_names": names,
                       "column_sizes": [columns[c][1] for c in names], "compression": compression, "format": "mds",
                       "hashes": [], "raw_data": {"basename": name, "bytes": len(data), "hashes": {}},
                       "samples": n, "size_limit": 1 << 26, "version": 2, "zip_data": None})
        if compression:
            (folder / name).rename(folder / (name + ".zstd"))
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


ROWS = np.arange(56, dtype=np.int32).reshape(7, 8)
ROWS[2, 3] = 0


def test_native_reader_ndarray_and_bytes_columns(tmp_path):
    """Uncompressed MDS folders are read without mosaicml-streaming: an 'ndarray:int32' tokens column after a
    variable-size text column (current llm-foundry), a 'bytes' int64 column in a split subfolder (older
    llm-foundry), and a static-shape column, across several shard files; sequence_id follows EOS."""
    _write_mds(tmp_path / "a", [{"id": f"doc{i}".encode(), "tokens": _ndarray_dynamic(r)} for i, r in enumerate(ROWS)],
               {"id": ("str", None), "tokens": ("ndarray:int32", None)})
    ds = open_token_dataset(tmp_path / "a", eos_token_id=0, max_seq_len=8)
    assert isinstance(ds, MDSTokenDataset) and len(ds) == 7
    assert [ds[i]["input_ids"].tolist() for i in range(7)] == ROWS.tolist()
    assert ds[2]["sequence_id"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ds[-1]["input_ids"].tolist() == ROWS[6].tolist()
    _write_mds(tmp_path / "b" / "train", [{"tokens": r.astype(np.int64).tobytes()} for r in ROWS],
               {"tokens": ("bytes", None)})
    old = open_token_dataset(tmp_path / "b", "train")
    assert [old[i]["input_ids"].tolist() for i in range(7)] == ROWS.tolist()
    _write_mds(tmp_path / "c", [{"tokens": r.astype(np.uint16).tobytes()} for r in ROWS],
               {"tokens": ("ndarray:uint16:8", 16)})
    assert MDSTokenDataset(tmp_path / "c")[4]["input_ids"].tolist() == ROWS[4].tolist()
    with pytest.raises(DataError, match="expected max_seq_len 4"):
        MDSTokenDataset(tmp_path / "a", max_seq_len=4)[0]


def test_refusals_are_clear(tmp_path):
    """A shard compressed with a codec mptkit does not decompress (brotli) names mosaicml-streaming; an index
    naming a compressed shard whose file is absent names the file; a pickled tokens column is refused (never
    unpickled); a missing tokens column, a truncated shard and a non-MDS folder are DataErrors."""
    try:
        import streaming  # noqa: F401
        have_streaming = True
    except ImportError:
        have_streaming = False
    if not have_streaming:
        _write_mds(tmp_path / "b", [{"tokens": r.tobytes()} for r in ROWS], {"tokens": ("bytes", None)},
                   compression="br:7")
        with pytest.raises(DataError, match="'br:7'.*mosaicml-streaming"):
            MDSTokenDataset(tmp_path / "b")
    _write_mds(tmp_path / "z", [{"tokens": r.tobytes()} for r in ROWS], {"tokens": ("bytes", None)},
               compression="zstd:7")
    with pytest.raises(DataError, match="compressed shard file .* is missing"):
        MDSTokenDataset(tmp_path / "z")
    _write_mds(tmp_path / "p", [{"tokens": b"\x80\x04N."} for _ in range(2)], {"tokens": ("pkl", None)})
    with pytest.raises(DataError, match="never pickles"):
        MDSTokenDataset(tmp_path / "p")[0]
    _write_mds(tmp_path / "t", [{"text": b"hello"}], {"text": ("str", None)})
    with pytest.raises(DataError, match="no 'tokens' column"):
        MDSTokenDataset(tmp_path / "t")
    _write_mds(tmp_path / "x", [{"tokens": r.tobytes()} for r in ROWS], {"tokens": ("bytes", None)})
    f = tmp_path / "x" / "shard.00000.mds"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        MDSTokenDataset(tmp_path / "x")
    with pytest.raises(DataError, match="neither"):
        open_token_dataset(tmp_path / "nothing")


def test_mosaicml_streaming_writer_and_reader_agree_with_mptkit(tmp_path):
    """mosaicml-streaming's own MDSWriter (run in a child process: streaming_child.py) writes ROWS as
    llm-foundry's convert_dataset_hf.py does, with a small size_limit so the rows spread over many shards;
    mptkit's native reader reads them back exactly, and streaming's
    own StreamingDataset reads this file's spec writer's folder as it does its own."""
    _write_mds(tmp_path / "m", [{"tokens": _ndarray_dynamic(r)} for r in ROWS], {"tokens": ("ndarray:int32", None)})
    report = _run_streaming(tmp_path, [(tmp_path / "s", ROWS, 100)], read=[tmp_path / "m", tmp_path / "s"])
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["shards"]) > 2 and {s["column_encodings"][0] for s in index["shards"]} == {"ndarray:int32"}
    ds = MDSTokenDataset(tmp_path / "s")
    assert ds._native is not None and len(ds) == 7
    assert [ds[i]["input_ids"].tolist() for i in range(7)] == ROWS.tolist()
    for name in ("m", "s"):
        assert np.load(tmp_path / f"{name}.read.npy").tolist() == ROWS.tolist()
    assert report["writer_file"].endswith("streaming/base/format/mds/writer.py")


def test_compressed_shards_from_mosaicml_streamings_writer_are_read_without_it(tmp_path, monkeypatch):
    """llm-foundry's converters take --compression (zstd is the common choice): shards written by streaming's own
    MDSWriter with zstd, gz and bz2 are decompressed by mptkit itself (zstd through the zstandard package)
    into its cache, never into the user's folder, and read as the same rows; a second open reuses the cache;
    brotli is refused naming the codec; a damaged compressed shard names its file."""
    monkeypatch.setenv("MPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    writes = [(tmp_path / c, ROWS, 100, c) for c in ("zstd", "gz", "bz2", "br")]
    _run_streaming(tmp_path, writes)
    for c in ("zstd", "gz", "bz2"):
        folder = tmp_path / c
        index = json.loads((folder / "index.json").read_text())
        assert len(index["shards"]) > 2 and all(s["compression"].split(":")[0] == c for s in index["shards"])
        before = sorted(p.name for p in folder.iterdir())
        assert not any(p.endswith(".mds") for p in before)  # only the compressed shards are there
        ds = MDSTokenDataset(folder)
        assert ds._native is not None and [ds[i]["input_ids"].tolist() for i in range(len(ds))] == ROWS.tolist()
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written beside the user's data
        cached = sorted((tmp_path / "cache" / "mds").rglob("*.mds"))
        stamps = [p.stat().st_mtime_ns for p in cached]
        again = MDSTokenDataset(folder)
        assert [again[i]["input_ids"].tolist() for i in range(len(again))] == ROWS.tolist()
        assert [p.stat().st_mtime_ns for p in cached] == stamps  # read from the cache, not decompressed again
    with pytest.raises(DataError, match=r"'br:?\d*'.*mptkit reads zstd, gz, bz2|mosaicml-streaming"):
        MDSTokenDataset(tmp_path / "br")
    bad = tmp_path / "zstd_bad"
    shutil.copytree(tmp_path / "zstd", bad)
    first = json.loads((bad / "index.json").read_text())["shards"][0]
    zfile = bad / first["zip_data"]["basename"]
    zfile.write_bytes(b"\0" * zfile.stat().st_size)  # same size, not zstd
    with pytest.raises(DataError, match=r"cannot decompress as zstd"):
        MDSTokenDataset(bad)


def test_training_on_an_mds_folder(tmp_path):
    """The trainer trains on an MDSTokenDataset passed from Python (the same items as prepared shards)."""
    from mptkit.train.trainer import Trainer
    from tests.helpers import make_cfg, pattern_data

    rows = pattern_data(16).numpy().astype(np.int32)
    _write_mds(tmp_path / "mds", [{"tokens": _ndarray_dynamic(r)} for r in rows], {"tokens": ("ndarray:int32", None)},
               per_shard=5)
    ds = MDSTokenDataset(tmp_path / "mds", eos_token_id=0, max_seq_len=32)
    summary = Trainer(make_cfg(tmp_path / "py", max_duration="2ba"), train_dataset=ds).fit()
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 8 * 32


def test_mptkit_train_on_mds_gives_the_batches_of_the_prepared_folder(tmp_path, make_tokenizer, capsys):
    """`mptkit train` reads an MDS folder (index.json) where a prepared folder (manifest.json) goes: the same
    tokens written as llm-foundry MDS by mosaicml-streaming's own MDSWriter give exactly the prepared folder's batches
    (input_ids and sequence_id, over an epoch and into the next), the same trained weights, and evaluate to the
    same perplexity with `mptkit eval perplexity`; `mptkit data inspect` summarizes it."""
    import json as _json

    import torch
    import yaml
    from safetensors.torch import load_file

    from mptkit.cli import main
    from mptkit.data.prepare import prepare_dataset
    from mptkit.data.shards import TokenDataset
    from mptkit.train.config import config_from_dict
    from mptkit.train.data import BatchStream, make_sampler
    from mptkit.train.distributed import DistInfo
    from mptkit.train.recipe_data import build_data

    tok = make_tokenizer(tmp_path / "tok")
    src = tmp_path / "c.jsonl"
    src.write_text("".join(_json.dumps({"text": f"doc {i}: " + "word " * (i % 9 + 2)}) + "\n" for i in range(120)))
    prepare_dataset([str(src)], tok, tmp_path / "prep", 16, val_fraction=0.2, progress=False)
    # the same token rows written by mosaicml-streaming's own MDSWriter, into llm-foundry's split folders
    # (convert_dataset_hf.py: train/, val_small/), a few samples per shard
    writes = []
    for split, folder in (("train", "train"), ("val", "val_small")):
        ds = TokenDataset(tmp_path / "prep", split)
        writes.append((tmp_path / "mds" / folder, np.stack([ds.row(i) for i in range(len(ds))]), 400))
    _run_streaming(tmp_path, writes)
    assert len(json.loads((tmp_path / "mds" / "train" / "index.json").read_text())["shards"]) > 2

    def recipe(local, name: str) -> dict:
        return {"max_seq_len": 16, "tokenizer": {"name": str(tok)},
                "model": {"name": "mpt_causal_lm", "d_model": 32, "n_heads": 2, "n_layers": 2, "expansion_ratio": 2,
                          "max_seq_len": 16, "vocab_size": 448, "attn_config": {"alibi": True}},
                "train_loader": {"name": "text", "dataset": {"local": str(local), "split": "train"}},
                "eval_loader": {"name": "text", "dataset": {"local": str(local), "split": "val"}},
                "max_duration": "3ba", "global_train_batch_size": 8, "device_train_microbatch_size": 8,
                "eval_interval": "0ba", "save_interval": "0ba", "run_folder": str(tmp_path / name),
                "export_folder": str(tmp_path / name / "hf"), "run_name": name, "progress_bar": False,
                "log_to_console": False, "peak_tflops": 1.0, "torch_threads": 1, "seed": 1}

    batches = {}
    for name, local in (("prep", tmp_path / "prep"), ("mds", tmp_path / "mds")):
        _, train, ev, _ = build_data(config_from_dict(recipe(local, name)), DistInfo())
        assert ev is not None and len(ev) == len(TokenDataset(tmp_path / "prep", "val"))
        st = BatchStream(train, make_sampler(len(train), seed=1, shuffle=True, rank=0, world_size=1), 8)
        batches[name] = [st.next_batch() for _ in range(st.batches_per_epoch + 2)]
    assert type(train).__name__ == "MDSTokenDataset"
    for a, b in zip(batches["prep"], batches["mds"]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["sequence_id"], b["sequence_id"])
    for name, local in (("prep", tmp_path / "prep"), ("mds", tmp_path / "mds")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe(local, name)))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
    w = [load_file(str(tmp_path / n / "hf" / "model.safetensors")) for n in ("prep", "mds")]
    assert w[0].keys() == w[1].keys() and all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    ppl = []
    for local in (tmp_path / "prep", tmp_path / "mds"):
        out = tmp_path / f"ppl-{local.name}.json"
        assert main(["eval", "perplexity", str(tmp_path / "prep" / "hf"), "--data", str(local),
                     "--json", str(out)]) == 0
        ppl.append(_json.loads(out.read_text()))
    assert ppl[0]["perplexity"] == ppl[1]["perplexity"] and ppl[0]["tokens"] == ppl[1]["tokens"]
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "mds"), "--show", "1", "--tokenizer", str(tok)]) == 0
    out = capsys.readouterr().out
    n_train = len(TokenDataset(tmp_path / "prep"))
    assert f"samples      train {n_train:,} x 16 tokens" in out and "--- train[0]" in out
