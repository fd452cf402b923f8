"""Tokenizer training, loading, fingerprinting and batch encoding (mptkit.data.tokenizer) and the default corpus."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from mptkit.data.corpus import default_corpus_files, limit_files
from mptkit.data.tokenizer import (
    SPECIAL_TOKENS,
    padded_vocab_size,
    tokenizer_fingerprint,
    train_tokenizer,
)
from mptkit.errors import DataError
from mptkit.io import load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_tokenizer(None, 500, out, max_files=6)


def test_default_corpus_is_sorted_stdlib_without_tests():
    """The default corpus is the interpreter's stdlib .py files, sorted, deterministic, no test suites or
    site-packages, and limit_files keeps a prefix within the byte budget."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = default_corpus_files()
    assert files == default_corpus_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any(set(f.relative_to(root).parts) & {"test", "tests", "idle_test", "site-packages"} for f in files)
    assert (root / "json" / "__init__.py").resolve() in [f.resolve() for f in files]
    lim = limit_files(files, max_bytes=200_000)
    assert lim == files[:len(lim)] and sum(f.stat().st_size for f in lim) <= 200_000 or len(lim) == 1
    assert len(limit_files(files, max_files=3)) == 3


def test_trained_tokenizer_loads_with_autotokenizer(tok_dir):
    """The trained folder loads with transformers.AutoTokenizer (local files only): GPT-NeoX-style
    specials at ids 0..3, eos/bos = <|endoftext|>, pad = <|padding|>, vocab rounded up to 64, exact
    byte-level round trip, ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert tok.pad_token == "<|padding|>" and tok.pad_token_id == 1
    assert len(tok) == 512  # 500 rounded up to a multiple of 64
    assert padded_vocab_size(tok) == 512 and padded_vocab_size(50277) == 50304
    text = "def f(x):\n    return {'a': x ** 2}  # ünïcödé\n\n\tend"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    info = json.loads((tok_dir / "mptkit_tokenizer.json").read_text())
    assert info["fingerprint"] == tokenizer_fingerprint(tok_dir)


def test_training_is_deterministic(tok_dir, tmp_path):
    """Training twice on the same corpus gives the same vocabulary and merges (same fingerprint); a
    different vocabulary size gives a different fingerprint."""
    again = train_tokenizer(None, 500, tmp_path / "again", max_files=6)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok_dir)
    other = train_tokenizer(None, 576, tmp_path / "other", max_files=6)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok_dir)


def test_fingerprint_stable_across_save_and_load(tok_dir, tmp_path, make_tokenizer):
    """The fingerprint is the same for a path, a loaded tokenizer, its Rust backend and a re-saved copy;
    any HF tokenizer folder (here one built by the test fixture) is accepted and fingerprinted."""
    from tokenizers import Tokenizer

    tok = load_tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok_dir)
    assert fp.startswith("sha256:")
    assert tokenizer_fingerprint(tok) == fp == tokenizer_fingerprint(tok.backend_tokenizer)
    assert tokenizer_fingerprint(Tokenizer.from_file(str(tok_dir / "tokenizer.json"))) == fp
    tok.save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_fingerprint(tmp_path / "resaved") == fp
    assert tokenizer_fingerprint(load_tokenizer(tok_dir / "tokenizer.json")) == fp
    other = make_tokenizer(tmp_path / "fixture_tok")
    assert load_tokenizer(other).eos_token == "<|endoftext|>"
    assert tokenizer_fingerprint(other) != fp


def test_load_tokenizer_errors_are_clear(tmp_path):
    """Unusable tokenizer paths raise DataError naming the path and the problem (no traceback types)."""
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="hub name"):
        load_tokenizer("EleutherAI/gpt-neox-20b-not-local")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds none of"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be loaded"):
        load_tokenizer(bad)


def test_train_refuses_tiny_vocab_and_foreign_folder(tmp_path):
    """A vocabulary smaller than the byte alphabet plus specials, or an --out folder that holds other
    files, is refused before any work."""
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(None, 100, tmp_path / "t")
    (tmp_path / "notatok").mkdir()
    (tmp_path / "notatok" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing"):
        train_tokenizer(None, 512, tmp_path / "notatok", max_files=1)
    assert (tmp_path / "notatok" / "keep.txt").read_text() == "precious"


def test_cli_tokenizer_train(tmp_path, capsys):
    """`mptkit tokenizer train FILE --vocab-size N --out DIR` trains on the given file and prints the size
    and fingerprint; the folder loads."""
    from mptkit.cli import main

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"body": f"line {i} " * 20}) + "\n" for i in range(50)))
    rc = main(["-q", "tokenizer", "train", str(src), "--text-field", "body", "--vocab-size", "300", "--out",
               str(tmp_path / "tok")])
    out = capsys.readouterr().out
    assert rc == 0 and "fingerprint sha256:" in out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode("line 7 line 8", add_special_tokens=False)) == "line 7 line 8"
    assert tokenizer_fingerprint(tok) in out


def test_gpt_neox_style_folder_is_accepted(tok_dir, tmp_path):
    """A folder laid out like EleutherAI/gpt-neox-20b (tokenizer.json + a tokenizer_config.json naming
    GPTNeoXTokenizer) loads through load_tokenizer with the same ids and the same fingerprint."""
    import shutil

    neox = tmp_path / "neox"
    neox.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", neox / "tokenizer.json")
    (neox / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "tokenizer_class": "GPTNeoXTokenizer"}))
    tok = load_tokenizer(neox)
    ref = load_tokenizer(tok_dir)
    text = "import os\n\nclass A:\n    def f(self):  return 1\n"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.eos_token_id == 0 and tokenizer_fingerprint(tok) == tokenizer_fingerprint(tok_dir)


def test_encode_batch_matches_each_tokenizer_kind_without_special_tokens(tok_dir, tmp_path):
    """encode_batch gives the ids of tokenizer(text, add_special_tokens=False) for a transformers fast
    tokenizer, the raw tokenizers.Tokenizer behind it and a slow (Python) GPT2Tokenizer built from the same
    vocabulary and merges; no BOS/EOS is added, and a text past model_max_length is neither cut nor warned about."""
    from transformers import GPT2Tokenizer

    from mptkit.data.tokenizer import encode_batch

    fast = load_tokenizer(tok_dir)
    texts = ["def f(x):\n    return x + 1\n", "", "import os  # a comment", "a " * 300]
    fast.model_max_length = 64  # the last text is longer
    warned = "sequence-length-is-longer-than-the-specified-maximum"  # transformers' key for that warning
    assert encode_batch(fast, texts[-1:])[0] and not fast.deprecation_warnings.get(warned)
    want = [fast(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert fast.deprecation_warnings.get(warned)  # transformers' own call does warn
    assert len(want[-1]) > 64 and want[1] == []
    raw = fast.backend_tokenizer
    vocab, merges = raw.model.save(str(tmp_path))
    slow = GPT2Tokenizer(vocab, merges, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                         unk_token="<|endoftext|>")
    slow.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    assert encode_batch(fast, texts) == want
    assert encode_batch(raw, texts) == want
    assert encode_batch(slow, texts) == want
    assert all(type(x) is list and all(type(i) is int for i in x) for x in encode_batch(fast, texts))
    assert encode_batch(fast, []) == [] and encode_batch(fast, iter(texts[:1])) == want[:1]
