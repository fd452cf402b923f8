"""Bad input: each kind is reported with file and line, skipped and counted by default, fatal with
strict=True / --strict, and never a traceback from the CLI."""

from __future__ import annotations

import json
import pathlib

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


def test_an_unreadable_manifest_stops_a_rerun_before_anything_is_deleted(tmp_path, tok_dir, monkeypatch):
    """A manifest that exists but cannot be read (permissions, an I/O error) is not taken for "no dataset":
    the re-run stops with the manifest named and every shard it lists is still there."""
    from pathlib import Path

    src = _jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare_dataset([str(src)], tok_dir, out, 16, val_fraction=0.0, progress=False)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    real = Path.read_text

    def unreadable(self, *a, **k):
        if self == out / "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(DataError, match="manifest.json: cannot read the prepared dataset's manifest"):
        prepare_dataset([str(src)], tok_dir, out, 16, val_fraction=0.1, progress=False)
    monkeypatch.undo()
    assert all(f.exists() for f in files) and _rows(out)


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
    code = str(pathlib.Path(__file__).resolve().parents[2] / "src")  # this checkout's code, not an installed one
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join([code, os.getcwd()])},
                       capture_output=True, text=True, timeout=300, check=False)
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


# ------------------------------------------------------------------ lone surrogates, symlinks, huge documents
SURROGATE_LINE = '{"text": "bad \\ud800 half of a pair"}\n'  # valid JSON, but no UTF-8 text


