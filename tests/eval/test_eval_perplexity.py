"""`mptkit eval perplexity`: sliding windows against transformers' MptForCausalLM and a plain full-logits loop."""

from __future__ import annotations

import inspect
import json
import math
import textwrap

import pytest
import torch

from mptkit.cli import main
from mptkit.errors import EvalError
from mptkit.eval import encode_texts, load_token_stream, perplexity, sliding_windows
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from tests.helpers import SCORES, VOCAB, model_folder


def _model_folder(tmp_path, make_tokenizer, *, name="model", **over):
    """A tiny model (``helpers.SCORES`` spread: predictions and choices' scores clearly differ, drawn from the
    test's seeded RNG) saved with the test tokenizer as ``tmp_path/name``."""
    tok = load_tokenizer(make_tokenizer())
    return model_folder(tmp_path / name, tok, seed=None, spread=SCORES, **over)


def _stdlib_text(*modules) -> str:
    return "".join(inspect.getsource(m) for m in modules)


def _reference_nll(model, ids: list[int], L: int, S: int) -> tuple[float, int]:
    """Independent reference: the plain loop (full logits, log_softmax), scoring window [begin, end)'s tokens
    from the previous window's end, the first token of the stream unscored."""
    per = _reference_token_nll(model, ids, L, S)
    return sum(per.values()), len(per)


def _reference_token_nll(model, ids: list[int], L: int, S: int) -> dict[int, float]:
    """The same loop, returning {stream position: NLL of the token there} for every scored token."""
    per, prev_end, begin = {}, 0, 0
    x_all = torch.tensor(ids)
    while prev_end < len(ids):
        begin = min(begin, max(prev_end - 1, 0))
        end = min(begin + L, len(ids))
        x = x_all[begin:end][None]
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits.double(), -1)[0]
        for t in range(max(prev_end, begin + 1), end):
            assert t not in per
            per[t] = -lp[t - 1 - begin, ids[t]].item()
        prev_end = end
        begin += S
    return per


