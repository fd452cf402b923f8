"""llm-foundry's ICL construction rebuilt here from its documented rules (independently of mptkit.eval.icl) and
compared token for token; the gauntlet aggregation by hand; `mptkit eval icl --config` / `eval gauntlet` on the
bundled example tasks."""

from __future__ import annotations

import json
import math
import random

import pytest

from mptkit.cli import main
from mptkit.eval.gauntlet import aggregate, parse_gauntlet
from mptkit.eval.icl import ICLTask, build_requests, icl_accuracy, needs_prefix_space
from mptkit.eval.icl_tasks import TaskResult, load_eval_config
from mptkit.io import load_tokenizer
from mptkit.recipes import eval_recipes_dir
from tests.helpers import SCORES, model_folder


# ------------------------------------------------------------------ llm-foundry's rules, written out here
def lf_shots(n: int, k: int, seed: int) -> list[list[int]]:
    """llm-foundry: one random.Random(fewshot_random_seed) for the dataset, records in order; each takes
    sample(range(n), min(n-1, k)) as a set, and if it drew itself, swaps itself for choice(range(n)) draws
    until a new index comes up; the shots are that set, iterated."""
    rng = random.Random(seed)
    out = []
    for me in range(n):
        s = set(rng.sample(range(n), min(n - 1, k)))
        if me in s:
            s.remove(me)
            if not len(s) >= n - 1:
                c = rng.choice(range(n))
                while c in s or c == me:
                    c = rng.choice(range(n))
                s.add(c)
        out.append([x for x in s])
    return out


def lf_sequences(recs, kind, tok, *, k, seed=1234, ps="", ed="\n", cd=" ", pre="", cot_delim="", seq_len=2048):
    """[(context ids, answer ids)] per record (per choice / context option), as llm-foundry's datasets build
    them: strip_data, construct_context with the prelimiter and delimiters, the preamble tokenized with
    special tokens (a trailing EOS removed), the rstripped context without, the answer with a prefix space
    for tokenizers that encode ' a' as one token, trim_context from the left."""
    data = [{key: (v.strip() if isinstance(v, str) else v) for key, v in r.items()} for r in recs]
    space = len(tok(" a", add_special_tokens=False)["input_ids"]) == 1
    has_cot = any("chain_of_thought" in r for r in recs)

    def answer_of(r, in_context):
        if kind == "mc":
            return r["choices"][r["gold"]]
        if kind == "gen":
            return f"{r['chain_of_thought']}{cot_delim}{r['answer']}" if has_cot else r["answer"]
        a = r["continuation"]
        return a if (in_context or not space or a.startswith(" ")) else " " + a

    def construct(r, preceding, add_answer):
        if kind == "schema":
            c = r["context_options"][r["gold"]]
            if preceding:
                c = ed + c
            return f"{pre}{c}{cd}{r['continuation']}"
        c = pre + (r["query"] if kind == "mc" else r["context"])
        if preceding:
            c = ed + c
        c = c + cd
        return c + answer_of(r, True) if add_answer else c

    def preamble_ids(text):
        ids = tok(text)["input_ids"]
        if tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        return ids

    def trim(ctx, ans, size):
        return ctx[-(size - len(ans)):] if len(ctx) + len(ans) > size else ctx

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    budget = 0
    if kind == "gen":
        for r in recs:
            for a in [r["answer"], *r.get("aliases", [])]:
                budget = max(budget, len(tok(f"{r['chain_of_thought']}{cot_delim}{a}" if has_cot else a)["input_ids"]))
        budget += 10 if cot_delim else 0
    shots = lf_shots(len(data), k, seed) if k > 0 else [[] for _ in data]
    out = []
    for i, r in enumerate(data):
        p = ps
        for j in shots[i]:
            p += construct(data[j], p, True)
        head = preamble_ids(p)
        if kind == "schema":
            opts = [f"{pre}{ed}{c}{cd.rstrip()}" for c in r["context_options"]] if p else \
                [f"{pre}{c}" for c in r["context_options"]]
            cont = r["continuation"] if (not space or r["continuation"].startswith(" ")) else " " + r["continuation"]
            for o in opts:
                out.append((trim(head + enc(o), enc(cont), seq_len), enc(cont)))
            continue
        ctx = head + enc(construct(r, p, False).rstrip())
        if kind == "mc":
            for c in r["choices"]:
                a = enc(c if (not space or c.startswith(" ")) else " " + c)
                out.append((trim(ctx, a, seq_len), a))
        elif kind == "gen":
            out.append((trim(ctx, [], seq_len - budget), []))
        else:
            a = enc(answer_of(r, False))
            out.append((trim(ctx, a, seq_len), a))
    return out


