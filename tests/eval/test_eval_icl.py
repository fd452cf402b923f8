"""`mptkit eval icl`: llm-foundry JSONL tasks, checked against log-likelihoods computed independently here."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

from mptkit.cli import main
from mptkit.errors import EvalError
from mptkit.eval import build_prompt, icl_accuracy, read_icl_jsonl
from mptkit.eval.icl import ICLTask, fewshot_draws
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from tests.helpers import SCORES, model_folder


def _model_folder(tmp_path, make_tokenizer, *, name="model", **over):
    """A tiny model (``helpers.SCORES`` spread: predictions and choices' scores clearly differ, drawn from the
    test's seeded RNG) saved with the test tokenizer as ``tmp_path/name``."""
    tok = load_tokenizer(make_tokenizer())
    return model_folder(tmp_path / name, tok, seed=None, spread=SCORES, **over)


CHOICES = [" return None", " import os", " class Foo:", " def f(x):", " pass"]


def _lines(n: int) -> list[str]:
    """Short, distinct, non-blank lines of stdlib source without trailing whitespace."""
    out = []
    for ln in inspect.getsource(textwrap).splitlines():
        s = ln.strip()
        if 8 <= len(s) <= 60 and s not in out:
            out.append(s)
    return out[:n]


def _ref_logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Independent reference: one unpadded forward, full logits, log_softmax, summed over the answer tokens."""
    x = torch.tensor(prompt_ids + answer_ids)[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits.double(), -1)[0]
    p = len(prompt_ids)
    return sum(lp[p - 1 + i, t].item() for i, t in enumerate(answer_ids))


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_multiple_choice_matches_independent_loglikelihoods_and_reaches_0_and_1(tmp_path, make_tokenizer):
    """Per-choice summed log-likelihoods equal an unpadded full-logits forward of query + " choice" (the
    trailing-space rule); with gold set to each record's best choice accuracy is 1, set to its worst it is 0,
    and acc_norm follows the per-token mean in the same way."""
    folder = _model_folder(tmp_path, make_tokenizer, attn_config={"attn_impl": "auto"})
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    ref_model = MPTForCausalLM.from_pretrained(folder, attn_impl="torch")
    queries = _lines(12)
    ref = []
    for q in queries:
        p = tok.encode(q, add_special_tokens=False)
        ref.append([(_ref_logprob(ref_model, p, tok.encode(c, add_special_tokens=False)),
                     len(tok.encode(c, add_special_tokens=False))) for c in CHOICES])
    best = [max(range(len(CHOICES)), key=lambda j, r=r: r[j][0]) for r in ref]
    worst = [min(range(len(CHOICES)), key=lambda j, r=r: r[j][0]) for r in ref]
    best_n = [max(range(len(CHOICES)), key=lambda j, r=r: r[j][0] / r[j][1]) for r in ref]
    worst_n = [min(range(len(CHOICES)), key=lambda j, r=r: r[j][0] / r[j][1]) for r in ref]
    assert best != worst and len(set(best)) > 1  # the model tells the choices apart
    # choices in the file are given without the leading space: the continuation delimiter " " adds it
    recs = [{"query": q, "choices": [c.lstrip() for c in CHOICES], "gold": g} for q, g in zip(queries, best)]
    res = icl_accuracy(model, tok, recs, batch_size=7)
    assert res.task_type == "multiple_choice" and res.examples == len(queries)
    for d, r in zip(res.details, ref):
        assert d["logprobs"] == pytest.approx([lp for lp, _ in r], rel=1e-4, abs=1e-4)
        assert d["tokens"] == [k for _, k in r]
    assert res.accuracy == 1.0
    assert res.accuracy_norm == pytest.approx(sum(a == b for a, b in zip(best, best_n)) / len(queries))
    worst_recs = [dict(r, gold=g) for r, g in zip(recs, worst)]
    assert icl_accuracy(model, tok, worst_recs).accuracy == 0.0
    assert icl_accuracy(model, tok, [dict(r, gold=g) for r, g in zip(recs, best_n)]).accuracy_norm == 1.0
    assert icl_accuracy(model, tok, [dict(r, gold=g) for r, g in zip(recs, worst_n)]).accuracy_norm == 0.0


def test_language_modeling_greedy_match_reaches_1_and_0(tmp_path, make_tokenizer):
    """A continuation equal to the model's own two greedy tokens (found here with unpadded full-logits
    forwards) is correct; changing its second token to a non-argmax one makes every record wrong."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    good, bad = [], []
    for ctx in _lines(120):
        p = tok.encode(ctx, add_special_tokens=False)
        with torch.no_grad():
            g1 = int(model(torch.tensor([p])).logits[0, -1].argmax())
            logits2 = model(torch.tensor([[*p, g1]])).logits[0, -1]
        g2 = int(logits2.argmax())
        wrong = int(logits2.argsort()[-2])  # the runner-up: not the argmax
        cont, cont_bad = tok.decode([g1, g2]), tok.decode([g1, wrong])
        if min(g1, g2, wrong) < 2 or not cont.strip() or not cont_bad.strip():
            continue  # special tokens, or text that is only whitespace
        if tok.encode(cont, add_special_tokens=False) != [g1, g2] or \
                tok.encode(cont_bad, add_special_tokens=False) != [g1, wrong]:
            continue  # the ids must round-trip through text
        if any(not c.startswith(" ") or c[1:] != c.strip() for c in (cont, cont_bad)):
            continue  # llm-foundry strips the continuation and puts one space before it: " word..." survives
        good.append({"context": ctx, "continuation": cont})
        bad.append({"context": ctx, "continuation": cont_bad})
        if len(good) == 8:
            break
    assert len(good) >= 5
    r = icl_accuracy(model, tok, good, continuation_delimiter="", batch_size=4)
    assert r.task_type == "language_modeling" and r.accuracy == 1.0 and r.accuracy_norm is None
    assert icl_accuracy(model, tok, bad, continuation_delimiter="", batch_size=3).accuracy == 0.0


