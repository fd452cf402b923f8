"""Reading llm-foundry MDS datasets (mptkit.data.mds): natively for uncompressed shards, through the
optional mosaicml-streaming package for compressed ones (with a clear message when it is absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mptkit.data.mds import MDSTokenDataset, open_token_dataset
from mptkit.errors import DataError


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
    """Compressed shards without mosaicml-streaming name the extra; a pickled tokens column is refused (never
    unpickled); a missing tokens column, a truncated shard and a non-MDS folder are DataErrors."""
    try:
        import streaming  # noqa: F401
        have_streaming = True
    except ImportError:
        have_streaming = False
    if not have_streaming:
        _write_mds(tmp_path / "z", [{"tokens": r.tobytes()} for r in ROWS], {"tokens": ("bytes", None)},
                   compression="zstd:7")
        with pytest.raises(DataError, match="mosaicml-streaming"):
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


def test_same_as_mosaicml_streaming_when_installed(tmp_path):
    """Where mosaicml-streaming is installed: what its MDSWriter writes (as llm-foundry does) reads back the
    same natively, and the test writer's files read the same through StreamingDataset."""
    streaming = pytest.importorskip("streaming")
    with streaming.MDSWriter(out=str(tmp_path / "s"), columns={"tokens": "ndarray:int32"}) as w:
        for r in ROWS:
            w.write({"tokens": r})
    ds = MDSTokenDataset(tmp_path / "s")
    assert ds._native is not None and [ds[i]["input_ids"].tolist() for i in range(7)] == ROWS.tolist()
    _write_mds(tmp_path / "m", [{"tokens": _ndarray_dynamic(r)} for r in ROWS], {"tokens": ("ndarray:int32", None)})
    sd = streaming.StreamingDataset(local=str(tmp_path / "m"), shuffle=False)
    assert [sd[i]["tokens"].tolist() for i in range(7)] == ROWS.tolist()


def test_training_on_an_mds_folder(tmp_path):
    """What works today: the trainer trains on an MDSTokenDataset passed from Python (the same items as
    prepared shards); a recipe whose train_loader.dataset.local is an MDS folder is refused before any step,
    with the two ways forward in the message."""
    from mptkit.train.trainer import Trainer
    from tests.helpers import make_cfg, pattern_data

    rows = pattern_data(16).numpy().astype(np.int32)
    _write_mds(tmp_path / "mds", [{"tokens": _ndarray_dynamic(r)} for r in rows], {"tokens": ("ndarray:int32", None)},
               per_shard=5)
    ds = MDSTokenDataset(tmp_path / "mds", eos_token_id=0, max_seq_len=32)
    summary = Trainer(make_cfg(tmp_path / "py", max_duration="2ba"), train_dataset=ds).fit()
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 8 * 32
    cfg = make_cfg(tmp_path / "recipe", max_duration="2ba",
                   train_loader={"name": "text", "dataset": {"local": str(tmp_path / "mds"), "split": "train"}})
    with pytest.raises(DataError, match=r"is an MDS dataset \(index.json\).*mptkit data prepare.*MDSTokenDataset"):
        Trainer(cfg).fit()
