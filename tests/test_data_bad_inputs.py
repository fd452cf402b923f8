"""Bad input: each kind is reported with file and line, skipped and counted by default, fatal with
strict=True / --strict, and never a traceback from the CLI."""

from __future__ import annotations

import json

import pytest

from mptkit.cli import main
from mptkit.data.prepare import prepare_dataset
from mptkit.data.shards import TokenDataset
from mptkit.data.tokenizer import train_tokenizer
from mptkit.errors import DataError

GOOD = "def good():\n    return 'a perfectly fine document with enough words in it'\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(None, 512, tmp_path_factory.mktemp("tok") / "bpe", max_files=4)


def _corpus(d):
    """One good file per format plus one file (or line) for every kind of bad input."""
    d.mkdir()
    (d / "good.txt").write_text(GOOD)
    (d / "bad_utf8.txt").write_bytes(b"line one\nline two \xff\xfe broken\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.md").write_text("  \n\n")
    (d / "binary.txt").write_bytes(b"abc\x00\x01\x02")
    (d / "data.jsonl").write_text(
        json.dumps({"text": GOOD}) + "\n"            # line 1 good
        + '{"text": "unterminated\n'                 # line 2 malformed
        + json.dumps({"body": "no text"}) + "\n"     # line 3 missing field
        + json.dumps({"text": 42}) + "\n"            # line 4 not a string
        + json.dumps({"text": ""}) + "\n"            # line 5 empty text
        + "\n"                                       # blank line: ignored
    )
    with open(d / "data.jsonl", "ab") as f:
        f.write(b'{"text": "bad \xff utf8"}\n')      # line 7 invalid UTF-8
    (d / "empty.jsonl").write_text("")
    (d / "t.csv").write_text("id,body\n1,x\n")       # no text column
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": GOOD}).encode() + b"\n")  # BOM: fine
    return d


EXPECTED = {"invalid_utf8": 2, "empty_file": 3, "binary_file": 1, "malformed_json": 1, "missing_text_field": 2,
            "non_string_text": 1, "empty_text": 1}


def test_bad_inputs_are_skipped_and_counted_with_file_and_line(tmp_path, tok_dir, caplog):
    """Default: every bad input is skipped, counted by kind in the manifest, and reported as file:line;
    the good documents are all there."""
    d = _corpus(tmp_path / "c")
    with caplog.at_level("WARNING"):
        m = prepare_dataset([str(d)], tok_dir, tmp_path / "out", 8, val_fraction=0.0, progress=False)
    assert m["bad_inputs"]["counts"] == EXPECTED, m["bad_inputs"]
    ex = "\n".join(m["bad_inputs"]["examples"])
    assert f"{d / 'bad_utf8.txt'}:2: invalid UTF-8" in ex
    assert f"{d / 'data.jsonl'}:2: malformed JSON" in ex
    assert f"{d / 'data.jsonl'}:3: no field 'text'" in ex
    assert f"{d / 'data.jsonl'}:4: field 'text' is int" in ex
    assert f"{d / 'data.jsonl'}:7: invalid UTF-8" in ex
    assert f"{d / 't.csv'}:1: no column 'text'" in ex
    assert "skipped bad input" in caplog.text
    assert sum(s["documents"] for s in m["sources"]) == 3  # good.txt, data.jsonl:1, bom.jsonl:1
    assert len(TokenDataset(tmp_path / "out")) > 0


@pytest.mark.parametrize("name,match", [
    ("bad_utf8.txt", r"bad_utf8.txt:2: invalid UTF-8"),
    ("empty.txt", r"empty.txt: empty file"),
    ("binary.txt", r"binary.txt: looks binary"),
    ("data.jsonl", r"data.jsonl:2: malformed JSON"),
    ("t.csv", r"t.csv:1: no column 'text'"),
])
def test_strict_fails_on_first_bad_input(tmp_path, tok_dir, name, match):
    """strict=True: the first bad input raises DataError naming the file and line; nothing looks complete."""
    d = _corpus(tmp_path / "c")
    with pytest.raises(DataError, match=match):
        prepare_dataset([str(d / "good.txt"), str(d / name)], tok_dir, tmp_path / "out", 8, strict=True,
                        progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, tok_dir):
    """A tokenizer with more tokens than the model's vocab_size is refused before any work."""
    (tmp_path / "a.txt").write_text(GOOD)
    with pytest.raises(DataError, match=r"512 tokens but the model's vocab_size is 256"):
        prepare_dataset([str(tmp_path / "a.txt")], tok_dir, tmp_path / "out", 8, model_vocab_size=256,
                        progress=False)