def test_fewshot_prompt_construction(tmp_path):
    """Shots come from the other records (never the item itself), are distinct, depend only on (seed, index),
    and are joined as [prompt_string + ED +] shot + ED + ... + context + CD with each shot = context + CD +
    answer (MC: choices[gold]); the defaults are llm-foundry's (ED "\n", CD " ", no prompt string)."""
    recs = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    task = ICLTask(name="t", task_type="multiple_choice", examples=recs)
    draws = fewshot_draws(6, 3, seed=7)
    assert draws == fewshot_draws(6, 3, seed=7) and draws != fewshot_draws(6, 3, seed=8)
    for i in range(6):
        idx = draws[i]
        assert i not in idx and len(set(idx)) == 3
        shots = [f"Q{j}? {recs[j]['choices'][recs[j]['gold']]}" for j in idx]
        # llm-foundry: the asked context is right-stripped (CD's space goes to the answer as a prefix space)
        assert build_prompt(task, i, num_fewshot=3, seed=7) == "\n".join([*shots, f"Q{i}?"])
        want = "PRE\n\n" + "\n\n".join([*shots, f"Q{i}?"])  # llm-foundry: ED after the prompt string too
        assert build_prompt(task, i, num_fewshot=3, seed=7, prompt_string="PRE", example_delimiter="\n\n") == want
    assert build_prompt(task, 2, example_delimiter="\n\n", continuation_delimiter=" ->") == "Q2? ->"
    assert build_prompt(task, 2, prompt_string="Answer:") == "Answer:\nQ2?"
    assert sorted(fewshot_draws(6, 5, 1)[0]) == [1, 2, 3, 4, 5]
    with pytest.raises(EvalError, match="only 6 records"):
        fewshot_draws(6, 6, 1)


