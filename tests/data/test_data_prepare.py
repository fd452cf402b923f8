"""Corpus preparation (mptkit.data.prepare): exact reconstruction, packing modes, determinism, no-op
re-runs, resumption after a crash, the input formats."""

from __future__ import annotations

import inspect
import json
import random

import numpy as np
import pytest

from mptkit.data import prepare as prep
from mptkit.data.prepare import _safe_chunks, prepare_dataset
from mptkit.data.shards import TokenDataset
from mptkit.data.tokenizer import train_tokenizer
from mptkit.errors import DataError
from mptkit.io import load_tokenizer

EOS = 0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(None, 512, tmp_path_factory.mktemp("tok") / "bpe", max_files=6)


def _docs(n=40, seed=0):
    """Small ASCII documents of varied length taken from stdlib source (json, inspect)."""
    import json as _j

    lines = (inspect.getsource(_j) + inspect.getsource(inspect)).splitlines(keepends=True)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(len(lines) - 60)
        out.append("".join(lines[a:a + rng.randrange(1, 40)]).strip("\n") or "x = 1")
    return out


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _all_rows(folder, split="train"):
    ds = TokenDataset(folder, split)
    return np.stack([ds.row(i) for i in range(len(ds))]).astype(np.int64) if len(ds) else np.zeros((0, 0), int)