def test_nothing_usable_and_bad_arguments(tmp_path, tok_dir):
    """Only-bad inputs, a missing input, a glob matching nothing, and a corpus too small for one sample each
    raise a DataError that says so."""
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="no usable documents"):
        prepare_dataset([str(tmp_path / "e.txt")], tok_dir, tmp_path / "o1", 8, progress=False)
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset([str(tmp_path / "missing.txt")], tok_dir, tmp_path / "o2", 8, progress=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare_dataset([str(tmp_path / "*.parquet")], tok_dir, tmp_path / "o3", 8, progress=False)
    (tmp_path / "s.txt").write_text("hi")
    with pytest.raises(DataError, match="no training sample"):
        prepare_dataset([str(tmp_path / "s.txt")], tok_dir, tmp_path / "o4", 4096, progress=False)


def test_cli_prints_one_line_errors_and_strict(tmp_path, tok_dir, capsys):
    """The CLI: bad input with --strict exits 2 with one 'mptkit data: error: file:line: ...' line (no
    traceback); without --strict it succeeds and prints the skipped counts; a bad tokenizer path is one line."""
    d = _corpus(tmp_path / "c")
    rc = main(["-q", "data", "prepare", str(d / "data.jsonl"), "--tokenizer", str(tok_dir), "--max-seq-len", "8",
               "--out", str(tmp_path / "out"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "data.jsonl:2: malformed JSON" in err
    rc = main(["-q", "data", "prepare", str(d), "--tokenizer", str(tok_dir), "--max-seq-len", "8", "--out",
               str(tmp_path / "out"), "--val-fraction", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "bad inputs" in out and "malformed_json 1" in out
    rc = main(["-q", "data", "prepare", "--tokenizer", str(tmp_path / "nope"), "--max-seq-len", "8", "--out",
               str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    rc = main(["-q", "data", "inspect", str(tmp_path / "out"), "--verify"])
    assert rc == 0 and "verified" in capsys.readouterr().out


# ------------------------------------------------------------------ a re-run never costs the previous dataset
def _jsonl(path, n=60, field="text"):
    path.write_text("".join(json.dumps({field: f"{GOOD} number {i} " * (1 + i % 5)}) + "\n" for i in range(n)))
    return path


def _rows(folder):
    from mptkit.data.mds import open_token_dataset  # the reader the trainer uses

    ds = open_token_dataset(folder, "train", verify=True)
    return [ds.row(i).tolist() for i in range(len(ds))]


def test_failed_rerun_with_changed_options_keeps_the_previous_dataset(tmp_path, tok_dir, capsys):
    """A good prepare, then re-runs that fail (a typo'd --text-field: no usable document; a --max-seq-len too
    large for one sample): the old manifest and shards are untouched and still read (and verify) as before."""
    src = _jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare_dataset([str(src)], tok_dir, out, 16, val_fraction=0.0, progress=False)
    manifest = (out / "manifest.json").read_bytes()
    rows = _rows(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    with pytest.raises(DataError, match="no usable documents"):
        prepare_dataset([str(src)], tok_dir, out, 16, text_field="txt", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="no training sample"):
        prepare_dataset([str(src)], tok_dir, out, 1 << 20, val_fraction=0.0, progress=False)
    rc = main(["-q", "data", "prepare", str(src), "--tokenizer", str(tok_dir), "--max-seq-len", "16", "--out",
               str(out), "--text-field", "bdy", "--val-fraction", "0", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable documents" in err and len(err.strip().splitlines()) == 1
    assert (out / "manifest.json").read_bytes() == manifest and _rows(out) == rows
    now = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in now if not f.startswith(".parts/")] == files  # .parts/: tokenized parts, for the next run


def test_killed_prepare_keeps_the_previous_dataset_and_the_next_run_cleans_up(tmp_path, tok_dir, monkeypatch):
    """A re-run with other options interrupted mid-shard (an exception, and a real SIGKILL of the process)
    leaves the previous dataset complete and readable; the next run removes the temporary files the killed
    one left and gives exactly what an uninterrupted run gives."""
    import os
    import signal
    import subprocess
    import sys

    from mptkit.data import prepare as prep

    src = _jsonl(tmp_path / "c.jsonl", n=200)
    out = tmp_path / "out"
    kw = {"val_fraction": 0.0, "progress": False, "shard_bytes": 16 * 2 * 8, "part_bytes": 2000}
    prepare_dataset([str(src)], tok_dir, out, 16, **kw)
    manifest, rows = (out / "manifest.json").read_bytes(), _rows(out)
    clean = prepare_dataset([str(src)], tok_dir, tmp_path / "clean", 8, **kw)

    calls = {"n": 0}
    real = prep._ShardWriter.write

    def interrupted(self, samples):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill mid-shard")
        return real(self, samples)

    monkeypatch.setattr(prep._ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(src)], tok_dir, out, 8, **kw)
    monkeypatch.setattr(prep._ShardWriter, "write", real)
    assert (out / "manifest.json").read_bytes() == manifest and _rows(out) == rows

    # a real kill: the process dies inside a shard write, nothing of Python's cleanup runs
    script = (
        "import os, signal, sys\n"
        "from mptkit.data import prepare as prep\n"
        "real = prep._ShardWriter.write\n"
        "n = [0]\n"
        "def write(self, samples):\n"
        "    real(self, samples)\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "prep._ShardWriter.write = write\n"
        f"prep.prepare_dataset([{str(src)!r}], {str(tok_dir)!r}, {str(out)!r}, 8, val_fraction=0.0, progress=False,"
        f" shard_bytes={kw['shard_bytes']}, part_bytes=2000)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert list(out.rglob(".shard-*.tmp")), "the kill should leave a temporary shard behind"
    assert (out / "manifest.json").read_bytes() == manifest and _rows(out) == rows

    m = prepare_dataset([str(src)], tok_dir, out, 8, **kw)
    assert not list(out.rglob("*.tmp")) and not (out / ".parts").exists()
    assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in clean["splits"]["train"]["shards"]]
    listed = {s["file"] for sp in m["splits"].values() for s in sp["shards"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.bin")}
    assert on_disk == listed  # the previous run's shards and the killed run's are gone


def test_prepare_and_tokenizer_out_are_checked_before_any_work(tmp_path, tok_dir, capsys):
    """--out that is a file, an unrelated non-empty folder, or a folder holding the inputs is refused in one
    line before anything is read or written (the same check as the exporters'); nothing is created."""
    (tmp_path / "corpus").mkdir()
    src = _jsonl(tmp_path / "corpus" / "c.jsonl")
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "manifest.json").write_text('{"name": "not a dataset"}')
    cases = [(tmp_path / "afile", "is a file, not a folder"),
             (tmp_path / "afile" / "sub", "is a file, not a folder"),
             (tmp_path / "project", "is not empty, and is not a"),
             (tmp_path / "corpus", "the input"),
             (tmp_path, "the input")]
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for out, msg in cases:
        rc = main(["-q", "data", "prepare", str(src.parent), "--tokenizer", str(tok_dir), "--max-seq-len", "8",
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "--out" in err and len(err.strip().splitlines()) == 1, (out, err)
        rc = main(["-q", "tokenizer", "train", str(src.parent), "--vocab-size", "320", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "--out" in err and len(err.strip().splitlines()) == 1, (out, err)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "afile").read_text() == "keep me"
