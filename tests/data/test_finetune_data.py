"""Finetuning data (mptkit.data.finetune): formats, loss masks, truncation, packing, bad records."""

from __future__ import annotations

import json
import types

import pytest
import torch

from mptkit.data.finetune import (
    IGNORE_INDEX,
    INSTRUCT_PROMPT,
    FinetuneOptions,
    build_finetune_dataset,
    data_files,
    pack_first_fit,
)
from mptkit.errors import DataError
from mptkit.prompts import render_chatml

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "and then?"},
                     {"role": "assistant", "content": "we stop"}]}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def tok(make_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer()))


def _sample_text(tok, ds, i):
    n = int(ds.lengths[i])
    return tok.decode(ds[i]["input_ids"][:n].tolist())


def _target_text(tok, ds, i):
    lab = ds[i]["labels"]
    return tok.decode(lab[lab != IGNORE_INDEX].tolist())


def test_prompt_response_masks_the_prompt_and_ends_with_eos(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "def add(a, b):", "response": "\n    return a + b"}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64))
    assert len(ds) == 1 and ds[0]["input_ids"].shape == (64,)
    assert _sample_text(tok, ds, 0) == "def add(a, b):\n    return a + b<|endoftext|>"
    assert _target_text(tok, ds, 0) == "\n    return a + b<|endoftext|>"
    n = int(ds.lengths[0])
    assert (ds[0]["input_ids"][n:] == tok.pad_token_id).all() and (ds[0]["labels"][n:] == IGNORE_INDEX).all()
    # the response's tokens are those of the response alone (pieces tokenized separately)
    p = tok("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert ds[0]["input_ids"][: len(p)].tolist() == p
    assert (ds[0]["labels"][: len(p)] == IGNORE_INDEX).all()


def test_chat_is_chatml_and_targets_last_or_all_responses(tmp_path, tok):
    f = _write(tmp_path / "chat.jsonl", [CHAT])
    last = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=512))
    # the text is exactly what `mptkit chat` / the server render for the same conversation
    assert _sample_text(tok, last, 0) == render_chatml(CHAT["messages"], add_generation_prompt=False).rstrip("\n")
    assert _target_text(tok, last, 0) == "we stop<|im_end|>"
    both = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=512, target_responses="all"))
    assert _target_text(tok, both, 0) == "hello there<|im_end|>we stop<|im_end|>"
    everything = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=512, target_prompts="all",
                                                                 target_responses="all"))
    assert _target_text(tok, everything, 0) == _sample_text(tok, everything, 0)
    # no system message: the same default one inference adds; system_prompt None adds none
    convo = {"messages": CHAT["messages"][1:3]}
    f2 = _write(tmp_path / "c2.jsonl", [convo])
    dflt = build_finetune_dataset(f2, tok, FinetuneOptions(max_seq_len=512))
    from mptkit.prompts import DEFAULT_SYSTEM_PROMPT

    assert _sample_text(tok, dflt, 0) == render_chatml(convo["messages"], add_generation_prompt=False,
                                                       default_system=DEFAULT_SYSTEM_PROMPT).rstrip("\n")
    bare = build_finetune_dataset(f2, tok, FinetuneOptions(max_seq_len=512, system_prompt=None))
    assert _sample_text(tok, bare, 0) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"
    # training and inference prompt alike: the ids before the trained response are the ones the server's
    # /v1/chat/completions (Server.chat_ids) and `mptkit chat` (ChatSession) feed the model for the
    # conversation so far, with its own system message or with the default one both add
    from mptkit.infer import Generator
    from mptkit.infer.chat import ChatFormat, ChatSession
    from mptkit.infer.server import Server
    from mptkit.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    gen = Generator(MPTForCausalLM(tiny_cfg(vocab_size=len(tok), max_seq_len=512)).eval(), tok)
    server = types.SimpleNamespace(tok=tok, chat_format=ChatFormat(tok))  # what chat_ids reads of the server
    for ds, msgs, system in ((last, CHAT["messages"], "Be brief."), (dflt, convo["messages"], None)):
        served = Server.chat_ids(server, msgs[:-1])
        session = ChatSession(gen) if system is None else ChatSession(gen, system_prompt=system)
        session.history = [m for m in msgs[:-1] if m["role"] != "system"]
        assert session.prompt_ids() == served
        ids, labels = ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
        assert ids[: len(served)] == served and set(labels[: len(served)]) == {IGNORE_INDEX}
        assert labels[len(served)] != IGNORE_INDEX  # the trained response starts where that prompt ends


