"""llm-foundry's ``icl_tasks`` and ``eval_gauntlet`` YAML: parsing, defaults, and refusals naming the key."""

from __future__ import annotations

import json
import textwrap

import pytest

from mptkit.errors import EvalError
from mptkit.eval.gauntlet import load_gauntlet, parse_gauntlet
from mptkit.eval.icl_tasks import load_eval_config, load_icl_tasks, parse_icl_tasks


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _jsonl(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


MC = [{"query": "q", "choices": ["a", "b"], "gold": 0}] * 3


def test_tasks_yaml_defaults_relative_paths_and_indirection(tmp_path, monkeypatch):
    """A top-level icl_tasks list: llm-foundry's defaults filled in (ED "\\n", CD " ", seed 1234, metrics by
    type), paths relative to the YAML file, icl_seq_len as the default max_seq_len; `icl_tasks: FILE`
    reads the list from that file (paths relative to it); llm-foundry's other eval-YAML keys are noted."""
    _jsonl(tmp_path / "cfg/data/mc.jsonl", MC)
    _jsonl(tmp_path / "cfg/data/lm.jsonl", [{"context": "a", "continuation": "b"}] * 2)
    cfg = _write(tmp_path / "cfg/tasks.yaml", """\
        icl_seq_len: 96
        models: [{model_name: x}]
        device_eval_batch_size: 4
        icl_tasks:
        - label: piqa
          dataset_uri: data/mc.jsonl
          num_fewshot: [0, 5]
          icl_task_type: multiple_choice
          continuation_delimiter: "\\nAnswer: "
          batch_size: 8
        - label: lambada
          dataset_uri: data/lm.jsonl
          num_fewshot: [0]
          icl_task_type: language_modeling
          max_seq_len: 48
          question_prelimiter: "Q: "
          has_categories: false
        """)
    monkeypatch.chdir(tmp_path)
    ec = load_eval_config(cfg)
    piqa, lam = ec.tasks
    assert ec.gauntlet is None
    assert piqa.dataset_uri == str((tmp_path / "cfg/data/mc.jsonl").resolve())
    assert piqa.num_fewshot == (0, 5) and piqa.continuation_delimiter == "\nAnswer: "
    assert piqa.example_delimiter == "\n" and piqa.prompt_string == "" and piqa.fewshot_random_seed == 1234
    assert piqa.metric_names == ("InContextLearningMultipleChoiceAccuracy",) and piqa.max_seq_len == 96
    assert piqa.strip_dataset and piqa.do_normalization and piqa.batch_size == 8
    assert lam.max_seq_len == 48 and lam.question_prelimiter == "Q: "
    assert lam.metric_names == ("InContextLearningLMAccuracy",) and lam.continuation_delimiter == " "
    assert lam.format(0)["question_prelimiter"] == "Q: " and piqa.format(5)["num_fewshot"] == 5
    outer = _write(tmp_path / "outer.yaml", "icl_tasks: cfg/tasks.yaml\n")
    assert [t.label for t in load_icl_tasks(outer)] == ["piqa", "lambada"]
    assert [t.label for t in parse_icl_tasks("cfg/tasks.yaml", base_dir=tmp_path)] == ["piqa", "lambada"]
    as_list = _write(tmp_path / "cfg/list.yaml", """\
        - {label: t, dataset_uri: data/mc.jsonl, num_fewshot: [1], icl_task_type: mc}
        """)
    [t] = load_icl_tasks(as_list)
    assert t.icl_task_type == "multiple_choice" and t.max_seq_len is None


@pytest.mark.parametrize("task, msg", [
    ({"continuation_delimeter": " "}, (r"icl_tasks\[0\] \(t\): unknown key 'continuation_delimeter'; did you "
                                       r"mean 'continuation_delimiter'\?")),
    ({"dataset_uri": "hf://x/y"}, "mptkit reads local files only"),
    ({"dataset_uri": "missing.jsonl"}, r"dataset_uri 'missing.jsonl': no such file \(looked for .*missing.jsonl"),
    ({"hf_loading_vars": {"split": "test"}}, "'hf_loading_vars' is not supported: datasets are read from local"),
    ({"generation_kwargs": {"temperature": 1}}, "'generation_kwargs' is not supported"),
    ({"icl_task_type": "code_evaluation"}, "'code_evaluation' is not supported"),
    ({"icl_task_type": "ranking"}, "unknown task type 'ranking'"),
    ({"num_fewshot": [0, -1]}, "'num_fewshot' must be an integer >= 0"),
    ({"num_fewshot": "5"}, "'num_fewshot' must be a list of integers"),
    ({"metric_names": ["InContextLearningLMAccuracy"]}, "does not apply to a multiple_choice task"),
    ({"metric_names": ["InContextLearningMultipleChoiceAcuracy"]},
     "unknown metric .*did you mean 'InContextLearningMultipleChoiceAccuracy'"),
    ({"metric_names": ["InContextLearningMCExpectedCalibrationError"]}, "calibration error is not computed"),
    ({"do_normalization": "no"}, "'do_normalization' must be true or false"),
    ({"question_prelimiter": "Q:", "prelimiter": "Q:"}, "both 'question_prelimiter' and 'prelimiter'"),
    ({"label": "a/b"}, "must not contain '/'"),
    ({"early_stopping_criteria": "\n"}, "'early_stopping_criteria' must be a list"),
    ({"num_beams": 2}, "'num_beams' is not supported"),
])
def test_tasks_yaml_bad_keys_are_refused_naming_the_task_and_key(tmp_path, task, msg):
    _jsonl(tmp_path / "mc.jsonl", MC)
    base = {"label": "t", "dataset_uri": "mc.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice"}
    with pytest.raises(EvalError, match=msg):
        parse_icl_tasks([{**base, **task}], base_dir=tmp_path)


def test_tasks_file_level_errors(tmp_path):
    """Missing required keys, duplicate labels, an unknown top-level key (closest suggested), bad YAML and an
    icl_tasks loop are EvalErrors naming the file."""
    _jsonl(tmp_path / "mc.jsonl", MC)
    t = {"label": "t", "dataset_uri": "mc.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice"}
    with pytest.raises(EvalError, match=r"missing key 'num_fewshot'"):
        parse_icl_tasks([{k: v for k, v in t.items() if k != "num_fewshot"}], base_dir=tmp_path)
    with pytest.raises(EvalError, match="label 't' is used twice"):
        parse_icl_tasks([t, t], base_dir=tmp_path)
    bad = _write(tmp_path / "bad.yaml", "icl_task:\n- {label: t}\n")
    with pytest.raises(EvalError, match=r"bad.yaml: unknown key 'icl_task'; did you mean 'icl_tasks'\?"):
        load_eval_config(bad)
    broken = _write(tmp_path / "broken.yaml", "icl_tasks: [\n")
    with pytest.raises(EvalError, match=r"broken.yaml:\d+: not valid YAML"):
        load_eval_config(broken)
    loop = _write(tmp_path / "loop.yaml", "icl_tasks: loop.yaml\n")
    with pytest.raises(EvalError, match="names itself"):
        load_eval_config(loop)
    with pytest.raises(EvalError, match="no such file"):
        load_eval_config(tmp_path / "nope.yaml")


GAUNTLET = """\
eval_gauntlet:
  weighting: EQUAL
  subtract_random_baseline: true
  rescale_accuracy: true
  averages:
    core: [knowledge, reasoning]
  categories:
  - name: knowledge
    benchmarks:
    - {name: a, num_fewshot: 0, random_baseline: 0.25}
  - name: reasoning
    benchmarks:
    - {name: b, num_fewshot: 3, random_baseline: 0.5}
"""


def test_gauntlet_yaml_parsing_and_refusals(tmp_path):
    g = load_gauntlet(_write(tmp_path / "g.yaml", GAUNTLET))
    assert [c.name for c in g.categories] == ["knowledge", "reasoning"]
    assert g.categories[1].benchmarks[0].key == "b/3-shot" and g.averages == {"core": ["knowledge", "reasoning"]}
    import yaml

    base = yaml.safe_load(GAUNTLET)["eval_gauntlet"]
    assert parse_gauntlet({**base, "averages": None}).named_averages() == {"default_average": ["knowledge",
                                                                                                "reasoning"]}
    for over, msg in [({"weigting": "EQUAL"}, "unknown key 'weigting'; did you mean 'weighting'"),
                      ({"weighting": "SAMPLE_SIZE"}, "did you mean 'SAMPLE_SZ'"),
                      ({"subtract_random_baseline": False}, "rescale_accuracy needs subtract_random_baseline"),
                      ({"averages": {"core": ["knowledg"]}}, "names 'knowledg'.*did you mean 'knowledge'"),
                      ({"averages": {"knowledge": ["reasoning"]}}, "has the name of a category"),
                      ({"categories": [{"name": "x", "benchmarks": [{"name": "a", "num_fewshot": 0}]}]},
                       "missing key 'random_baseline'"),
                      ({"categories": [{"name": "x", "benchmarks": [{"name": "a", "num_fewshot": 0,
                                                                     "random_baseline": 1}]}]}, r"\[0, 1\)"),
                      ({"categories": [{"name": "x", "benchmark": []}]}, "unknown key 'benchmark'")]:
        with pytest.raises(EvalError, match=msg):
            parse_gauntlet({**base, **over})
    _jsonl(tmp_path / "a.jsonl", MC)
    cfg = _write(tmp_path / "eval.yaml", """\
        icl_tasks:
        - {label: a, dataset_uri: a.jsonl, num_fewshot: [0], icl_task_type: multiple_choice}
        eval_gauntlet: g.yaml
        """)
    assert load_eval_config(cfg).gauntlet == g
