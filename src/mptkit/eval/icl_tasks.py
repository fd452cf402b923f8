"""llm-foundry's ``icl_tasks`` configuration: parsing, validation, and running the tasks it lists.

The YAML is llm-foundry's (its ``build_icl_evaluators`` / ``get_icl_task_dataloader`` keys)::

    icl_tasks:                         # or the list itself at the top of the file
    - label: piqa
      dataset_uri: piqa.jsonl          # a local path, relative to this YAML file (then the current folder)
      num_fewshot: [0, 5]
      icl_task_type: multiple_choice
      continuation_delimiter: "\\nAnswer: "

``icl_tasks: other.yaml`` in a mapping reads the list from that file (llm-foundry's indirection), and a
file's ``eval_gauntlet:`` (a mapping or a path) is read by :func:`load_eval_config`. Every key of a task is
checked: an unknown one is an :class:`~mptkit.errors.EvalError` naming the task, the key and the closest
valid key; keys llm-foundry reads but mptkit cannot honour (remote ``dataset_uri``, ``hf_loading_vars``,
``generation_kwargs``, ``code_evaluation``...) are refused with the reason, never ignored. ``batch_size`` and
``pass_at_k`` / ``generations_per_sample`` (code tasks only) are read and have no effect (a note is logged).

Public API (stable; the trainer's ICL evaluation builds on it):

* :class:`ICLTaskConfig`: one task, defaults resolved (llm-foundry's), ``dataset_uri`` an absolute path;
  :meth:`ICLTaskConfig.format` gives the prompt keyword arguments of :func:`mptkit.eval.icl.icl_accuracy`.
* :func:`parse_icl_tasks` (a list of mappings, or a path string), :func:`load_icl_tasks` (a YAML file),
  :func:`load_eval_config` (a YAML file with ``icl_tasks`` and optionally ``eval_gauntlet``).
* :func:`evaluate_icl_tasks`: run every (task, num_fewshot[, category]) and return :class:`TaskResult` rows,
  each with llm-foundry's metric values under llm-foundry's metric names and its logger label
  (``label/k-shot[/category]``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import EvalError
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)

# llm-foundry's metric names per task type (its defaults first). The generation metric had older names.
LM_ACCURACY = "InContextLearningLMAccuracy"
MC_ACCURACY = "InContextLearningMultipleChoiceAccuracy"
GEN_ACCURACY = "InContextLearningGenerationExactMatchAccuracy"
METRICS = {
    "language_modeling": (LM_ACCURACY,),
    "multiple_choice": (MC_ACCURACY,),
    "schema": (MC_ACCURACY,),
    "generation_task_with_answers": (GEN_ACCURACY, "InContextLearningGenerationAccuracy",
                                     "InContextLearningQAAccuracy"),
}
UNSUPPORTED_METRICS = {
    "InContextLearningLMExpectedCalibrationError": "calibration error is not computed by mptkit",
    "InContextLearningMCExpectedCalibrationError": "calibration error is not computed by mptkit",
    "InContextLearningCodeEvalAccuracy": "code_evaluation tasks (running generated code) are not supported",
    "InContextLearningLLMAsAJudge": "LLM-as-a-judge is not supported",
}

TASK_KEYS = {  # key -> default (llm-foundry's)
    "label": None, "dataset_uri": None, "icl_task_type": None, "num_fewshot": None,
    "prompt_string": "", "example_delimiter": "\n", "continuation_delimiter": " ",
    "question_prelimiter": "", "prelimiter": "", "cot_delimiter": "", "do_normalization": True,
    "has_categories": False, "early_stopping_criteria": None, "max_seq_len": None,
    "fewshot_random_seed": 1234, "metric_names": None, "strip_dataset": True,
    "batch_size": None, "pass_at_k": 1, "generations_per_sample": 1,
}
REQUIRED = ("label", "dataset_uri", "icl_task_type", "num_fewshot")
NOTED = {  # read, no effect
    "batch_size": "mptkit batches by --batch-size",
    "pass_at_k": "code_evaluation only",
    "generations_per_sample": "code_evaluation only",
}
REFUSED = {  # llm-foundry keys mptkit cannot honour, and why
    "hf_loading_vars": "datasets are read from local JSONL files only (give dataset_uri a local path)",
    "hf_parsing_map": "datasets are read from local JSONL files only (rename the fields in the file)",
    "generation_kwargs": "generation is greedy with llm-foundry's defaults; generation_kwargs are not supported",
    "num_beams": "llm-foundry refuses it too (it moved to generation_kwargs, which mptkit does not support)",
}
REMOTE_PREFIXES = ("hf://", "s3://", "gs://", "oci://", "azure://", "dbfs:/", "http://", "https://", "sftp://")

# top-level keys of an llm-foundry eval YAML other than icl_tasks / eval_gauntlet: read or noted, not refused
EVAL_FILE_KEYS = {"icl_tasks", "eval_gauntlet", "icl_seq_len", "max_seq_len"}
EVAL_FILE_NOTED = {"models", "model_name_or_path", "precision", "device_eval_batch_size", "fsdp_config", "seed",
                   "dist_timeout", "loggers", "callbacks", "run_name", "icl_subset_num_batches",
                   "eval_subset_num_batches", "python_log_level", "eval_loader", "eval_loaders", "load_path",
                   "tokenizer", "model", "log_config", "metadata"}


@dataclass(frozen=True)
class ICLTaskConfig:
    """One llm-foundry ICL task, validated, with llm-foundry's defaults filled in.

    ``dataset_uri``: the absolute path of the JSONL file. ``num_fewshot``: the shot counts, each one
    evaluation. ``max_seq_len``: the task's ``max_seq_len`` (llm-foundry's per-task key), else the file's
    ``icl_seq_len`` / ``max_seq_len``, else None (the model's). ``metric_names``: llm-foundry's, defaults
    by type. ``where``: the task in the config (``FILE: icl_tasks[2] (piqa)``), for messages."""

    label: str
    dataset_uri: str
    icl_task_type: str
    num_fewshot: tuple[int, ...]
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    question_prelimiter: str = ""
    cot_delimiter: str = ""
    do_normalization: bool = True
    has_categories: bool = False
    early_stopping_criteria: tuple[str, ...] = ()
    max_seq_len: int | None = None
    fewshot_random_seed: int = 1234
    metric_names: tuple[str, ...] = ()
    strip_dataset: bool = True
    batch_size: int | None = None
    where: str = ""

    def format(self, num_fewshot: int) -> dict:
        """Keyword arguments of :func:`mptkit.eval.icl.icl_accuracy` for one shot count."""
        return {"num_fewshot": int(num_fewshot), "seed": self.fewshot_random_seed,
                "prompt_string": self.prompt_string, "example_delimiter": self.example_delimiter,
                "continuation_delimiter": self.continuation_delimiter,
                "question_prelimiter": self.question_prelimiter, "cot_delimiter": self.cot_delimiter,
                "do_normalization": self.do_normalization, "strip_whitespace": self.strip_dataset,
                "stop": list(self.early_stopping_criteria) or None, "max_seq_len": self.max_seq_len}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "where"}
        for k in ("num_fewshot", "early_stopping_criteria", "metric_names"):
            d[k] = list(d[k])
        return d


# ----------------------------------------------------------------------------------------- parsing
def _fail(error, where: str, msg: str):
    raise error(f"{where}: {msg}")


def _str(v, name: str, where: str, error, *, empty_ok: bool = True) -> str:
    if not isinstance(v, str) or (not empty_ok and not v.strip()):
        _fail(error, where, f"'{name}' must be a {'non-empty ' if not empty_ok else ''}string, got {v!r}")
    return v


def _bool(v, name: str, where: str, error) -> bool:
    if not isinstance(v, bool):
        _fail(error, where, f"'{name}' must be true or false, got {v!r}")
    return v


def _int(v, name: str, where: str, error, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        _fail(error, where, f"'{name}' must be an integer >= {lo}, got {v!r}")
    return v


def _resolve_path(uri: str, base_dir: Path | None, where: str, error) -> str:
    if uri.startswith(REMOTE_PREFIXES) or "://" in uri:
        _fail(error, where, f"dataset_uri {uri!r}: mptkit reads local files only; download it and give its path")
    p = Path(uri).expanduser()
    if not p.is_absolute():
        candidates = ([base_dir / p] if base_dir is not None else []) + [Path.cwd() / p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = " or ".join(str(c) for c in candidates)
            _fail(error, where, f"dataset_uri {uri!r}: no such file (looked for {looked}; a relative path is "
                                "read beside the YAML file, then in the current folder)")
        p = found
    elif not p.is_file():
        _fail(error, where, f"dataset_uri {uri!r}: no such file" + (" (a folder)" if p.is_dir() else ""))
    return str(p.resolve())


def _parse_task(d: Any, i: int, *, base_dir: Path | None, where: str, default_max_seq_len: int | None,
                error) -> ICLTaskConfig:
    from mptkit.eval.icl import normalize_task_type

    here = f"{where}[{i}]"
    if not isinstance(d, dict):
        _fail(error, here, f"expected a mapping with {', '.join(REQUIRED)}, got {type(d).__name__}")
    if isinstance(d.get("label"), str):
        here += f" ({d['label']})"
    for k in d:
        if k in REFUSED:
            _fail(error, here, f"'{k}' is not supported: {REFUSED[k]}")
        if k not in TASK_KEYS:
            near = closest(str(k), TASK_KEYS)
            hint = f"; did you mean '{near}'?" if near else f"; valid keys: {', '.join(sorted(TASK_KEYS))}"
            _fail(error, here, f"unknown key '{k}'{hint}")
    for k in REQUIRED:
        if k not in d or d[k] is None:
            _fail(error, here, f"missing key '{k}' (a task needs {', '.join(REQUIRED)})")
    label = _str(d["label"], "label", here, error, empty_ok=False)
    if "/" in label:
        _fail(error, here, f"'label' {label!r} must not contain '/' (results are keyed label/k-shot)")
    raw_type = str(d["icl_task_type"])
    if raw_type.strip().lower() == "code_evaluation":
        _fail(error, here, "icl_task_type 'code_evaluation' is not supported (running generated code); "
                           "supported: language_modeling, multiple_choice, schema, generation_task_with_answers")
    try:
        task_type = normalize_task_type(raw_type)
    except EvalError as e:
        _fail(error, here, str(e))
    shots = d["num_fewshot"]
    shots = [shots] if isinstance(shots, int) and not isinstance(shots, bool) else shots
    if not isinstance(shots, (list, tuple)) or not shots:
        _fail(error, here, f"'num_fewshot' must be a list of integers >= 0, e.g. [0, 5], got {d['num_fewshot']!r}")
    shots = tuple(_int(k, "num_fewshot", here, error, 0) for k in shots)
    if len(set(shots)) != len(shots):
        _fail(error, here, f"'num_fewshot' {list(shots)} lists a shot count twice")
    if "question_prelimiter" in d and "prelimiter" in d:
        _fail(error, here, "both 'question_prelimiter' and 'prelimiter' are given (they are the same setting; "
                           "give one)")
    vals = {k: d.get(k, TASK_KEYS[k]) for k in TASK_KEYS}
    for k in ("prompt_string", "example_delimiter", "continuation_delimiter", "question_prelimiter", "prelimiter",
              "cot_delimiter"):
        _str(vals[k], k, here, error)
    for k in ("do_normalization", "has_categories", "strip_dataset"):
        _bool(vals[k], k, here, error)
    stops = vals["early_stopping_criteria"]
    if stops is None:
        stops = []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        _fail(error, here, f"'early_stopping_criteria' must be a list of non-empty strings, got {stops!r}")
    msl = vals["max_seq_len"]
    msl = default_max_seq_len if msl is None else _int(msl, "max_seq_len", here, error, 2)
    seed = _int(vals["fewshot_random_seed"], "fewshot_random_seed", here, error, 0)
    if vals["batch_size"] is not None:
        _int(vals["batch_size"], "batch_size", here, error, 1)
    for k in ("pass_at_k", "generations_per_sample"):
        _int(vals[k], k, here, error, 1)
    metrics = vals["metric_names"]
    if metrics is None:
        metrics = [METRICS[task_type][0]]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, (list, tuple)) or not metrics:
        _fail(error, here, f"'metric_names' must be a list of llm-foundry metric names, got {metrics!r}")
    for m in metrics:
        if m in UNSUPPORTED_METRICS:
            _fail(error, here, f"metric {m!r} is not supported: {UNSUPPORTED_METRICS[m]}")
        if m not in METRICS[task_type]:
            every = sorted({x for ms in METRICS.values() for x in ms})
            if m in every:
                _fail(error, here, f"metric {m!r} does not apply to a {task_type} task (use {METRICS[task_type][0]})")
            near = closest(str(m), every)
            _fail(error, here, f"unknown metric {m!r}" + (f"; did you mean {near!r}?" if near else
                                                           f"; supported: {', '.join(every)}"))
    if len(set(metrics)) != len(metrics):
        _fail(error, here, f"'metric_names' {list(metrics)} lists a metric twice")
    for k, why in NOTED.items():
        if k in d:
            log.info("%s: '%s' is read and has no effect (%s)", here, k, why)
    uri = _resolve_path(_str(d["dataset_uri"], "dataset_uri", here, error, empty_ok=False), base_dir, here, error)
    return ICLTaskConfig(
        label=label, dataset_uri=uri, icl_task_type=task_type, num_fewshot=shots,
        prompt_string=vals["prompt_string"], example_delimiter=vals["example_delimiter"],
        continuation_delimiter=vals["continuation_delimiter"],
        question_prelimiter=vals["question_prelimiter"] or vals["prelimiter"], cot_delimiter=vals["cot_delimiter"],
        do_normalization=vals["do_normalization"], has_categories=vals["has_categories"],
        early_stopping_criteria=tuple(stops), max_seq_len=msl, fewshot_random_seed=seed,
        metric_names=tuple(metrics), strip_dataset=vals["strip_dataset"], batch_size=vals["batch_size"], where=here)


def _read_yaml(path, error, what: str):
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise error(f"{what} {path}: no such file" + (" (a folder)" if p.is_dir() else ""))
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")), p
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{p}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def parse_icl_tasks(value: Any, *, base_dir: str | os.PathLike | None = None, where: str = "icl_tasks",
                    default_max_seq_len: int | None = None, error: type[Exception] = EvalError,
                    _seen: tuple = ()) -> list[ICLTaskConfig]:
    """The tasks of an ``icl_tasks`` value: a list of task mappings, or a path (a string, relative to
    ``base_dir``) to a YAML file holding the list or a mapping with an ``icl_tasks`` key. Relative
    ``dataset_uri`` paths are read beside the file that names them (``base_dir`` for a list), then in the
    current folder. ``default_max_seq_len``: the ``max_seq_len`` of tasks without one (llm-foundry's
    ``icl_seq_len``). Errors are ``error`` (default :class:`EvalError`) naming ``where``, the task and key."""
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(value, (str, os.PathLike)):
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        if p.resolve() in _seen:
            raise error(f"{where}: {value} names itself (an icl_tasks loop)")
        data, p = _read_yaml(p, error, where)
        if isinstance(data, dict):
            if "icl_tasks" not in data:
                raise error(f"{p}: no 'icl_tasks' key (expected a list of tasks, or a mapping with icl_tasks)")
            if default_max_seq_len is None:
                default_max_seq_len = _file_seq_len(data, p, error)
            data = data["icl_tasks"]
        return parse_icl_tasks(data, base_dir=p.parent, where=f"{p}: icl_tasks", error=error,
                               default_max_seq_len=default_max_seq_len, _seen=(*_seen, p.resolve()))
    if not isinstance(value, (list, tuple)) or not value:
        raise error(f"{where}: expected a non-empty list of tasks (each with {', '.join(REQUIRED)}) or a path to "
                    f"a YAML file, got {type(value).__name__ if value is not None else 'nothing'}")
    tasks = [_parse_task(d, i, base_dir=base, where=where, default_max_seq_len=default_max_seq_len, error=error)
             for i, d in enumerate(value)]
    seen: dict[str, str] = {}
    for t in tasks:
        if t.label in seen:
            raise error(f"{t.where}: label {t.label!r} is used twice (also {seen[t.label]}); labels key the results")
        seen[t.label] = t.where
    return tasks


def _file_seq_len(data: dict, p: Path, error) -> int | None:
    v = data.get("icl_seq_len", data.get("max_seq_len"))
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise error(f"{p}: 'icl_seq_len' must be an integer >= 2, got {v!r}")
    return v


def load_icl_tasks(path: str | os.PathLike, *, default_max_seq_len: int | None = None,
                   error: type[Exception] = EvalError) -> list[ICLTaskConfig]:
    """The tasks of a YAML file (a list, or a mapping with ``icl_tasks``); see :func:`parse_icl_tasks`."""
    return load_eval_config(path, default_max_seq_len=default_max_seq_len, error=error).tasks


@dataclass
class EvalConfig:
    """A tasks YAML: its tasks, its gauntlet (None without ``eval_gauntlet``), the file."""

    tasks: list[ICLTaskConfig]
    gauntlet: Any = None  # mptkit.eval.gauntlet.GauntletConfig
    path: str = ""


def load_eval_config(path: str | os.PathLike, *, default_max_seq_len: int | None = None,
                     error: type[Exception] = EvalError) -> EvalConfig:
    """Read a tasks YAML: a list of tasks, or a mapping (llm-foundry's eval YAML) with ``icl_tasks`` (a list
    or a path), optionally ``eval_gauntlet`` (a mapping or a path) and ``icl_seq_len`` / ``max_seq_len``
    (the default ``max_seq_len`` of the tasks). Other keys of llm-foundry's eval YAML (``models``,
    ``precision``, ``device_eval_batch_size``...) are noted and have no effect; unknown keys are refused."""
    from mptkit.eval.gauntlet import parse_gauntlet

    data, p = _read_yaml(path, error, "--config")
    gauntlet = None
    if isinstance(data, dict):
        for k in data:
            if k in EVAL_FILE_NOTED:
                log.info("%s: '%s' is read and has no effect here (mptkit's command line sets it)", p, k)
            elif k not in EVAL_FILE_KEYS:
                near = closest(str(k), EVAL_FILE_KEYS | EVAL_FILE_NOTED)
                raise error(f"{p}: unknown key '{k}'" + (f"; did you mean '{near}'?" if near else
                                                        f"; expected {', '.join(sorted(EVAL_FILE_KEYS))}"))
        if "icl_tasks" not in data:
            raise error(f"{p}: no 'icl_tasks' key (expected a list of tasks, or a mapping with icl_tasks)")
        if default_max_seq_len is None:
            default_max_seq_len = _file_seq_len(data, p, error)
        tasks = parse_icl_tasks(data["icl_tasks"], base_dir=p.parent, where=f"{p}: icl_tasks", error=error,
                                default_max_seq_len=default_max_seq_len, _seen=(p.resolve(),))
        if data.get("eval_gauntlet") is not None:
            gauntlet = parse_gauntlet(data["eval_gauntlet"], base_dir=p.parent, where=f"{p}: eval_gauntlet",
                                      error=error)
    else:
        tasks = parse_icl_tasks(data, base_dir=p.parent, where=f"{p}", error=error,
                                default_max_seq_len=default_max_seq_len, _seen=(p.resolve(),))
    return EvalConfig(tasks=tasks, gauntlet=gauntlet, path=str(p))


# ----------------------------------------------------------------------------------------- running
@dataclass
class TaskResult:
    """One evaluation of a task: ``label`` at ``num_fewshot`` shots (one ``category`` of it with
    ``has_categories``). ``metrics``: llm-foundry's metric name -> value (its definitions: LM greedy
    match; MC / schema lowest per-token perplexity, mptkit's ``accuracy_norm``; generation normalized
    prefix match). ``examples``: records scored; ``result``: mptkit's full :class:`~mptkit.eval.icl.ICLResult`."""

    label: str
    num_fewshot: int
    category: str | None
    task_type: str
    metrics: dict[str, float]
    examples: int
    truncated: int = 0
    result: Any = field(default=None, repr=False)

    @property
    def eval_label(self) -> str:
        """llm-foundry's evaluator label: ``label/k-shot`` or ``label/k-shot/category``."""
        base = f"{self.label}/{self.num_fewshot}-shot"
        return f"{base}/{self.category}" if self.category is not None else base

    def logger_keys(self) -> dict[str, float]:
        """llm-foundry's logged names: ``metrics/{eval_label}/{metric}`` -> value."""
        return {f"metrics/{self.eval_label}/{m}": v for m, v in self.metrics.items()}

    def to_dict(self, *, details: bool = False) -> dict:
        d = {"label": self.label, "num_fewshot": self.num_fewshot, "category": self.category,
             "task_type": self.task_type, "metrics": dict(self.metrics), "examples": self.examples,
             "truncated": self.truncated}
        if self.result is not None:
            d["accuracy"] = self.result.accuracy
            d["accuracy_norm"] = self.result.accuracy_norm
            if details:
                d["details"] = self.result.details
        return d