TYPES = {"lm": "language_modeling", "mc": "multiple_choice", "schema": "schema", "gen": "generation_task_with_answers"}
# made-up records, with stray whitespace in fields as the public files have
PIQA_LIKE = [{"query": f"  Goal {i}: keep item {i} dry ", "choices": [f" Put it in bag {i}.", f"Soak it {i} times. "],
              "gold": i % 2} for i in range(9)]
LM = [{"context": f" Count {i}, {i + 1},", "continuation": f" {i + 2} "} for i in range(8)]
SCHEMA = [{"context_options": [f"Ann met Bo {i} and Ann", f"Ann met Bo {i} and Bo"], "continuation": f" smiled {i}.",
           "gold": i % 2} for i in range(7)]
COT = [{"context": f"Question: {i} plus {i}? ", "chain_of_thought": f" {i} + {i} = {2 * i}. ", "answer": f" {2 * i}"}
       for i in range(7)]  # gsm8k-style: no aliases
QA = [{"context": f"Q: name {i}?", "answer": f"N{i}", **({"aliases": [f"n{i}", f" N {i} "]} if i % 2 else {})}
      for i in range(6)]

CASES = [  # (kind, records, settings)
    ("mc", PIQA_LIKE, {"cd": "\nAnswer: "}),  # piqa with the gauntlet's delimiter: strip + rstrip + prefix space
    ("mc", PIQA_LIKE, {"cd": "\nAnswer: ", "ps": "Pick one.", "ed": "\n\n", "pre": "Q: ", "seed": 7}),
    ("lm", LM, {"cd": ""}),
    ("lm", LM, {"cd": " ->", "seed": 3}),
    ("schema", SCHEMA, {}),
    ("schema", SCHEMA, {"cd": " because "}),
    ("gen", COT, {"cd": "\nA: ", "ed": "\n\n", "cot_delim": " #### "}),
    ("gen", QA, {"cd": "\nA:", "pre": "Quiz. "}),
]


def _tokenizers(make_tokenizer):
    """The test BPE, and the same with a post-processor that adds special tokens (a BOS-like token before and
    EOS after): llm-foundry keeps the first in the preamble and drops the trailing EOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    plain = load_tokenizer(make_tokenizer())
    raw = plain.backend_tokenizer.__class__.from_str(plain.backend_tokenizer.to_str())
    raw.post_processor = processors.TemplateProcessing(single="<|padding|> $A <|endoftext|>",
                                                       special_tokens=[("<|padding|>", plain.pad_token_id),
                                                                       ("<|endoftext|>", plain.eos_token_id)])
    special = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|padding|>")
    return plain, special


@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_sequences_equal_llm_foundrys_construction(case, make_tokenizer):
    """For each task type (the piqa-like strip case, the CoT file without aliases, schema with and without
    shots), 0 / 1 / 3 shots, two tokenizers, and a window small enough to cut contexts from the left, the
    token sequences mptkit scores equal the ones rebuilt here from llm-foundry's rules."""
    kind, recs, kw = CASES[case]
    for tok in _tokenizers(make_tokenizer):
        assert needs_prefix_space(tok)  # a byte-level BPE: llm-foundry adds the space before answers
        task = ICLTask(name="t", task_type=TYPES[kind], examples=recs)
        for k in (0, 1, 3):
            for seq_len in (2048, 40):
                ref = lf_sequences(recs, kind, tok, k=k, seq_len=seq_len, **kw)
                got = build_requests(task, tok, num_fewshot=k, seed=kw.get("seed", 1234),
                                     prompt_string=kw.get("ps", ""), example_delimiter=kw.get("ed", "\n"),
                                     continuation_delimiter=kw.get("cd", " "), question_prelimiter=kw.get("pre", ""),
                                     cot_delimiter=kw.get("cot_delim", ""), max_seq_len=seq_len)
                assert [(r.context, r.answer) for r in got] == ref, (kind, k, seq_len)
                if seq_len == 40 and k == 3:
                    assert any(r.truncated for r in got)  # the left-truncation rule is exercised


