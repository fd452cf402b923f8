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