def metric_values(task: ICLTaskConfig, result) -> dict[str, float]:
    """llm-foundry's metric values from an :class:`~mptkit.eval.icl.ICLResult`."""
    out = {}
    for m in task.metric_names:
        if m == MC_ACCURACY:
            out[m] = float(result.accuracy_norm)  # lowest per-token perplexity = highest mean log-likelihood
        else:
            out[m] = float(result.accuracy)
    return out


def task_partitions(task: ICLTaskConfig):
    """``[(category or None, ICLTask)]``: the task file's records, split by their ``category`` value (sorted,
    each its own task with its own few-shot draws, as llm-foundry's ``has_categories``) or whole."""
    from mptkit.eval.icl import ICLTask, read_icl_jsonl

    whole = read_icl_jsonl(task.dataset_uri, task.icl_task_type)
    if not task.has_categories:
        return [(None, whole)]
    cats: dict[str, list[int]] = {}
    for i, rec in enumerate(whole.examples):
        if "category" not in rec:
            raise EvalError(f"{task.where}: has_categories is set but {whole.path}:{whole.lines[i]} has no "
                            f"'category' key")
        c = rec["category"]
        if not isinstance(c, (str, int)) or isinstance(c, bool):
            raise EvalError(f"{whole.path}:{whole.lines[i]}: 'category' must be a string, got {c!r}")
        cats.setdefault(str(c), []).append(i)
    return [(c, ICLTask(name=f"{whole.name}/{c}", task_type=whole.task_type,
                        examples=[whole.examples[i] for i in cats[c]], path=whole.path,
                        lines=[whole.lines[i] for i in cats[c]])) for c in sorted(cats)]