def test_lone_surrogate_is_a_bad_record_in_prepare_and_tokenizer_training(tmp_path, tok_dir, capsys):
    """A JSON string with a lone surrogate ("\\ud800") is bad input, never a traceback: skipped and counted
    (kind invalid_unicode) by data prepare and tokenizer train, an error naming file:line with --strict."""
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": GOOD * 4}) + "\n" + SURROGATE_LINE + json.dumps({"text": GOOD * 3}) + "\n")
    m = prepare_dataset([str(src)], tok_dir, tmp_path / "out", 8, val_fraction=0.0, progress=False)
    assert m["bad_inputs"]["counts"] == {"invalid_unicode": 1}
    assert f"{src}:2: a lone surrogate in field 'text' (\\ud800 at character 4)" in m["bad_inputs"]["examples"][0]
    assert m["sources"][0]["documents"] == 2
    with pytest.raises(DataError, match=r"c\.jsonl:2: a lone surrogate in field 'text'"):
        prepare_dataset([str(src)], tok_dir, tmp_path / "out2", 8, val_fraction=0.0, strict=True, progress=False)
    for cmd in (["data", "prepare", str(src), "--tokenizer", str(tok_dir), "--max-seq-len", "8", "--out",
                 str(tmp_path / "out3"), "--strict"],
                ["tokenizer", "train", str(src), "--vocab-size", "320", "--out", str(tmp_path / "tok3"), "--strict"]):
        rc = main(["-q", *cmd])
        err = capsys.readouterr().err
        assert rc == 2 and "c.jsonl:2:" in err and "lone surrogate" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
    tok = train_tokenizer([str(src)], 320, tmp_path / "tok4")
    meta = json.loads((tok / "mptkit_tokenizer.json").read_text())
    assert meta["bad_inputs"]["counts"] == {"invalid_unicode": 1} and meta["corpus"]["documents"] == 2
    ft = tmp_path / "ft.jsonl"  # finetuning records are read by the same JSON reader
    ft.write_text('{"prompt": "hi \\ud800", "response": "there"}\n{"prompt": "ok", "response": "fine"}\n')
    rc = main(["-q", "data", "finetune-check", str(ft), "--tokenizer", str(tok_dir), "--max-seq-len", "32",
               "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "ft.jsonl:1: a lone surrogate in field 'prompt'" in err and "Traceback" not in err, err


def test_symlink_loops_and_dangling_links_are_skipped_with_a_warning(tmp_path, tok_dir, caplog, capsys):
    """In an input folder, a file symlink loop and a dangling symlink are skipped with a warning naming them
    (the good files are prepared); given as inputs themselves they are a one-line error naming them."""
    import os

    d = tmp_path / "c"
    d.mkdir()
    (d / "good.txt").write_text(GOOD * 5)
    os.symlink(d / "loop_b.txt", d / "loop_a.txt")
    os.symlink(d / "loop_a.txt", d / "loop_b.txt")
    os.symlink(d / "missing.txt", d / "dangling.txt")
    with caplog.at_level("WARNING"):
        m = prepare_dataset([str(d)], tok_dir, tmp_path / "out", 8, val_fraction=0.0, progress=False)
    assert [s["path"] for s in m["sources"]] == [str(d / "good.txt")]
    for name, why in (("loop_a.txt", "symbolic link loop"), ("loop_b.txt", "symbolic link loop"),
                      ("dangling.txt", "dangling symbolic link")):
        assert f"{d / name}" in caplog.text and why in caplog.text
    for bad, why in ((d / "loop_a.txt", "symbolic link loop"), (d / "dangling.txt", "dangling symbolic link")):
        rc = main(["-q", "data", "prepare", str(bad), "--tokenizer", str(tok_dir), "--max-seq-len", "8", "--out",
                   str(tmp_path / "o2")])
        err = capsys.readouterr().err
        assert rc == 2 and str(bad) in err and why in err and len(err.strip().splitlines()) == 1, err


def test_input_that_vanishes_before_hashing_is_one_line(tmp_path, tok_dir, monkeypatch):
    """A file listed but unreadable when hashed (deleted, a loop made meanwhile) is a DataError naming it."""
    from mptkit.data import prepare as prep

    (tmp_path / "a.txt").write_text(GOOD)
    real = prep.resolve_inputs
    monkeypatch.setattr(prep, "resolve_inputs", lambda *a, **k: [*real(*a, **k), tmp_path / "gone.txt"])
    with pytest.raises(DataError, match=r"cannot read input .*gone\.txt: No such file"):
        prepare_dataset([str(tmp_path / "a.txt")], tok_dir, tmp_path / "out", 8, progress=False)


def test_long_runs_without_a_cut_point_are_encoded_in_bounded_pieces(tok_dir, monkeypatch):
    """A document longer than the piece budget with no newline is encoded in pieces of at most the budget
    (UTF-8 bytes), a bounded amount of text per encode call: cut at a space between words the ids are those
    of encoding it whole; a run with no space at all is cut at the budget (a character boundary) and still
    decodes to the same text."""
    import random

    from mptkit.data import prepare as prep
    from mptkit.io import load_tokenizer

    monkeypatch.setattr(prep, "_PIECE_BYTES", 4096)
    monkeypatch.setattr(prep, "_BATCH_BYTES", 16384)
    tok = load_tokenizer(tok_dir)
    enc = prep._Encoder(tok, 1)
    calls = []
    real = enc.backend

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name.startswith("encode_batch"):
                return lambda pieces, **k: calls.append([len(p.encode()) for p in pieces]) or fn(pieces, **k)
            return fn

    enc.backend = Spy()
    rng = random.Random(0)
    words = ["def", "x", "return", "naïve", "é", "12", "(a)", "tokens"]
    text = " ".join(rng.choice(words) for _ in range(30000))  # ~150 kB, one line, single spaces
    ids = enc.encode([text])[0].tolist()
    assert max(n for c in calls for n in c) <= 4096 and sum(len(c) for c in calls) > 30
    assert all(sum(c) <= 16384 for c in calls) and len(calls) > 5
    assert ids == real.encode(text, add_special_tokens=False).ids
    calls.clear()
    blob = "é" + "ab0" * 20000  # no space, no newline
    ids = enc.encode([blob])[0].tolist()
    assert max(n for c in calls for n in c) <= 4096
    assert tok.decode(ids) == blob


def test_another_prepares_write_probe_does_not_make_out_look_foreign(tmp_path, tok_dir, monkeypatch):
    """The output check of a second, concurrent prepare may see the first one's probe file in --out (made by
    check_writable, not yet removed): it has a temporary name, so the folder still counts as prepare's own
    (not 'not empty, and not a prepared dataset'), and prepare leaves it to its owner."""
    import os

    from mptkit.utils.outputs import check_writable

    src = _jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare_dataset([str(src)], tok_dir, out, 16, val_fraction=0.0, progress=False)
    with monkeypatch.context() as m:  # the other process, between creating its probe and removing it
        m.setattr(os, "unlink", lambda p: None)
        check_writable(out, "--out")
    probes = [f for f in out.iterdir() if f.name.startswith(".mptkit-write-test")]
    assert len(probes) == 1
    (out / "manifest.json").rename(out / ".manifest.json.abc123.tmp")  # an interrupted run: own names only
    prepare_dataset([str(src)], tok_dir, out, 16, val_fraction=0.0, progress=False)
    assert (out / "manifest.json").is_file() and not (out / ".manifest.json.abc123.tmp").exists()
    assert probes[0].exists()