def test_sliding_windows_score_every_token_exactly_once():
    """Windows cover tokens 1..n-1 exactly once, are at most L long, and give every token scored after the
    first window at least L - S tokens of context (1 when S == L)."""
    for n in (2, 5, 17, 64, 65, 100, 257):
        for L in (2, 4, 16, 64):
            for S in sorted({1, max(1, L // 2), L - 1 or 1, L}):
                ws = sliding_windows(n, L, S)
                scored = [t for b, e, f in ws for t in range(f, e)]
                assert scored == list(range(1, n)), (n, L, S)
                assert all(0 < e - b <= L and b < f for b, e, f in ws)
                for b, _, f in ws[1:]:
                    assert f - b >= max(1, L - S)
    with pytest.raises(EvalError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(EvalError, match="stride"):
        sliding_windows(10, 4, 0)


def test_perplexity_matches_transformers_sliding_window_loop(tmp_path, make_tokenizer):
    """The loss equals the HF "perplexity of fixed-length models" loop run on transformers' own
    MptForCausalLM loaded from the same folder (labels -100 outside each window's new tokens), for a
    stride below the window and past max_seq_len (ALiBi), with batching."""
    from transformers import MptForCausalLM as HFMpt

    folder = _model_folder(tmp_path, make_tokenizer, expansion_ratio=4, attn_config={"attn_impl": "auto"})
    tok = load_tokenizer(folder)
    ours = MPTForCausalLM.from_pretrained(folder)  # the default backend choice (CPU: ALiBi on the flash kernel)
    hf = HFMpt.from_pretrained(folder, max_seq_len=128).eval()  # its ALiBi table is only max_seq_len long
    ids = encode_texts(_stdlib_text(textwrap), tok, max_tokens=400).ids.tolist()
    for L, S in ((64, 24), (96, 40)):  # 96 > max_seq_len 64: ALiBi extrapolation
        nll, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), S):
            end = min(begin + L, len(ids))
            trg = end - prev_end
            x = torch.tensor(ids[begin:end])[None]
            labels = x.clone()
            labels[:, :-trg] = -100
            with torch.no_grad():
                out = hf(x, labels=labels)
            n_valid = int((labels[:, 1:] != -100).sum())
            nll += out.loss.item() * n_valid
            count += n_valid
            prev_end = end
            if end == len(ids):
                break
        got = perplexity(ours, ids, max_seq_len=L, stride=S, batch_size=3)
        assert got.tokens == count == len(ids) - 1
        assert got.loss == pytest.approx(nll / count, rel=2e-5)
        assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got.loss < math.log(VOCAB) - 0.05 or got.loss > math.log(VOCAB) + 0.05  # not a uniform model


def test_text_stream_joins_documents_with_eos_and_counts_bytes(tmp_path, make_tokenizer):
    """Text becomes [eos] doc1 [eos] doc2 with every document token scored; bits per byte is the total NLL
    in bits over the documents' UTF-8 bytes; the loss equals a plain full-logits loop with stride == window
    (each window starting at the previous one's last token)."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    docs = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)  # é\n"]
    s = encode_texts(docs, tok)
    eos = tok.eos_token_id
    d1, d2 = (tok.encode(d, add_special_tokens=False) for d in docs)
    assert s.ids.tolist() == [eos, *d1, eos, *d2]
    assert s.n_bytes == sum(len(d.encode()) for d in docs) and s.documents == 2
    model = MPTForCausalLM.from_pretrained(folder)
    r = perplexity(model, docs, tok, max_seq_len=16, stride=16)
    ref, count = _reference_nll(model, s.ids.tolist(), 16, 16)
    assert r.tokens == count == len(d1) + len(d2) + 1
    assert r.total_nll == pytest.approx(ref, rel=1e-5)
    assert r.loss == pytest.approx(ref / count, rel=1e-5)  # the loss covers every scored token, EOS included
    # max_tokens cuts the stream (bytes then come from the kept ids)
    cut = encode_texts(docs, tok, max_tokens=5)
    assert cut.ids.tolist() == [eos, *d1[:4]] and cut.n_bytes == len(tok.decode(d1[:4]).encode())


def test_bits_per_byte_leaves_out_the_eos_separators(tmp_path, make_tokenizer):
    """Bits per byte is the NLL of the document tokens only, over the documents' bytes: it equals an
    independent full-logits computation that sums the per-token NLL at every position except the EOS
    separators (found from the documents' own token counts), for strides below and equal to the window,
    while loss/perplexity still average over every scored token, separators included. The separators'
    NLL is large for this model, so counting them would change bits per byte."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    docs = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)  # é\n", "class A:\n    pass\n",
            "x = [i * i for i in range(10)]\n"]
    lens = [len(tok.encode(d, add_special_tokens=False)) for d in docs]
    sep_pos = [1 + sum(lens[:k]) + (k - 1) for k in range(1, len(docs))]  # [eos] d1 [eos] d2 ...
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    s = encode_texts(docs, tok)
    assert [int(s.ids[p]) for p in sep_pos] == [tok.eos_token_id] * 3 and s.separators.tolist() == sep_pos
    for L, S in ((16, 16), (16, 5), (12, 7)):
        per = _reference_token_nll(model, s.ids.tolist(), L, S)
        doc_nll = sum(v for t, v in per.items() if t not in sep_pos)
        sep_nll = sum(per[t] for t in sep_pos)
        r = perplexity(model, docs, tok, max_seq_len=L, stride=S, batch_size=2)
        assert r.tokens == len(per) == sum(lens) + 3 and r.separators == 3
        assert r.loss == pytest.approx(sum(per.values()) / len(per), rel=1e-5)
        assert r.document_nll == pytest.approx(doc_nll, rel=1e-5)
        assert r.bits_per_byte == pytest.approx(doc_nll / math.log(2) / n_bytes, rel=1e-5)
        assert sep_nll / math.log(2) / n_bytes > 1e-2  # counting separators would be visibly different
    # token ids carry no byte count: no bits per byte, no document NLL
    ids_only = perplexity(model, s.ids.tolist(), max_seq_len=16, stride=16)
    assert ids_only.bits_per_byte is None and ids_only.document_nll is None and ids_only.separators == 0


def test_prepared_folder_reads_the_val_split(tmp_path, make_tokenizer):
    """A folder from `mptkit data prepare` is read through TokenDataset: the val rows concatenated, scored like
    any token stream; a dataset made with another tokenizer is refused."""
    from mptkit.data.prepare import prepare_dataset
    from mptkit.data.shards import TokenDataset

    folder = _model_folder(tmp_path, make_tokenizer)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, mod in enumerate((textwrap, json)):
        (corpus / f"m{i}.py").write_text(inspect.getsource(mod))
    prepare_dataset([str(corpus)], str(folder), tmp_path / "prep", 32, val_fraction=0.5, split_seed=3,
                    num_workers=1, progress=False)
    ds = TokenDataset(tmp_path / "prep", "val")
    assert len(ds) > 0
    rows = [int(t) for i in range(len(ds)) for t in ds.row(i)]
    model = MPTForCausalLM.from_pretrained(folder)
    tok = load_tokenizer(folder)
    stream = load_token_stream(tmp_path / "prep", tok, vocab_size=VOCAB)
    assert stream.ids.tolist() == rows and stream.n_bytes is None
    r = perplexity(model, stream, max_seq_len=32, stride=20, batch_size=5)
    ref, count = _reference_nll(model, rows, 32, 20)
    assert r.tokens == count and r.total_nll == pytest.approx(ref, rel=1e-5) and r.bits_per_byte is None
    other = tmp_path / "other_tok"
    make_tokenizer(other, vocab_size=300)
    with pytest.raises(EvalError, match="different tokenizer"):
        load_token_stream(tmp_path / "prep", load_tokenizer(other))


def test_cli_perplexity_prints_and_writes_json(tmp_path, make_tokenizer, capsys):
    """`mptkit eval perplexity MODEL --data FILE --json OUT` prints loss/perplexity/bits per byte and writes
    the same figures as the Python API."""
    folder = _model_folder(tmp_path, make_tokenizer)
    data = tmp_path / "data.txt"
    data.write_text(_stdlib_text(textwrap)[:6000])
    out = tmp_path / "ppl.json"
    rc = main(["eval", "perplexity", str(folder), "--data", str(data), "--stride", "32", "--max-tokens", "600",
               "--device", "cpu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "bits per byte" in text
    got = json.loads(out.read_text())
    model = MPTForCausalLM.from_pretrained(folder)
    api = perplexity(model, load_token_stream(data, load_tokenizer(folder), max_tokens=600), stride=32)
    assert got["loss"] == pytest.approx(api.loss, rel=1e-6) and got["tokens"] == api.tokens == 599
    assert got["bits_per_byte"] == pytest.approx(api.bits_per_byte, rel=1e-6)


def test_bad_input_is_reported_without_traceback(tmp_path, make_tokenizer, capsys):
    """Missing data, empty data, data shorter than one window, bad options and windows past max_seq_len
    with learned positions are one-line errors (exit 2) that say what to change."""
    folder = _model_folder(tmp_path, make_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "no text field"}\n')
    cases = [
        (["--data", str(tmp_path / "nope.txt")], "no such file"),
        (["--data", str(empty)], "no tokens"),
        (["--data", str(jl)], "no tokens"),
        (["--data", str(short)], "shorter than one window"),
        (["--data", str(short), "--max-seq-len", "1"], "at least 2"),
        (["--data", str(short), "--max-seq-len", "4", "--stride", "9"], "stride"),
    ]
    for extra, msg in cases:
        rc = main(["eval", "perplexity", str(folder), "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (extra, err)
    assert main(["eval", "perplexity", str(tmp_path / "nomodel"), "--data", str(short)]) == 2
    assert "no such folder" in capsys.readouterr().err
    # --allow-short scores one short window
    assert main(["eval", "perplexity", str(folder), "--data", str(short), "--allow-short", "--device", "cpu"]) == 0
    learned = _model_folder(tmp_path, make_tokenizer, name="learned", learned_pos_emb=True,
                            attn_config={"alibi": False})
    model = MPTForCausalLM.from_pretrained(learned)
    with pytest.raises(EvalError, match="learned position embeddings"):
        perplexity(model, list(range(200)), max_seq_len=128)
    assert perplexity(model, list(range(200)), max_seq_len=64).tokens == 199


def test_window_coverage_check_is_an_error_not_an_assert(tmp_path, make_tokenizer, monkeypatch):
    """The check that every token was scored once is a real EvalError (it survives `python -O`, which strips
    asserts): windows that leave tokens unscored are reported as an internal error, not a wrong figure."""
    import importlib

    ppl = importlib.import_module("mptkit.eval.perplexity")  # the package attribute is the function

    folder = _model_folder(tmp_path, make_tokenizer)
    model = MPTForCausalLM.from_pretrained(folder)
    good = ppl.sliding_windows
    monkeypatch.setattr(ppl, "sliding_windows", lambda n, L, S: good(n, L, S)[:-1])
    with pytest.raises(EvalError, match="internal error.*scored"):
        perplexity(model, list(range(100)), max_seq_len=32, stride=16)


def test_cli_attn_impl_chooses_the_backend(tmp_path, make_tokenizer, capsys):
    """--attn-impl overrides the folder's attention backend (eager torch gives the same loss as auto), and an
    unknown backend is a one-line error (exit 2)."""
    folder = _model_folder(tmp_path, make_tokenizer)
    data = tmp_path / "data.txt"
    data.write_text(_stdlib_text(textwrap)[:3000])
    losses = []
    for impl in ("auto", "torch"):
        out = tmp_path / f"{impl}.json"
        assert main(["eval", "perplexity", str(folder), "--data", str(data), "--max-tokens", "300", "--device", "cpu",
                     "--attn-impl", impl, "--json", str(out)]) == 0
        losses.append(json.loads(out.read_text())["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    capsys.readouterr()
    assert main(["eval", "perplexity", str(folder), "--data", str(data), "--attn-impl", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