def test_fewshot_draws_follow_llm_foundrys_sampler():
    """Shots for every record equal llm-foundry's sequential draws (the order included), for several sizes and
    seeds, and the draws never pick the record itself."""
    from mptkit.eval.icl import fewshot_draws

    for n, k, seed in [(10, 3, 1234), (5, 4, 1), (30, 5, 7), (2, 1, 0), (100, 10, 1234)]:
        got = fewshot_draws(n, k, seed)
        assert got == lf_shots(n, k, seed)
        assert all(i not in s and len(s) == k for i, s in enumerate(got))


# ------------------------------------------------------------------ the gauntlet by hand
def _row(label, k, acc, n, category=None, metric="InContextLearningMultipleChoiceAccuracy"):
    return TaskResult(label=label, num_fewshot=k, category=category, task_type="multiple_choice",
                      metrics={metric: acc}, examples=n)


def test_gauntlet_aggregation_by_hand():
    """3 tasks in 2 categories: task a (2 categories of 100 and 300 records, accuracies 0.6 and 0.8), b (0.7,
    50 records) in 'knowledge'; c (0.9, 1000 records) in 'reasoning'. Scores computed here from the rules."""
    results = [_row("a", 0, 0.6, 100, "x"), _row("a", 0, 0.8, 300, "y"), _row("b", 5, 0.7, 50),
               _row("c", 3, 0.9, 1000, metric="InContextLearningLMAccuracy"),
               _row("c", 0, 0.1, 1000)]  # another shot count: not in the gauntlet, ignored
    spec = {"categories": [
        {"name": "knowledge", "benchmarks": [{"name": "a", "num_fewshot": 0, "random_baseline": 0.25},
                                             {"name": "b", "num_fewshot": 5, "random_baseline": 0.5}]},
        {"name": "reasoning", "benchmarks": [{"name": "c", "num_fewshot": 3, "random_baseline": 0.0}]}]}
    acc_a = (0.6 + 0.8) / 2  # llm-foundry: the plain mean over the categories' accuracies
    sa, sb, sc = (acc_a - 0.25) / 0.75, (0.7 - 0.5) / 0.5, 0.9
    g = aggregate(parse_gauntlet(spec), results)
    assert g.categories["knowledge"] == pytest.approx((sa + sb) / 2)
    assert g.categories["reasoning"] == pytest.approx(sc)
    assert g.averages == {"default_average": pytest.approx(((sa + sb) / 2 + sc) / 2)}
    assert g.scores()["icl/metrics/eval_gauntlet/knowledge"] == pytest.approx((sa + sb) / 2)
    # SAMPLE_SZ: weights are record counts (a: 100 + 300 = 400, b: 50)
    g = aggregate(parse_gauntlet({**spec, "weighting": "SAMPLE_SZ"}), results)
    assert g.categories["knowledge"] == pytest.approx((sa * 400 + sb * 50) / 450)
    g = aggregate(parse_gauntlet({**spec, "weighting": "LOG_SAMPLE_SZ"}), results)
    wa, wb = math.log2(400), math.log2(50)
    assert g.categories["knowledge"] == pytest.approx((sa * wa + sb * wb) / (wa + wb))
    # no baseline subtraction (and so no rescaling): the raw accuracies
    g = aggregate(parse_gauntlet({**spec, "subtract_random_baseline": False, "rescale_accuracy": False}), results)
    assert g.categories["knowledge"] == pytest.approx((acc_a + 0.7) / 2)
    # subtraction without rescaling
    g = aggregate(parse_gauntlet({**spec, "rescale_accuracy": False}), results)
    assert g.categories["knowledge"] == pytest.approx(((acc_a - 0.25) + (0.7 - 0.5)) / 2)
    # named averages; a category with a benchmark missing is left out (and so out of the averages)
    g = aggregate(parse_gauntlet({**spec, "averages": {"core": ["knowledge", "reasoning"], "k": ["knowledge"]}}),
                  [r for r in results if r.label != "b"])
    assert g.categories == {"reasoning": pytest.approx(sc)} and g.missing == {"knowledge": ["b/5-shot"]}
    assert g.averages == {"core": pytest.approx(sc), "k": 0.0}