def test_shards_decode_to_the_documents_and_separators(tmp_path, tok_dir):
    """Wrap mode: the samples, laid end to end, are exactly the stream doc1 EOS doc2 EOS ... (ids equal to an
    independent per-document encode, the sub-sample tail dropped), and decoding the stream split at EOS
    gives back the documents character for character."""
    tok = load_tokenizer(tok_dir)
    docs = _docs(40)
    src = _write_jsonl(tmp_path / "c.jsonl", docs)
    m = prepare_dataset([str(src)], tok_dir, tmp_path / "out", 64, val_fraction=0.0, progress=False)
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=False) + [EOS]]
    rows = _all_rows(tmp_path / "out")
    n = len(stream) // 64
    assert rows.shape == (n, 64) and m["num_samples"]["train"] == n
    assert rows.reshape(-1).tolist() == stream[: n * 64]
    assert m["splits"]["train"]["dropped_tokens"] == len(stream) - n * 64
    assert m["num_tokens"]["train"] == len(stream) and m["eos_token_id"] == EOS
    got = tok.decode(rows.reshape(-1).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces = got.split("<|endoftext|>")
    full = pieces[:-1]  # the last piece may be cut by the dropped tail
    assert full == docs[: len(full)] and len(full) >= len(docs) - 3
    assert docs[len(full)].startswith(pieces[-1])


def test_no_wrap_matches_llm_foundry_concat_tokens(tmp_path, tok_dir):
    """No-wrap: identical to llm-foundry's concat_tokens with no_wrap (buffer += bos+doc+eos; emit the first
    max_seq_len tokens once the buffer is full, then drop the buffer), with a BOS text as well."""
    tok = load_tokenizer(tok_dir)
    docs = _docs(60, seed=1)
    src = _write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_dataset([str(src)], tok_dir, tmp_path / "out", 48, wrap=False, bos_text="<|padding|>",
                    val_fraction=0.0, progress=False)
    expect, buf = [], []
    for d in docs:
        buf = buf + [1] + tok.encode(d, add_special_tokens=False) + [EOS]
        if len(buf) >= 48:
            expect.append(buf[:48])
            buf = []
    assert _all_rows(tmp_path / "out").tolist() == expect
    assert all(r[0] == 1 for r in expect)


def test_train_val_split_partitions_documents_deterministically(tmp_path, tok_dir):
    """Every document lands in exactly one split (train or val), chosen by a seeded hash: the same seed gives
    the same partition, another seed another one."""
    tok = load_tokenizer(tok_dir)
    docs = [f"document number {i} says {'hello ' * (i % 7)}" for i in range(200)]
    src = _write_jsonl(tmp_path / "c.jsonl", docs)

    def split_docs(out, seed):
        m = prepare_dataset([str(src)], tok_dir, out, 8, wrap=False, val_fraction=0.3, split_seed=seed,
                            progress=False)
        res = {}
        for s in ("train", "val"):
            rows = _all_rows(out, s)
            text = tok.decode(rows.reshape(-1).tolist(), skip_special_tokens=False) if len(rows) else ""
            res[s] = m["splits"][s]["num_documents"], text
        return res

    a = split_docs(tmp_path / "a", 0)
    assert a["train"][0] + a["val"][0] == 200 and 30 < a["val"][0] < 90
    assert split_docs(tmp_path / "b", 0) == a
    assert split_docs(tmp_path / "c", 1)["val"] != a["val"]


def test_deterministic_and_noop_rerun(tmp_path, tok_dir, monkeypatch):
    """Two runs over the same inputs give byte-identical shards; re-running into a finished folder is a
    no-op (shards untouched, unchanged files not even re-hashed); changing an option or an input prepares
    again."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(_docs(30, seed=2)):
        (src / f"f{i:02d}.txt").write_text(d)
    m1 = prepare_dataset([str(src)], tok_dir, tmp_path / "a", 32, val_fraction=0.2, progress=False)
    m2 = prepare_dataset([str(src)], tok_dir, tmp_path / "b", 32, val_fraction=0.2, progress=False)
    sha = lambda m: [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]
    assert sha(m1) == sha(m2) and m1["key"] == m2["key"]
    shard = tmp_path / "a" / m1["splits"]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    hashed = []
    real_sha = prep.file_sha256
    monkeypatch.setattr(prep, "file_sha256", lambda f: hashed.append(f) or real_sha(f))
    m3 = prepare_dataset([str(src)], tok_dir, tmp_path / "a", 32, val_fraction=0.2, progress=False)
    assert m3 == m1 and shard.stat().st_mtime_ns == mtime and hashed == []
    m4 = prepare_dataset([str(src)], tok_dir, tmp_path / "a", 16, val_fraction=0.2, progress=False)
    assert m4["max_seq_len"] == 16 and m4["key"] != m1["key"]
    m_in = prepare_dataset([str(src)], tok_dir, src / "prepared", 16, val_fraction=0.2, progress=False)
    assert prepare_dataset([str(src)], tok_dir, src / "prepared", 16, val_fraction=0.2, progress=False) == m_in
    assert len(m_in["sources"]) == len(m4["sources"]) == 30  # its own output is never read as input
    hashed.clear()
    (src / "f00.txt").write_text("changed text")
    m5 = prepare_dataset([str(src)], tok_dir, tmp_path / "a", 16, val_fraction=0.2, progress=False)
    assert [f.name for f in hashed] == ["f00.txt"]
    assert m5["key"] != m4["key"] and m5["sources"][0]["sha256"] != m4["sources"][0]["sha256"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["key"] == m5["key"]


def test_interrupted_run_leaves_nothing_complete_and_resumes(tmp_path, tok_dir, monkeypatch):
    """A crash mid-run leaves no manifest (the folder is refused as incomplete); the next run reuses the
    parts already tokenized and produces exactly what an uninterrupted run produces."""
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(80, seed=3))
    kw = {"val_fraction": 0.1, "part_bytes": 2000, "progress": False}
    clean = prepare_dataset([str(src)], tok_dir, tmp_path / "clean", 32, **kw)
    calls = {"n": 0}
    real = prep._Encoder.encode

    def flaky(self, texts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(self, texts)

    monkeypatch.setattr(prep._Encoder, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(src)], tok_dir, tmp_path / "out", 32, **kw)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="interrupted"):
        TokenDataset(tmp_path / "out")
    monkeypatch.setattr(prep._Encoder, "encode", real)
    m = prepare_dataset([str(src)], tok_dir, tmp_path / "out", 32, **kw)
    assert m["stats"]["parts_reused"] == 3 and m["stats"]["parts"] > 4
    assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in clean["splits"]["train"]["shards"]]
    assert not (tmp_path / "out" / ".parts").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_long_documents_are_cut_without_changing_ids(tok_dir):
    """Cutting a long document at safe points (for load balance over cores) gives exactly the ids of
    encoding it whole: on real code (indentation, blank lines) and on random text mixing spaces, tabs,
    newlines, digits, punctuation, accented and combining characters."""
    import textwrap

    b = load_tokenizer(tok_dir).backend_tokenizer
    texts = [inspect.getsource(textwrap) + "\n\n  é\n\u0301x\nend\n" + inspect.getsource(json)]
    rng = random.Random(0)
    alphabet = list("ab xy  \n\n\t\r09.,'(-_") + ["é", "\u0301", "\u00a0", "\u3000", "ß", "\x1c", "'s"]
    texts += ["".join(rng.choice(alphabet) for _ in range(3000)) for _ in range(30)]
    for text in texts:
        chunks = _safe_chunks(text, 40)
        assert "".join(chunks) == text and len(chunks) > 5
        pieces = [i for c in chunks for i in b.encode(c, add_special_tokens=False).ids]
        assert pieces == b.encode(text, add_special_tokens=False).ids


def test_literal_special_token_text_is_not_a_separator(tmp_path, tok_dir):
    """A document containing the text "<|endoftext|>" is tokenized as text: the only EOS ids are the
    separators, so sequence_id still counts documents correctly."""
    docs = ["a <|endoftext|> b " * 3, "second doc"] * 5
    src = _write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_dataset([str(src)], tok_dir, tmp_path / "out", 16, val_fraction=0.0, progress=False)
    rows = _all_rows(tmp_path / "out").reshape(-1)
    assert int((rows == EOS).sum()) <= len(docs)
    tok = load_tokenizer(tok_dir)
    assert tok.decode(rows.tolist(), skip_special_tokens=False).startswith(docs[0] + "<|endoftext|>" + docs[1])


def test_input_formats(tmp_path, tok_dir):
    """.txt/.md/.py files, folders, globs, .jsonl, .json arrays, nested JSON fields, .csv, .parquet and a
    local datasets save_to_disk folder are all read, in a deterministic order, with the text field chosen."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(12, seed=4)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(docs[0])
    (d / "sub" / "b.md").write_text(docs[1])
    (d / "c.py").write_text(docs[2])
    (d / ".hidden.txt").write_text("never read")
    (d / "img.png").write_bytes(b"\x89PNG\x00\x00")
    _write_jsonl(tmp_path / "j.jsonl", docs[3:5], field="body")
    (tmp_path / "arr.json").write_text(json.dumps([{"body": docs[5]}, {"body": docs[6]}]))
    (tmp_path / "nested.jsonl").write_text(json.dumps({"meta": {"body": docs[7]}}) + "\n")
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerow([1, docs[8]])
    pq.write_table(pa.table({"body": [docs[9]], "n": [1]}), tmp_path / "p.parquet")
    hf = tmp_path / "hfds"
    hf.mkdir()
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": [docs[10], docs[11]]}))
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")

    tok = load_tokenizer(tok_dir)
    for field, inputs, want in [
        ("text", [str(d)], [docs[0], docs[2], docs[1]]),
        ("body", [str(tmp_path / "j.jsonl"), str(tmp_path / "arr.json"), str(tmp_path / "t.csv"),
                  str(tmp_path / "p.parquet"), str(hf)], [docs[3], docs[4], docs[5], docs[6], docs[8], docs[9],
                                                          docs[10], docs[11]]),
        ("meta.body", [str(tmp_path / "nest*.jsonl")], [docs[7]]),
    ]:
        out = tmp_path / f"out_{field}"
        m = prepare_dataset(inputs, tok_dir, out, 4, text_field=field, val_fraction=0.0, progress=False)
        assert m["bad_inputs"]["total"] == 0, m["bad_inputs"]
        text = tok.decode(_all_rows(out).reshape(-1).tolist(), skip_special_tokens=False)
        pieces = text.split("<|endoftext|>")
        assert pieces[: len(want) - 1] == want[:-1] and want[-1].startswith(pieces[len(want) - 1])
        assert sum(s["documents"] for s in m["sources"]) == len(want)


def test_ids_above_65535_use_uint32(tmp_path):
    """A tokenizer with ids beyond 65535 gets uint32 shards (uint16 would wrap them), and the manifest's
    vocab sizes cover the largest id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 70_000, "<|endoftext|>": 70_001}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(
        str(tmp_path / "wl"))
    src = _write_jsonl(tmp_path / "c.jsonl", ["a c b c"] * 10)
    m = prepare_dataset([str(src)], tmp_path / "wl", tmp_path / "out", 5, val_fraction=0.0, progress=False)
    assert m["dtype"] == "uint32" and m["tokenizer_vocab_size"] == 70_002 and m["vocab_size"] == 70_016
    assert TokenDataset(tmp_path / "out")[0]["input_ids"].tolist() == [1, 70_000, 2, 70_000, 70_001]


def test_tokenizers_with_added_tokens_are_cut_only_where_safe(tmp_path, tok_dir):
    """A tokenizer with non-special added tokens (like GPT-NeoX-20B's whitespace-run tokens) is cut only at
    lone newlines (a whitespace-run token could span the other kind of cut), one whose added token holds a
    newline or strips whitespace is never cut; in every case a long indented document and random text give
    exactly the ids of encoding them whole, through prepare_dataset too."""
    import textwrap

    from tokenizers import AddedToken

    ws_dir, nl_dir = tmp_path / "ws", tmp_path / "nl"
    ws = load_tokenizer(tok_dir)
    ws.backend_tokenizer.add_tokens([AddedToken(" " * n, normalized=True, special=False) for n in (2, 4, 8)])
    ws.save_pretrained(str(ws_dir))
    nl = load_tokenizer(tok_dir)
    nl.backend_tokenizer.add_tokens([AddedToken("x\nd", normalized=True, special=False)])
    nl.save_pretrained(str(nl_dir))
    assert prep._Encoder(load_tokenizer(tok_dir), 1).chunk is prep._SAFE_CUT
    assert prep._Encoder(load_tokenizer(ws_dir), 1).chunk is prep._NEWLINE_CUT
    assert prep._Encoder(load_tokenizer(nl_dir), 1).chunk is None
    rng = random.Random(1)
    alphabet = list("ab xy  \n\n\t09.,'(-_") + ["é", "x\nd"]
    doc = (inspect.getsource(textwrap) * 4)[:70_000] + "".join(rng.choice(alphabet) for _ in range(20_000))
    for d in (ws_dir, nl_dir):
        b = load_tokenizer(d).backend_tokenizer
        whole = b.encode(doc, add_special_tokens=False).ids
        enc = prep._Encoder(load_tokenizer(d), 1)
        assert enc.encode([doc])[0].tolist() == whole
        if enc.chunk is not None:
            assert len(_safe_chunks(doc, 2000, enc.chunk)) > 10
            assert [i for c in _safe_chunks(doc, 2000, enc.chunk) for i in b.encode(c, add_special_tokens=False).ids] \
                == whole
    src = _write_jsonl(tmp_path / "c.jsonl", [doc])
    prepare_dataset([str(src)], ws_dir, tmp_path / "out", 8, val_fraction=0.0, progress=False)
    whole = load_tokenizer(ws_dir).backend_tokenizer.encode(doc, add_special_tokens=False).ids + [EOS]
    rows = _all_rows(tmp_path / "out").reshape(-1).tolist()
    assert rows == whole[: len(rows)] and len(whole) - len(rows) < 8


def test_datasetdict_folder_split_choice(tmp_path):
    """A local DatasetDict folder (datasets.save_to_disk) reads its 'train' split by default, another with
    hf_split, and an unknown split is a DataError listing the splits."""
    import pyarrow as pa

    from mptkit.data.corpus import iter_documents, resolve_inputs

    root = tmp_path / "dd"
    for split, texts in (("train", ["t1", "t2"]), ("test", ["x1"])):
        (root / split).mkdir(parents=True)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
            w.write_table(pa.table({"text": texts}))
        (root / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (root / split / "dataset_info.json").write_text("{}")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    read = lambda files: [t for f in files for _, t in iter_documents(f)]
    assert read(resolve_inputs([str(root)])) == ["t1", "t2"]
    assert read(resolve_inputs([str(root)], hf_split="test")) == ["x1"]
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]"):
        resolve_inputs([str(root)], hf_split="validation")