def test_batching_padding_and_fewshot_scores_are_consistent(tmp_path, make_tokenizer):
    """Right-padded batches of any size give the same per-choice scores as one request at a time; a few-shot
    record's score equals the reference forward of its full prompt (shots included; window past max_seq_len),
    and with the default window (max_seq_len) the prompt's start is cut and the answer kept whole."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    recs = [{"query": q, "choices": ["yes", "no", "maybe not"], "gold": 0} for q in _lines(8)]
    a = icl_accuracy(model, tok, recs, num_fewshot=2, batch_size=1, seed=3, max_seq_len=256)
    b = icl_accuracy(model, tok, recs, num_fewshot=2, batch_size=5, seed=3, max_seq_len=256)
    assert a.truncated == b.truncated == 0
    for da, db in zip(a.details, b.details):
        assert da["logprobs"] == pytest.approx(db["logprobs"], abs=1e-4)
    task = ICLTask(name="t", task_type="multiple_choice", examples=recs)
    ans = tok.encode(" maybe not", add_special_tokens=False)
    longest = None
    for i in range(len(recs)):
        prompt = build_prompt(task, i, num_fewshot=2, seed=3)
        asked = "\n" + recs[i]["query"]
        assert prompt.endswith(asked) and prompt.count("\n") == 2
        # llm-foundry: the shots and the asked query are tokenized apart
        p = tok.encode(prompt[: -len(asked)], add_special_tokens=False) + tok.encode(asked, add_special_tokens=False)
        assert a.details[i]["logprobs"][2] == pytest.approx(_ref_logprob(model, p, ans), abs=1e-4)
        if len(p) + len(ans) > 64 and (longest is None or len(p) > len(longest[1])):
            longest = (i, p)
    assert longest is not None  # a prompt longer than max_seq_len: the default window truncates it
    i, p = longest
    c = icl_accuracy(model, tok, recs, num_fewshot=2, seed=3)
    assert c.truncated > 0
    assert c.details[i]["logprobs"][2] == pytest.approx(_ref_logprob(model, p[-(64 - len(ans)):], ans), abs=1e-4)


def test_task_files_bad_input(tmp_path):
    """Malformed JSONL and missing keys name file:line and the keys expected; unknown task types, empty or
    missing files and impossible shot counts are EvalErrors; the type is inferred from the keys."""
    lm = _write_jsonl(tmp_path / "lm.jsonl", [{"context": "a", "continuation": "b"}] * 3)
    assert read_icl_jsonl(lm).task_type == "language_modeling"
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"query": "q", "choices": ["x", "y"], "gold": 1}])
    assert read_icl_jsonl(mc, "mc").task_type == "multiple_choice"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"context": "a", "continuation": "b"}\n\n{"context": "a", \n')
    with pytest.raises(EvalError, match=r"bad.jsonl:3: malformed JSON"):
        read_icl_jsonl(bad_json)
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"query": "q", "choices": ["x", "y"], "gold": 0},
                                                        {"query": "q", "choices": ["x", "y"]}])
    with pytest.raises(EvalError, match=r"missing.jsonl:2: missing key 'gold'.*'query', 'choices', 'gold'"):
        read_icl_jsonl(missing)
    with pytest.raises(EvalError, match=r"x.jsonl:1: cannot tell the task type.*'context', 'continuation'"):
        read_icl_jsonl(_write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(EvalError, match=r"mc.jsonl:1: missing key 'context'"):
        read_icl_jsonl(mc, "language_modeling")
    with pytest.raises(EvalError, match="gold"):
        read_icl_jsonl(_write_jsonl(tmp_path / "g.jsonl", [{"query": "q", "choices": ["x", "y"], "gold": 2}]))
    with pytest.raises(EvalError, match="unknown task type 'code_evaluation'"):
        read_icl_jsonl(lm, "code_evaluation")
    with pytest.raises(EvalError, match=r"lm.jsonl:1: missing key 'context_options'"):
        read_icl_jsonl(lm, "schema")
    sch = {"context_options": ["a", "b"], "continuation": "c", "gold": 1}
    assert read_icl_jsonl(_write_jsonl(tmp_path / "s.jsonl", [sch])).task_type == "schema"
    with pytest.raises(EvalError, match=r"s2.jsonl:1: key 'gold' is 2, expected an integer index into 'context_options'"):
        read_icl_jsonl(_write_jsonl(tmp_path / "s2.jsonl", [{**sch, "gold": 2}]))
    qa = {"context": "Q: a?", "answer": "b", "aliases": ["b", "bee"]}
    assert read_icl_jsonl(_write_jsonl(tmp_path / "qa.jsonl", [qa])).task_type == "generation_task_with_answers"
    assert read_icl_jsonl(_write_jsonl(tmp_path / "qa1.jsonl", [qa]), "question_answering").task_type == (
        "generation_task_with_answers")  # llm-foundry's former name
    no_aliases = {"context": "Q: a?", "answer": "b", "chain_of_thought": "because"}  # aliases are optional
    assert read_icl_jsonl(_write_jsonl(tmp_path / "qa0.jsonl", [no_aliases])).task_type == (
        "generation_task_with_answers")
    with pytest.raises(EvalError, match=r"qa2.jsonl:1: key 'aliases' \(optional\) must be a list of strings"):
        read_icl_jsonl(_write_jsonl(tmp_path / "qa2.jsonl", [{**qa, "aliases": "b"}]))
    with pytest.raises(EvalError, match=r"qa3.jsonl:1: .*at least one non-empty answer"):
        read_icl_jsonl(_write_jsonl(tmp_path / "qa3.jsonl", [{**qa, "answer": " ", "aliases": [""]}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="no records"):
        read_icl_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(EvalError, match="no such file"):
        read_icl_jsonl(tmp_path / "nope.jsonl")


def test_cli_icl_several_tasks_and_shots(tmp_path, make_tokenizer, capsys):
    """`mptkit eval icl MODEL --tasks A,B --num-fewshot 0,1 --json OUT` evaluates every (task, shots) pair with
    the same numbers as the API; errors (a malformed file, too many shots, bad option values) are one line,
    exit 2."""
    folder = _model_folder(tmp_path, make_tokenizer)
    lines = _lines(10)
    lm = _write_jsonl(tmp_path / "lm.jsonl", [{"context": ln[:-3], "continuation": ln[-3:]} for ln in lines])
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"query": ln, "choices": ["pass", "return"], "gold": i % 2}
                                              for i, ln in enumerate(lines)])
    out = tmp_path / "icl.json"
    rc = main(["eval", "icl", str(folder), "--tasks", f"{lm},{mc}", "--num-fewshot", "0,1", "--device", "cpu",
               "--continuation-delimiter", "", "--example-delimiter", "\\n\\n", "--json", str(out), "--details"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "multiple_choice" in text and "language_modeling" in text
    got = json.loads(out.read_text())
    assert [(r["task"], r["num_fewshot"]) for r in got["results"]] == [("lm", 0), ("lm", 1), ("mc", 0), ("mc", 1)]
    assert got["example_delimiter"] == "\n\n" and got["continuation_delimiter"] == ""
    model = MPTForCausalLM.from_pretrained(folder)
    api = icl_accuracy(model, load_tokenizer(folder), mc, num_fewshot=1, continuation_delimiter="",
                       example_delimiter="\n\n")
    assert got["results"][3]["accuracy"] == api.accuracy and got["results"][3]["accuracy_norm"] == api.accuracy_norm
    assert len(got["results"][3]["details"]) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["eval", "icl", str(folder), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: malformed JSON" in err and "Traceback" not in err
    assert main(["eval", "icl", str(folder), "--tasks", mc, "--num-fewshot", "10", "--device", "cpu"]) == 2
    assert "only 10 records" in capsys.readouterr().err
    assert main(["eval", "icl", str(folder), "--tasks", mc, "--task-type", "code_evaluation"]) == 2
    assert "unknown task type" in capsys.readouterr().err
    assert main(["eval", "icl", str(folder), "--tasks", mc, "--task-type", "generation"]) == 2
    assert "missing key 'context' (a generation_task_with_answers record" in capsys.readouterr().err
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"context": f"Q: {ln}\nA:", "answer": "x", "aliases": ["y"]}
                                              for ln in _lines(4)])
    assert main(["eval", "icl", str(folder), "--tasks", qa, "--stop", "\\n,?", "--device", "cpu", "--json",
                 str(out), "--details"]) == 0
    assert "generation_task_with_answers" in capsys.readouterr().out
    api = icl_accuracy(model, load_tokenizer(folder), qa, stop=["\n", "?"])
    assert [d["output"] for d in json.loads(out.read_text())["results"][0]["details"]] == [
        d["output"] for d in api.details]
    assert all("\n" not in d["output"] and "?" not in d["output"] for d in api.details)
    assert main(["eval", "icl", str(folder), "--tasks", qa, "--stop", '["\\n", "?", "a, b"]', "--device", "cpu",
                 "--json", str(out), "--details"]) == 0  # a JSON list: strings with commas
    assert [d["output"] for d in json.loads(out.read_text())["results"][0]["details"]] == [
        d["output"] for d in icl_accuracy(model, load_tokenizer(folder), qa, stop=["\n", "?", "a, b"]).details]
    capsys.readouterr()
    assert main(["eval", "icl", str(folder), "--tasks", qa, "--stop", '["unclosed']) == 2
    assert "not a JSON list" in capsys.readouterr().err
    for extra, msg in ((["--max-examples", "0"], "--max-examples 0"), (["--batch-size", "0"], "--batch-size 0"),
                       (["--num-fewshot", "one"], "expected integers"), (["--task-type", "lm,mc,lm"], "3 types")):
        assert main(["eval", "icl", str(folder), "--tasks", f"{lm},{mc}", "--device", "cpu", *extra]) == 2
        assert msg in capsys.readouterr().err, extra


def test_cli_and_api_score_llm_foundrys_default_prompt(tmp_path, make_tokenizer, capsys, monkeypatch):
    """Without --example-delimiter / --continuation-delimiter / --prompt-string, `mptkit eval icl` (and
    icl_accuracy, build_prompt) score each choice after llm-foundry's default prompt (its
    build_icl_evaluators defaults): shots joined by "\\n", " " between a query and its answer, no prompt
    string — every per-choice log-likelihood equals an unpadded forward of that literal text + " choice";
    a prompt with other delimiters scores differently; --help names the defaults."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder, attn_impl="torch")
    choices = ["pass", "return x"]
    recs = [{"query": q, "choices": choices, "gold": i % 2} for i, q in enumerate(_lines(5))]
    mc = _write_jsonl(tmp_path / "mc.jsonl", recs)
    task = ICLTask(name="mc", task_type="multiple_choice", examples=recs)
    out = tmp_path / "icl.json"
    assert main(["eval", "icl", str(folder), "--tasks", mc, "--num-fewshot", "2", "--device", "cpu",
                 "--max-seq-len", "256", "--json", str(out), "--details"]) == 0  # every prompt fits
    [res] = json.loads(out.read_text())["results"]
    assert res["truncated"] == 0
    cli = res["details"]
    api = icl_accuracy(model, tok, recs, num_fewshot=2, seed=1234, max_seq_len=256).details  # CLI's --seed
    for i, r in enumerate(recs):
        shots = [f"{recs[j]['query']} {choices[recs[j]['gold']]}" for j in fewshot_draws(len(recs), 2, 1234)[i]]
        pre = "\n".join(shots)  # llm-foundry: ED "\n" between parts, CD " " before the answer
        assert build_prompt(task, i, num_fewshot=2, seed=1234) == pre + "\n" + r["query"]
        # the shots and the asked query are tokenized apart (llm-foundry), the answer after a space
        ids = tok.encode(pre, add_special_tokens=False) + tok.encode("\n" + r["query"], add_special_tokens=False)
        ref = [_ref_logprob(model, ids, tok.encode(" " + c, add_special_tokens=False)) for c in choices]
        assert cli[i]["logprobs"] == pytest.approx(ref, abs=1e-4), i
        assert api[i]["logprobs"] == pytest.approx(ref, abs=1e-4), i
    other = icl_accuracy(model, tok, recs, num_fewshot=2, seed=1234, example_delimiter="\n\n",
                         continuation_delimiter=": ", prompt_string="Answer:", max_seq_len=256).details
    assert all(o["logprobs"] != pytest.approx(a["logprobs"], abs=1e-3) for o, a in zip(other, api))
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps --help to the terminal (and breaks at hyphens)
    with pytest.raises(SystemExit):
        main(["eval", "icl", "--help"])
    text = capsys.readouterr().out
    assert "default '\\n', llm-foundry's example_delimiter" in text
    assert "default ' ', llm-foundry's continuation_delimiter" in text