# ------------------------------------------------------------------ the user's path
def test_cli_config_and_gauntlet_on_the_example_tasks(tmp_path, make_tokenizer, capsys):
    """`mptkit eval icl MODEL --config <bundled icl_tasks.yaml>` runs every task of the example file (all four
    types, a CoT file without aliases, a task with categories) on a tiny saved model: the JSON holds one result
    per (task, shots, category) with the same numbers as icl_accuracy given the same settings; `mptkit eval
    gauntlet` adds llm-foundry's composite scores, equal to aggregate() of those results; --markdown writes
    llm-foundry's table layout."""
    folder = model_folder(tmp_path / "model", load_tokenizer(make_tokenizer()), seed=None, spread=SCORES)
    cfg = eval_recipes_dir() / "icl_tasks.yaml"
    out, md = tmp_path / "icl.json", tmp_path / "icl.md"
    assert main(["eval", "gauntlet", str(folder), "--config", str(cfg), "--device", "cpu", "--json", str(out),
                 "--markdown", str(md), "--max-seq-len", "64", "--max-examples", "2"]) == 0
    text = capsys.readouterr().out
    assert "Number few shot" in text and "core_average" in text
    got = json.loads(out.read_text())
    tasks = load_eval_config(cfg).tasks
    labels = [(r["label"], r["num_fewshot"], r["category"]) for r in got["results"]]
    want = []
    for t in tasks:
        cats = [None] if not t.has_categories else ["animals", "colours"]
        want += [(t.label, k, c) for k in t.num_fewshot for c in cats]
    assert labels == want
    assert {r["task_type"] for r in got["results"]} == {"language_modeling", "multiple_choice", "schema",
                                                        "generation_task_with_answers"}
    from mptkit.model import MPTForCausalLM

    model, tok = MPTForCausalLM.from_pretrained(folder), load_tokenizer(folder)
    every = {t.label: t for t in tasks}
    for r in got["results"]:
        t = every[r["label"]]
        if t.has_categories or r["label"] not in ("everyday", "simple_qa", "pronouns"):
            continue  # the piqa-like MC, a generation task, the schema task
        fmt = {**t.format(r["num_fewshot"]), "max_seq_len": t.max_seq_len}
        api = icl_accuracy(model, tok, t.dataset_uri, max_examples=2, **fmt)
        assert r["examples"] == 2
        if r["label"] == "everyday":  # a subset by index (one rank's share): the same per-record results
            part = icl_accuracy(model, tok, t.dataset_uri, indices=[5, 1], **fmt).details
            whole = icl_accuracy(model, tok, t.dataset_uri, **fmt).details
            assert [d["index"] for d in part] == [5, 1]
            for d, w in zip(part, [whole[5], whole[1]]):
                assert d["choice_norm"] == w["choice_norm"] and d["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
        metric = next(iter(r["metrics"]))
        assert r["metrics"][metric] == (api.accuracy_norm if t.icl_task_type in ("multiple_choice", "schema")
                                        else api.accuracy), r["label"]
    rows = [TaskResult(label=r["label"], num_fewshot=r["num_fewshot"], category=r["category"],
                       task_type=r["task_type"], metrics=r["metrics"], examples=r["examples"]) for r in got["results"]]
    g = aggregate(load_eval_config(cfg).gauntlet, rows)
    assert got["gauntlet"]["scores"] == pytest.approx(g.scores())
    assert set(g.averages) == {"core_average"} and set(g.categories) == {"language", "reasoning"}
    table = md.read_text()
    assert table.startswith("| Category | Benchmark | Subtask | Accuracy | Number few shot | Model |")
    assert "| reasoning | trivia | Average |" in table and "|  | animals |" in table
    # bad input: settings that belong in the YAML, and a config without a gauntlet for `eval gauntlet`
    assert main(["eval", "icl", str(folder), "--config", str(cfg), "--num-fewshot", "1"]) == 2
    assert "--num-fewshot: with --config" in capsys.readouterr().err
    no_g = tmp_path / "tasks.yaml"
    no_g.write_text(f"- {{label: s, dataset_uri: {eval_recipes_dir() / 'data/sequences_lm.jsonl'}, "
                    "num_fewshot: [0], icl_task_type: language_modeling}\n")
    assert main(["eval", "gauntlet", str(folder), "--config", str(no_g)]) == 2
    assert "no eval_gauntlet" in capsys.readouterr().err
    # `eval icl --config` on a plain list of tasks: the results table in Markdown on the terminal, and JSON
    assert main(["eval", "icl", str(folder), "--config", str(no_g), "--device", "cpu", "--markdown",
                 "--json", str(out)]) == 0
    assert "| Category | Benchmark | Subtask | Accuracy | Number few shot | Model |" in capsys.readouterr().out
    [r] = json.loads(out.read_text())["results"]
    lm = icl_accuracy(model, tok, str(eval_recipes_dir() / "data/sequences_lm.jsonl"))
    assert r["metrics"] == {"InContextLearningLMAccuracy": lm.accuracy} and "gauntlet" not in json.loads(
        out.read_text())