def test_target_prompts_length_threshold(tmp_path, tok):
    short, long_ = {"prompt": "x", "response": " y"}, {"prompt": "x " * 40, "response": " y"}
    f = _write(tmp_path / "d.jsonl", [short, long_])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=128, target_prompts="length>=10"))
    texts = sorted(_target_text(tok, ds, i) for i in range(2))
    assert texts == sorted([" y<|endoftext|>", "x " * 40 + " y<|endoftext|>"])


def test_alpaca_and_dolly_records_use_the_instruct_prompt(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"},
                                      {"instruction": "Sum", "context": "1 2", "response": "3"}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=512))
    assert _sample_text(tok, ds, 0) == INSTRUCT_PROMPT.format(instruction="Say hi") + "hi<|endoftext|>"
    assert "### Input:\n1 2\n\n### Response:\n3<|endoftext|>" in _sample_text(tok, ds, 1)
    assert _target_text(tok, ds, 1) == "3<|endoftext|>"


def test_too_long_examples_are_truncated_or_dropped(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "a", "response": " b" * 100},  # cut at the window
                                      {"prompt": "c " * 100, "response": " d"},  # prompt fills it: dropped
                                      {"prompt": "e", "response": " f"}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=32))
    assert ds.stats.truncated == 1 and ds.stats.dropped_too_long == 1 and len(ds) == 2
    assert int(ds.lengths.max()) == 32


def test_packing_puts_every_example_in_a_window_with_its_own_sequence_id(tmp_path, tok):
    recs = [{"prompt": "p" * (1 + i % 7), "response": " r" * (1 + i % 5)} for i in range(30)]
    f = _write(tmp_path / "d.jsonl", recs)
    plain = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64))
    packed = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64, packing_ratio="auto"))
    assert len(plain) == 30 and len(packed) < 30
    assert int(packed.lengths.sum()) == int(plain.lengths.sum())  # no example lost or cut
    assert int((packed.labels != IGNORE_INDEX).sum()) == int((plain.labels != IGNORE_INDEX).sum())
    # each packed example occupies a contiguous run with one sequence id
    seen = 0
    for s in range(len(packed)):
        sid = packed[s]["sequence_id"][: int(packed.lengths[s])]
        seen += len(torch.unique_consecutive(sid))
    assert seen == 30
    with pytest.raises(DataError, match="packing_ratio"):
        FinetuneOptions(max_seq_len=64, packing_ratio=0.5)


def test_first_fit_decreasing():
    """The tree-based first fit places every item exactly where a plain scan of the bins would."""
    bins = pack_first_fit([5, 3, 8, 2, 6, 4], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 6, 4][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 28 tokens, capacity 10: the minimum

    def scan(lengths, capacity):
        out, room = [], []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            for b, r in enumerate(room):
                if r >= lengths[i]:
                    out[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                out.append([i])
                room.append(capacity - lengths[i])
        return [sorted(b) for b in out]

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 120, (1,), generator=g))
        lengths = torch.randint(1, 65, (n,), generator=g).tolist()
        assert pack_first_fit(lengths, 64) == scan(lengths, 64)
    with pytest.raises(ValueError, match="does not fit"):
        pack_first_fit([65], 64)


def test_packed_loss_equals_separate_examples(tmp_path, tok):
    """With attn_uses_sequence_id, an example's loss inside a packed window equals its loss alone (ALiBi is
    relative and the examples cannot see each other) — packing changes the layout, not the objective."""
    from mptkit.model import MPTForCausalLM
    from mptkit.model.config import MPTConfig
    from tests.helpers import tiny_cfg

    recs = [{"prompt": "q" * (2 + i), "response": " a" * (3 + i)} for i in range(6)]
    f = _write(tmp_path / "d.jsonl", recs)
    plain = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64))
    packed = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64, packing_ratio="auto"))
    model = MPTForCausalLM(MPTConfig.from_dict(tiny_cfg(vocab_size=512, attn_config={"attn_uses_sequence_id": True})))
    model.eval()

    def total(ds, **kw):
        b = ds.collate([ds[i] for i in range(len(ds))])
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        extra = {"sequence_id": b["sequence_id"]} if "sequence_id" in b else {}
        with torch.no_grad():
            return float(model(b["input_ids"], labels=b["labels"], **extra).loss) * n

    assert total(packed) == pytest.approx(total(plain), rel=1e-5)
    # also when prompts carry loss: no position learns to predict the next example's first token
    kw = {"max_seq_len": 64, "target_prompts": "all"}
    plain = build_finetune_dataset(f, tok, FinetuneOptions(**kw))
    packed = build_finetune_dataset(f, tok, FinetuneOptions(packing_ratio="auto", **kw))
    assert int((packed.labels[:, 1:] != IGNORE_INDEX).sum()) == int((plain.labels[:, 1:] != IGNORE_INDEX).sum())
    assert total(packed) == pytest.approx(total(plain), rel=1e-5)


