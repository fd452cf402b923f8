"""Preparation past one machine: `mptkit data prepare --num-shards N --shard-index I` in separate processes,
then `mptkit data merge`, writes the same dataset as one `mptkit data prepare` (shard bytes and manifest)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mptkit.cli import main
from mptkit.data.prepare import prepare_dataset
from mptkit.data.prepare_parts import merge_parts, shard_of_files
from mptkit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _corpus(folder: Path) -> Path:
    import argparse
    import textwrap

    folder.mkdir(parents=True)  # 15 files of code, one of JSON lines (one of them malformed)
    lines = "".join(inspect.getsource(m) for m in (textwrap, argparse)).splitlines(keepends=True)[:1500]
    for i in range(0, len(lines), 100):
        (folder / f"m{i:05d}.py").write_text("".join(lines[i:i + 100]))
    docs = [json.dumps({"text": f"record {i} " + "x " * (i % 17)}) for i in range(200)]
    (folder / "records.jsonl").write_text("\n".join(docs[:50] + ["{not json"] + docs[50:]) + "\n")
    return folder


def _same_dataset(a: Path, b: Path) -> None:
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    ma.pop("stats"), mb.pop("stats")  # timings and counters of the run: differ between any two runs
    assert ma == mb
    files = [s["file"] for sp in ma["splits"].values() for s in sp["shards"]]
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.slow
def test_parts_in_separate_processes_merge_to_the_one_machine_dataset(tmp_path, make_tokenizer, capsys):
    """Three parts prepared by `mptkit data prepare` at once (two in processes of their own), merged (named in any order) with
    `mptkit data merge`: the same manifest (but its stats) and byte-identical shards as a one-machine
    prepare, bad inputs counted alike; a re-merge is a no-op; the merged folder trains like any other."""
    corpus, tok = _corpus(tmp_path / "corpus"), make_tokenizer(tmp_path / "tok")
    common = [str(corpus), "--tokenizer", str(tok), "--max-seq-len", "32", "--val-fraction", "0.1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "mptkit.cli", "-q", "data", "prepare", *common, "--out",
                               str(tmp_path / "parts" / f"p{i}"), "--num-shards", "3", "--shard-index", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 2)]
    assert main(["-q", "data", "prepare", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["-q", "data", "prepare", *common, "--out", str(tmp_path / "parts" / "p1"), "--num-shards", "3",
                 "--shard-index", "1"]) == 0  # (a third process would only add start-up time)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        assert b"part " in out
    parts = [str(tmp_path / "parts" / f"p{i}") for i in (2, 0, 1)]
    assert main(["-q", "data", "merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    _same_dataset(tmp_path / "one", tmp_path / "merged")
    m = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert m["bad_inputs"]["counts"] == {"malformed_json": 1} and m["stats"]["merged_parts"] == 3
    owners = [json.loads((Path(p) / "part.json").read_text())["range"] for p in parts]
    n = len(json.loads((Path(parts[0]) / "part.json").read_text())["listing"])
    assert sorted(owners) == [[0, owners[1][1]], [owners[1][1], owners[2][1]], [owners[2][1], n]] and n == 1 + len(
        list(corpus.glob("*.py")))
    stamp = (tmp_path / "merged" / "manifest.json").stat().st_mtime_ns
    assert main(["-q", "data", "merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "manifest.json").stat().st_mtime_ns == stamp  # up to date: nothing done


def test_parts_no_wrap_small_shards_and_an_empty_part(tmp_path, make_tokenizer):
    """Through the Python API: no-wrap packing, shards of a few samples (several files per split), a BOS, and
    more parts than files can fill (an empty part): still the one-machine dataset."""
    corpus, tok = _corpus(tmp_path / "corpus"), make_tokenizer(tmp_path / "tok")
    files = [*sorted(corpus.glob("*.py"))[:2], corpus / "records.jsonl"]
    kw = {"wrap": False, "shard_bytes": 7 * 16 * 2, "part_bytes": 3000, "bos_text": "<|im_start|>", "val_fraction": 0.2,
          "progress": False, "num_workers": 1}
    prepare_dataset([str(f) for f in files], tok, tmp_path / "one", 16, **kw)
    for i in range(5):
        prepare_dataset([str(f) for f in files], tok, tmp_path / f"p{i}", 16, num_shards=5, shard_index=i, **kw)
    assert any(not json.loads((tmp_path / f"p{i}" / "part.json").read_text())["chunks"] for i in range(5))
    merge_parts([tmp_path / f"p{i}" for i in range(5)], tmp_path / "merged", progress=False)
    _same_dataset(tmp_path / "one", tmp_path / "merged")
    assert len(json.loads((tmp_path / "one" / "manifest.json").read_text())["splits"]["train"]["shards"]) > 3
    assert shard_of_files([10, 10, 10, 10], 2) == [0, 0, 1, 1] and shard_of_files([100, 1, 1], 3) == [0, 2, 2]


def test_bad_parts_are_refused(tmp_path, make_tokenizer, capsys):
    """A missing part, a part from other options, an unfinished part, a part folder inside the corpus, a bad
    --shard-index: one line naming the folder / flag, and no output folder written."""
    corpus, tok = _corpus(tmp_path / "corpus"), make_tokenizer(tmp_path / "tok")
    files = [str(f) for f in sorted(corpus.iterdir())[:4]]
    for i in range(2):
        prepare_dataset(files, tok, tmp_path / f"p{i}", 16, num_shards=2, shard_index=i, progress=False)
    prepare_dataset(files, tok, tmp_path / "q1", 16, num_shards=2, shard_index=1, progress=False, val_fraction=0.3)
    with pytest.raises(DataError, match=r"parts \[1\] of 2 are missing"):
        merge_parts([tmp_path / "p0"], tmp_path / "out")
    with pytest.raises(DataError, match=r"q1: settings differs from .*p0's"):
        merge_parts([tmp_path / "p0", tmp_path / "q1"], tmp_path / "out")
    (tmp_path / "p1" / "part.json").unlink()
    with pytest.raises(DataError, match=r"p1: no part.json, not a finished part"):
        merge_parts([tmp_path / "p0", tmp_path / "p1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    args = ["data", "prepare", str(corpus), "--tokenizer", str(tok), "--max-seq-len", "16"]
    assert main([*args, "--out", str(corpus / "part"), "--num-shards", "2", "--shard-index", "0"]) == 2
    assert "must not lie inside the input folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--num-shards", "2", "--shard-index", "2"]) == 2
    assert "--shard-index: expected 0 .. 1" in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX",
                                                            "JOB_COMPLETION_INDEX")}
    os.environ.clear()
    os.environ.update({**env, "SLURM_ARRAY_TASK_ID": "1"})
    try:
        assert main(["-q", *args[:2], *files, *args[3:], "--out", str(tmp_path / "s1"), "--num-shards", "2"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert json.loads((tmp_path / "s1" / "part.json").read_text())["shard_index"] == 1