def evaluate_icl_tasks(model, tokenizer, tasks: list[ICLTaskConfig], *, batch_size: int = 16,
                       max_examples: int | None = None, max_seq_len: int | None = None,
                       progress=None) -> list[TaskResult]:
    """Run every task at each of its shot counts (and each category with ``has_categories``), in the config's
    order. ``max_seq_len``: the window of tasks whose config sets none (default the model's).
    ``max_examples``: score only the first N records of each task (or category); shots still come from all.
    ``progress``: called with each :class:`TaskResult` as it is done. Under ``torch.distributed`` (torchrun,
    the trainer's ranks) every rank must call it: the records are split over the ranks and gathered
    (:mod:`mptkit.eval.distributed`), every rank gets every result."""
    from mptkit.eval.distributed import icl_accuracy_sharded as icl_accuracy

    parts = [(t, task_partitions(t)) for t in tasks]  # read and validate every file before scoring
    out = []
    for t, partitions in parts:
        for k in t.num_fewshot:
            for cat, data in partitions:
                fmt = t.format(k)
                if fmt["max_seq_len"] is None:
                    fmt["max_seq_len"] = max_seq_len
                try:
                    res = icl_accuracy(model, tokenizer, data, batch_size=batch_size, max_examples=max_examples,
                                       **fmt)
                except EvalError as e:
                    raise EvalError(f"{t.where}, {k}-shot{f', category {cat}' if cat is not None else ''}: {e}") \
                        from None
                row = TaskResult(label=t.label, num_fewshot=k, category=cat, task_type=t.icl_task_type,
                                 metrics=metric_values(t, res), examples=res.examples, truncated=res.truncated,
                                 result=res)
                out.append(row)
                if progress is not None:
                    progress(row)
    return out