def test_pad_trimming_cuts_batches_to_their_longest_sample(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "a", "response": " b"}, {"prompt": "abc", "response": " de"}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64, allow_pad_trimming=True))
    b = ds.collate([ds[0], ds[1]])
    assert b["input_ids"].shape[1] == 8 and int(ds.lengths.max()) <= 8
    assert (b["labels"] != IGNORE_INDEX).sum() == (ds.labels != IGNORE_INDEX).sum()


def test_bad_records_are_named_skipped_and_counted(tmp_path, tok, caplog):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "a", "response": " b"}, "{not json",
                                      {"messages": [{"role": "wizard", "content": "x"}]},
                                      {"prompt": "a", "response": 3}, {"text": "pretraining text"},
                                      {"messages": [{"role": "user", "content": "no answer"}]}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64))
    assert len(ds) == 1
    bad = ds.stats.bad
    assert bad["total"] == 5
    assert bad["counts"] == {"malformed_json": 1, "bad_role": 1, "non_string_field": 1, "unknown_format": 1,
                             "no_response": 1}
    assert any(f"{f}:2: malformed JSON" in e for e in bad["examples"])
    assert any(f"{f}:3: messages[0].role must be one of" in e for e in bad["examples"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64, strict=True))


def test_nothing_usable_and_missing_data_are_clear_errors(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [{"text": "only pretraining text"}])
    with pytest.raises(DataError, match=r"no usable finetuning example .*first problem: .*d\.jsonl:1"):
        build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=64))
    with pytest.raises(DataError, match="hub dataset name"):
        build_finetune_dataset("mosaicml/dolly_hhrlhf", tok, FinetuneOptions(max_seq_len=64))
    with pytest.raises(DataError, match="target_responses"):
        FinetuneOptions(max_seq_len=64, target_responses="first")
    with pytest.raises(DataError, match="target_prompts"):
        FinetuneOptions(max_seq_len=64, target_prompts="some")


def test_folder_splits_and_other_file_kinds(tmp_path, tok):
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", [{"prompt": "a", "response": " b"}] * 3)
    (d / "test.json").write_text(json.dumps([{"prompt": "c", "response": " d"}]))
    (d / "train-extra.csv").write_text("prompt,response\ne,\" f\"\n")
    assert {p.name for p in data_files(d, "train")} == {"train.jsonl", "train-extra.csv"}
    assert [p.name for p in data_files(d, "test")] == ["test.json"]
    with pytest.raises(DataError, match="no files for split 'validation'"):
        data_files(d, "validation")
    # no file named after the train split: the rest, never the held-out splits' files
    e = tmp_path / "other"
    e.mkdir()
    for name in ("dolly.jsonl", "test.jsonl", "val-0.jsonl", "dev.json"):
        _write(e / name, [{"prompt": "a", "response": " b"}])
    assert [p.name for p in data_files(e, "train")] == ["dolly.jsonl"]
    ds = build_finetune_dataset(d, tok, FinetuneOptions(max_seq_len=32), split="train")
    assert len(ds) == 4
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["g"], "response": [" h"]}), d / "test-0.parquet")
    ds = build_finetune_dataset(d, tok, FinetuneOptions(max_seq_len=32), split="test")
    assert sorted(_target_text(tok, ds, i) for i in range(len(ds))) == [" d<|endoftext|>", " h<|endoftext|>"]


def test_preprocessing_fn_module_function(tmp_path, tok, monkeypatch):
    (tmp_path / "myprep.py").write_text("def fn(r):\n    return {'prompt': 'Q: ' + r['q'], 'response': ' ' + r['a']}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = _write(tmp_path / "d.jsonl", [{"q": "1+1", "a": "2"}])
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=32, preprocessing_fn="myprep:fn"))
    assert _sample_text(tok, ds, 0) == "Q: 1+1 2<|endoftext|>"
    with pytest.raises(DataError, match="preprocessing_fn"):
        build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=32, preprocessing_fn="myprep:nope"))
    # a record the user's function fails on is named, skipped and counted; the others train
    f2 = _write(tmp_path / "d2.jsonl", [{"q": "1+1", "a": "2"}, {"q": "no answer"}])
    ds = build_finetune_dataset(f2, tok, FinetuneOptions(max_seq_len=32, preprocessing_fn="myprep:fn"))
    assert len(ds) == 1 and ds.stats.bad["counts"] == {"preprocessing_failed": 1}
    assert any(f"{f2}:2: preprocessing_fn failed: KeyError" in e for e in ds.stats.bad["examples"])