def test_schema_scores_the_continuation_after_each_context_option(tmp_path, make_tokenizer):
    """Schema (Winograd-style): the log-likelihood of the one continuation after each context option equals an
    unpadded full-logits forward of option + " continuation"; gold set to the best option gives accuracy 1,
    to the worst 0; a shot shows the gold option and the continuation."""
    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    lines = _lines(18)
    recs = [{"context_options": lines[3 * i : 3 * i + 3], "continuation": CHOICES[i % len(CHOICES)].strip(),
             "gold": 0} for i in range(6)]
    ref = []
    for r in recs:
        a = tok.encode(" " + r["continuation"], add_special_tokens=False)
        ref.append([_ref_logprob(model, tok.encode(o, add_special_tokens=False), a) for o in r["context_options"]])
    best = [max(range(3), key=lambda j, r=r: r[j]) for r in ref]
    worst = [min(range(3), key=lambda j, r=r: r[j]) for r in ref]
    res = icl_accuracy(model, tok, [{**r, "gold": b} for r, b in zip(recs, best)])
    assert res.task_type == "schema" and res.accuracy == 1.0 and res.accuracy_norm == 1.0
    for d, r in zip(res.details, ref):
        assert d["logprobs"] == pytest.approx(r, abs=2e-4)
    assert icl_accuracy(model, tok, [{**r, "gold": w} for r, w in zip(recs, worst)]).accuracy == 0.0
    task = ICLTask(name="s", task_type="schema", examples=[{**r, "gold": 1} for r in recs])
    p = build_prompt(task, 0, num_fewshot=1, seed=3, option=2)
    [shot] = fewshot_draws(6, 1, 3)[0]
    s = recs[shot]  # llm-foundry: ED + option + CD.rstrip() after the shots
    assert p == f"{s['context_options'][1]} {s['continuation']}\n{recs[0]['context_options'][2]}"


