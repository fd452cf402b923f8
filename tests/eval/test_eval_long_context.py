"""`mptkit eval long-context`: per-position loss for windows of several lengths, checked against full logits."""

from __future__ import annotations

import inspect
import itertools
import json
import textwrap

import numpy as np
import pytest
import torch

from mptkit.cli import main
from mptkit.errors import EvalError
from mptkit.eval import encode_texts, long_context_curve, next_token_logprobs
from mptkit.eval.long_context import bucket_edges, parse_lengths
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from tests.helpers import SCORES, VOCAB, model_folder


def _model_folder(tmp_path, make_tokenizer, *, name="model", **over):
    """A tiny model (``helpers.SCORES`` spread: predictions and choices' scores clearly differ, drawn from the
    test's seeded RNG) saved with the test tokenizer as ``tmp_path/name``."""
    tok = load_tokenizer(make_tokenizer())
    return model_folder(tmp_path / name, tok, seed=None, spread=SCORES, **over)


def test_curve_matches_full_logits_per_window(tmp_path, make_tokenizer):
    """For lengths below, at and past max_seq_len (64; ALiBi), the per-position loss equals the mean over the
    non-overlapping windows of log_softmax of the model's full logits (eager attention), and the buckets and
    the overall loss are the means of those positions; every length reads the same prefix of the data."""
    folder = _model_folder(tmp_path, make_tokenizer, attn_config={"attn_impl": "auto"})
    tok = load_tokenizer(folder)
    ids = encode_texts(inspect.getsource(textwrap), tok, max_tokens=700).ids
    model = MPTForCausalLM.from_pretrained(folder)
    ref_model = MPTForCausalLM.from_pretrained(folder, attn_impl="torch")
    rows = long_context_curve(model, ids, "128,16,64", buckets=4, max_tokens=512, batch_tokens=200)
    assert [r.length for r in rows] == [16, 64, 128]
    for r in rows:
        T = r.length
        nw = 512 // T
        x = torch.from_numpy(ids[: nw * T]).view(nw, T)
        with torch.no_grad():
            lp = torch.log_softmax(ref_model(x).logits.double(), -1)
        nll = -lp[:, :-1].gather(2, x[:, 1:, None]).squeeze(2)  # (nw, T-1)
        pos = nll.mean(0).numpy()
        assert r.windows == nw and r.tokens == nw * (T - 1)
        np.testing.assert_allclose(r.position_loss, pos, rtol=1e-4, atol=1e-5)
        assert r.loss == pytest.approx(float(nll.mean()), rel=1e-5)
        edges = bucket_edges(T, 4)
        assert r.bucket_edges == edges and edges[0] == 1 and edges[-1] == T
        for (a, b), v in zip(itertools.pairwise(edges), r.bucket_loss):
            assert v == pytest.approx(float(pos[a - 1 : b - 1].mean()), rel=1e-5)
        assert r.last_bucket_loss == r.bucket_loss[-1]
        assert r.past_max_seq_len == (T > 64)


def test_scoring_never_builds_full_logits(tmp_path, make_tokenizer):
    """The forward runs without logits (return_logits=False) and the LM head sees at most chunk_elems/vocab
    rows per call; the chunked result equals the full-logits one."""
    folder = _model_folder(tmp_path, make_tokenizer)
    model = MPTForCausalLM.from_pretrained(folder)
    x = torch.randint(0, VOCAB, (2, 300))
    seen, forward_kw = [], []
    orig_logits, orig_forward = model.logits, model.forward

    def logits(h):
        seen.append(h.shape[0])
        return orig_logits(h)

    def forward(*a, **kw):
        forward_kw.append(kw.get("return_logits", True))
        return orig_forward(*a, **kw)

    model.logits, model.forward = logits, forward
    lp, am = next_token_logprobs(model, x, chunk_elems=VOCAB * 50, greedy=True)
    assert forward_kw == [False] and max(seen) <= 50 and sum(seen) == 2 * 299
    model.logits, model.forward = orig_logits, orig_forward
    with torch.no_grad():
        full = torch.log_softmax(model(x).logits, -1)[:, :-1]
    ref = full.gather(2, x[:, 1:, None]).squeeze(2).reshape(-1)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(am, full.argmax(-1).reshape(-1))


def test_learned_positions_refuse_lengths_past_max_seq_len(tmp_path, make_tokenizer):
    """A learned-position model cannot read past max_seq_len: asking is a clear EvalError, lengths within it work."""
    folder = _model_folder(tmp_path, make_tokenizer, learned_pos_emb=True, attn_config={"alibi": False})
    model = MPTForCausalLM.from_pretrained(folder)
    ids = np.arange(400) % VOCAB
    with pytest.raises(EvalError, match=r"learned position embeddings.*max_seq_len=64"):
        long_context_curve(model, ids, [32, 128])
    assert [r.length for r in long_context_curve(model, ids, [32, 64])] == [32, 64]


def test_bad_lengths_and_short_data(tmp_path, make_tokenizer):
    """Lengths must be integers >= 2; every length must fit one window of the data (the message names it)."""
    assert parse_lengths("512, 256,256") == [256, 512]
    for spec, msg in (("256,abc", "not an integer"), ("1.5", "not an integer"), ("1", "too short"), (",", "no lengths")):
        with pytest.raises(EvalError, match=msg):
            parse_lengths(spec)
    folder = _model_folder(tmp_path, make_tokenizer)
    model = MPTForCausalLM.from_pretrained(folder)
    with pytest.raises(EvalError, match=r"not one window of length 256"):
        long_context_curve(model, np.arange(200) % VOCAB, [64, 256])
    with pytest.raises(EvalError, match="vocab_size"):
        long_context_curve(model, np.arange(200) + 400, [64])


def test_cli_long_context_table_and_json(tmp_path, make_tokenizer, capsys):
    """`mptkit eval long-context MODEL --data F --lengths ... --json OUT` prints one row per length (marking
    lengths past max_seq_len) and writes the buckets; a non-integer length is a one-line error."""
    folder = _model_folder(tmp_path, make_tokenizer)
    data = tmp_path / "text.py"
    data.write_text(inspect.getsource(textwrap))
    out = tmp_path / "lc.json"
    rc = main(["eval", "long-context", str(folder), "--data", str(data), "--lengths", "32,64,128", "--buckets", "4",
               "--max-tokens", "512", "--device", "cpu", "--json", str(out), "--positions"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "past max_seq_len" in text and len([ln for ln in text.splitlines() if ln.split()[:1] in (['32'], ['64'], ['128'])]) == 3
    got = json.loads(out.read_text())
    assert [r["length"] for r in got["lengths"]] == [32, 64, 128]
    r = got["lengths"][2]
    assert len(r["buckets"]) == 4 and len(r["position_loss"]) == 127 and r["past_max_seq_len"]
    assert r["last_bucket_loss"] == r["buckets"][-1]["loss"]
    assert main(["eval", "long-context", str(folder), "--data", str(data), "--lengths", "32,x"]) == 2
    assert "'x' is not an integer" in capsys.readouterr().err