def test_builtin_stdlib_datasets(tok):
    """The offline demo datasets: documented stdlib functions, train and test disjoint, both formats usable."""
    from mptkit.data.finetune import builtin_records

    for name in ("mptkit:stdlib-instruct", "mptkit:stdlib-chat"):
        train, test = builtin_records(name, "train"), builtin_records(name, "test")
        assert len(train) > 200 and len(test) > 5
        assert not {w for w, _ in train} & {w for w, _ in test}
    ds = build_finetune_dataset("mptkit:stdlib-chat", tok, FinetuneOptions(max_seq_len=1024), split="test")
    assert len(ds) == len(builtin_records("mptkit:stdlib-chat", "test")) and ds.stats.bad["total"] == 0
    with pytest.raises(DataError, match="unknown built-in dataset"):
        build_finetune_dataset("mptkit:nope", tok, FinetuneOptions(max_seq_len=64))


def test_llm_foundry_hf_kwargs_data_files(tmp_path):
    """hf_name: json + hf_kwargs.data_files (per split, a file or list) or data_dir resolve to local files."""
    from mptkit.errors import ConfigError
    from mptkit.train.recipe_data import finetune_source

    ds = {"hf_name": "json", "hf_kwargs": {"data_files": {"train": "a.jsonl", "test": ["b.jsonl", "c.jsonl"]}}}
    assert finetune_source(ds, "train_loader", "train") == "a.jsonl"
    assert finetune_source(ds, "eval_loader", "test") == ["b.jsonl", "c.jsonl"]
    with pytest.raises(ConfigError, match="no 'validation' entry"):
        finetune_source(ds, "eval_loader", "validation")
    assert finetune_source({"hf_name": "json", "hf_kwargs": {"data_dir": "d/"}}, "x", "train") == "d/"
    with pytest.raises(ConfigError, match="needs hf_kwargs.data_files"):
        finetune_source({"hf_name": "parquet"}, "x", "train")
    assert finetune_source({"hf_name": str(tmp_path)}, "x", "train") == str(tmp_path)


def test_finetune_check_cli_marks_the_trained_spans(tmp_path, make_tokenizer, capsys):
    """`mptkit data finetune-check` reports the counts and prints a sample with exactly the trained spans
    bracketed; a missing file is a one-line error."""
    from mptkit.cli import main

    tokdir = make_tokenizer()
    f = _write(tmp_path / "d.jsonl", [CHAT, "{bad"])
    args = ["data", "finetune-check", str(f), "--tokenizer", str(tokdir), "--max-seq-len", "512"]
    assert main([*args, "--target-responses", "all"]) == 0
    out = capsys.readouterr().out
    assert "records      1 parsed; 1 bad skipped {'malformed_json': 1}" in out
    assert "examples     1 (0 cut at 512 tokens, 0 dropped" in out
    sample = out.split("trained spans in [[...]])\n", 1)[1]
    assert sample.count("[[") == 2
    assert "[[hello there<|im_end|>]]" in sample and "[[we stop<|im_end|>]]" in sample
    assert "<|im_start|>user\nhi<|im_end|>" in sample  # prompts unmarked
    assert main([*args]) == 0  # last response only
    assert capsys.readouterr().out.split("[[...]])\n", 1)[1].count("[[") == 1
    assert main(["data", "finetune-check", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokdir),
                 "--max-seq-len", "64"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_folder_of_ndjson_and_a_csv_with_a_long_field(tmp_path, tok):
    """Finetuning reads the files the corpus reader does (.ndjson counted as data) and CSV fields longer than
    the csv module's default 128 KiB limit (the long response is truncated to max_seq_len, not skipped)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.ndjson").write_text(json.dumps({"prompt": "x = 1", "response": " y = 2"}) + "\n")
    long = "z" * 200_000
    (d / "b.csv").write_text(f"prompt,response\nq,{long}\n")
    ds = build_finetune_dataset(d, tok, FinetuneOptions(max_seq_len=32))
    assert ds.stats.examples == 2 and ds.stats.bad["total"] == 0 and ds.stats.truncated == 1
