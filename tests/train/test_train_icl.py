"""ICL evaluation during training: a recipe's ``icl_tasks`` (+ ``eval_gauntlet``) run at ``eval_interval`` and
logged to metrics.jsonl under llm-foundry's names; the value logged at step N equals ``mptkit eval icl
--config`` run on that step's checkpoint. Bad ``icl_tasks`` are refused before any training."""

from __future__ import annotations

import json

import pytest
import yaml

from mptkit.cli import main
from mptkit.errors import ConfigError
from mptkit.io import load_tokenizer
from mptkit.train.trainer import Trainer
from tests.helpers import TINY_MODEL, datasets, make_cfg

LINES = ["def load(fp, *, cls=None):", "return loads(fp.read())", "import re", "self.pos = pos",
         "class JSONDecodeError(ValueError):", "if not isinstance(s, str):", "raise TypeError", "return obj, end"]


def _tasks(tmp):
    mc = [{"query": ln.split(" ")[0], "choices": [" ".join(ln.split(" ")[1:]) or "x", "pass", "None"], "gold": 0}
          for ln in LINES]
    lm = [{"context": ln.rsplit(" ", 1)[0], "continuation": ln.rsplit(" ", 1)[1]} for ln in LINES if " " in ln]
    for name, recs in (("mc", mc), ("lm", lm)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tasks = [{"label": "mc", "dataset_uri": str(tmp / "mc.jsonl"), "icl_task_type": "multiple_choice",
              "num_fewshot": [0, 1]},
             {"label": "lm", "dataset_uri": str(tmp / "lm.jsonl"), "icl_task_type": "language_modeling",
              "num_fewshot": [0]}]
    gauntlet = {"weighting": "EQUAL", "subtract_random_baseline": True, "rescale_accuracy": True,
                "categories": [{"name": "all", "benchmarks": [{"name": "mc", "num_fewshot": 1, "random_baseline": 0.33},
                                                              {"name": "lm", "num_fewshot": 0, "random_baseline": 0}]}]}
    return tasks, gauntlet


def test_icl_at_eval_interval_equals_mptkit_eval_icl_on_the_checkpoint(tmp_path, make_tokenizer):
    tasks, gauntlet = _tasks(tmp_path)
    tok_dir = make_tokenizer()
    cfg = make_cfg(tmp_path, model={**TINY_MODEL, "vocab_size": 448}, max_duration="4ba", eval_interval="2ba",
                   save_interval="2ba", icl_tasks=tasks, eval_gauntlet=gauntlet, tokenizer=str(tok_dir))
    train, _ = datasets()
    Trainer(cfg, tokenizer=load_tokenizer(tok_dir), train_dataset=train).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    icl = {r["step"]: r for r in recs if any(k.startswith("metrics/") for k in r)}
    assert sorted(icl) == [2, 4]
    keys = {"metrics/mc/0-shot/InContextLearningMultipleChoiceAccuracy",
            "metrics/mc/1-shot/InContextLearningMultipleChoiceAccuracy",
            "metrics/lm/0-shot/InContextLearningLMAccuracy", "icl/metrics/eval_gauntlet/all"}
    assert keys <= set(icl[2])
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks, "eval_gauntlet": gauntlet}))
    for step in (2, 4):
        out = tmp_path / f"ck{step}.json"
        assert main(["eval", "icl", str(tmp_path / "ck" / f"ep0-ba{step}"), "--config", str(tmp_path / "tasks.yaml"),
                     "--device", "cpu", "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        cli = {f"metrics/{r['label']}/{r['num_fewshot']}-shot/{m}": v for r in got["results"]
               for m, v in r["metrics"].items()}
        cli.update(got["gauntlet"]["scores"])
        for k in keys:
            assert icl[step][k] == pytest.approx(cli[k], abs=1e-12), (step, k)


def test_bad_icl_tasks_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="icl_tasks"):
        make_cfg(tmp_path, icl_tasks=[{"label": "x", "dataset_uri": str(tmp_path / "missing.jsonl"),
                                       "icl_task_type": "multiple_choice", "num_fewshot": [0]}])
    with pytest.raises(ConfigError, match="eval_gauntlet"):
        make_cfg(tmp_path, eval_gauntlet={"categories": []})