def test_generation_task_matches_greedy_generation_and_normalized_aliases(tmp_path, make_tokenizer):
    """generation_task_with_answers: each output is the model's greedy continuation of the prompt (trailing
    space dropped) for llm-foundry's budget (the longest answer's tokens; no chain-of-thought delimiter, so no
    +10), computed here by hand with full forwards; correct iff
    its normalized form starts with a normalized alias — aliases made from the output's first word (case,
    punctuation and an article changed) give accuracy 1, unrelated ones 0; a stop string cuts the output."""
    from mptkit.eval.icl import normalize_answer

    folder = _model_folder(tmp_path, make_tokenizer)
    tok = load_tokenizer(folder)
    model = MPTForCausalLM.from_pretrained(folder)
    room = model.config.max_seq_len - 40  # prompts that fit whole with any answer budget used here
    ctx = [c for c in (f"Q: {ln}\nA:" for ln in _lines(16)) if len(tok.encode(c, add_special_tokens=False)) <= room]
    answer = " ".join(["zz"] * 12)
    new = len(tok(answer)["input_ids"])  # llm-foundry's max_answer_length: the answer as written, special tokens
    assert 6 <= new <= 40
    gen_ids = []
    for c in ctx:  # greedy by hand: one full forward per token, stopping at EOS
        ids = tok.encode(c, add_special_tokens=False)
        out = []
        with torch.no_grad():
            for _ in range(40):
                t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if t == tok.eos_token_id:
                    break
                out.append(t)
        gen_ids.append(out)
    first = [normalize_answer(tok.decode(g[:new])) for g in gen_ids]
    keep = [i for i, f in enumerate(first) if f]
    assert len(keep) >= 3, first
    recs = [{"context": ctx[i], "answer": answer, "aliases": ["The " + first[i].split()[0][:2].upper() + "!"]}
            for i in keep]
    assert max(len(tok(a)["input_ids"]) for r in recs for a in r["aliases"]) <= new  # the budget stays the same
    ref = {i: tok.decode(gen_ids[i][:new]) for i in keep}
    res = icl_accuracy(model, tok, recs, batch_size=2)
    assert res.task_type == "generation_task_with_answers" and res.accuracy == 1.0
    assert [d["output"] for d in res.details] == [ref[i] for i in keep]
    assert icl_accuracy(model, tok, [{**r, "aliases": ["qqqq xxxx"]} for r in recs]).accuracy == 0.0
    i0 = keep[0]
    stop = ref[i0].strip()[:1]
    assert stop
    cut = icl_accuracy(model, tok, recs[:1], stop=[stop])
    assert cut.details[0]["output"] == ref[i0][: ref[i0].index(stop)]


def test_a_tokenizer_bigger_than_the_model_is_refused(tmp_path, make_tokenizer):
    """Token ids past the model's vocab_size: an EvalError naming the spans, for scored and generated tasks."""
    from tests.helpers import tiny_cfg

    tok = load_tokenizer(_model_folder(tmp_path, make_tokenizer))
    small = MPTForCausalLM(tiny_cfg(vocab_size=40)).eval()
    with pytest.raises(EvalError, match="vocab_size is 40"):
        icl_accuracy(small, tok, [{"context": "def load(fp):", "continuation": " return"}] * 2)
    with pytest.raises(EvalError, match="vocab_size is 40"):
        icl_accuracy(small, tok, [{"context": "def load(fp):", "answer": "x", "aliases": []}] * 2)
