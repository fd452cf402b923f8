"""llm-foundry's Eval Gauntlet: its ``eval_gauntlet`` YAML and its aggregation of ICL results into category
and average scores (llm-foundry's ``EvalGauntlet`` callback), plus the results tables of its eval script.

The YAML::

    eval_gauntlet:
      weighting: EQUAL                 # EQUAL | SAMPLE_SZ | LOG_SAMPLE_SZ
      subtract_random_baseline: true
      rescale_accuracy: true           # only with subtract_random_baseline
      averages:                        # optional; default: default_average over every category
        core_average: [world_knowledge, commonsense_reasoning]
      categories:
      - name: world_knowledge
        benchmarks:
        - {name: jeopardy, num_fewshot: 3, random_baseline: 0}

The aggregation, as llm-foundry computes it:

1. a benchmark's score is the mean over the accuracy metrics (names containing ``Accuracy``) of every
   evaluation labelled ``name/k-shot`` or ``name/k-shot/category`` (so with ``has_categories`` the
   unweighted mean of the per-category accuracies);
2. with ``subtract_random_baseline``: ``score - random_baseline``, then with ``rescale_accuracy``
   ``/ (1 - random_baseline)``;
3. a category's score is the weighted mean of its benchmarks' scores; the weight is 1 (``EQUAL``), the
   number of records of all evaluations whose label starts with ``name/k-shot`` (``SAMPLE_SZ``, at least 1)
   or ``max(log2(that number), 1)`` (``LOG_SAMPLE_SZ``). A category with a benchmark missing from the
   results is left out (a warning names it);
4. each named average is the plain mean of the scores of its categories that are present (0 when none).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import EvalError
from mptkit.utils.keys import closest

log = logging.getLogger(__name__)

WEIGHTINGS = ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ")
GAUNTLET_KEYS = {"categories", "weighting", "subtract_random_baseline", "rescale_accuracy", "averages"}
CATEGORY_KEYS = {"name", "benchmarks"}
BENCHMARK_KEYS = {"name", "num_fewshot", "random_baseline"}
PREFIX = "icl/metrics/eval_gauntlet/"  # llm-foundry's logged names of the composite scores


@dataclass(frozen=True)
class Benchmark:
    name: str
    num_fewshot: int
    random_baseline: float

    @property
    def key(self) -> str:
        return f"{self.name}/{self.num_fewshot}-shot"


@dataclass(frozen=True)
class Category:
    name: str
    benchmarks: tuple[Benchmark, ...]


@dataclass(frozen=True)
class GauntletConfig:
    categories: tuple[Category, ...]
    weighting: str = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    averages: dict = field(default_factory=dict)  # name -> [category names]; {} = default_average of all

    def named_averages(self) -> dict[str, list[str]]:
        return dict(self.averages) if self.averages else {"default_average": [c.name for c in self.categories]}


def _keys(d: Any, allowed: set, where: str, error) -> None:
    if not isinstance(d, dict):
        raise error(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            near = closest(str(k), allowed)
            raise error(f"{where}: unknown key '{k}'" + (f"; did you mean '{near}'?" if near else
                                                        f"; valid keys: {', '.join(sorted(allowed))}"))


def parse_gauntlet(value: Any, *, base_dir: str | os.PathLike | None = None, where: str = "eval_gauntlet",
                   error: type[Exception] = EvalError) -> GauntletConfig:
    """An ``eval_gauntlet`` value: the mapping, or a path (relative to ``base_dir``) to a YAML file holding
    it (under an ``eval_gauntlet`` key, as llm-foundry's files do, or at the top). Unknown keys are refused
    with the closest valid key; so are llm-foundry's own errors (rescaling without subtracting the baseline,
    an average named like a category) and averages naming no category of the gauntlet."""
    if isinstance(value, (str, os.PathLike)):
        from mptkit.eval.icl_tasks import _read_yaml

        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        data, p = _read_yaml(p, error, where)
        if isinstance(data, dict) and "eval_gauntlet" in data:
            _keys(data, {"eval_gauntlet"}, str(p), error)
            data = data["eval_gauntlet"]
        return parse_gauntlet(data, where=f"{p}: eval_gauntlet", error=error)
    _keys(value, GAUNTLET_KEYS, where, error)
    if "categories" not in value:
        raise error(f"{where}: missing key 'categories' (a list of {{name, benchmarks}})")
    weighting = value.get("weighting", "EQUAL")
    if weighting not in WEIGHTINGS:
        near = closest(str(weighting), WEIGHTINGS)
        raise error(f"{where}: weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}"
                    + (f" (did you mean {near!r}?)" if near else ""))
    flags = {}
    for k in ("subtract_random_baseline", "rescale_accuracy"):
        flags[k] = value.get(k, True)
        if not isinstance(flags[k], bool):
            raise error(f"{where}: '{k}' must be true or false, got {flags[k]!r}")
    if flags["rescale_accuracy"] and not flags["subtract_random_baseline"]:
        raise error(f"{where}: rescale_accuracy needs subtract_random_baseline (llm-foundry refuses it too); set "
                    "rescale_accuracy: false")
    cats = value["categories"]
    if not isinstance(cats, list) or not cats:
        raise error(f"{where}: 'categories' must be a non-empty list of {{name, benchmarks}}")
    categories, names = [], set()
    for i, c in enumerate(cats):
        cw = f"{where}: categories[{i}]"
        _keys(c, CATEGORY_KEYS, cw, error)
        name = c.get("name")
        if not isinstance(name, str) or not name:
            raise error(f"{cw}: 'name' must be a non-empty string")
        cw += f" ({name})"
        if name in names:
            raise error(f"{cw}: category name {name!r} is used twice")
        names.add(name)
        bms = c.get("benchmarks")
        if not isinstance(bms, list) or not bms:
            raise error(f"{cw}: 'benchmarks' must be a non-empty list of {{name, num_fewshot, random_baseline}}")
        out = []
        for j, b in enumerate(bms):
            bw = f"{cw}: benchmarks[{j}]"
            _keys(b, BENCHMARK_KEYS, bw, error)
            for k in BENCHMARK_KEYS:
                if k not in b:
                    raise error(f"{bw}: missing key '{k}' (a benchmark needs name, num_fewshot, random_baseline)")
            if not isinstance(b["name"], str) or not b["name"]:
                raise error(f"{bw}: 'name' must be a non-empty string")
            k = b["num_fewshot"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise error(f"{bw} ({b['name']}): 'num_fewshot' must be an integer >= 0, got {k!r}")
            rb = b["random_baseline"]
            if isinstance(rb, bool) or not isinstance(rb, (int, float)) or not 0 <= rb < 1:
                raise error(f"{bw} ({b['name']}): 'random_baseline' must be a number in [0, 1), got {rb!r}")
            out.append(Benchmark(b["name"], k, float(rb)))
        categories.append(Category(name, tuple(out)))
    averages = value.get("averages") or {}
    if not isinstance(averages, dict):
        raise error(f"{where}: 'averages' must be a mapping of average name -> list of category names")
    for a, members in averages.items():
        if a in names:
            raise error(f"{where}: average {a!r} has the name of a category (llm-foundry refuses it too)")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise error(f"{where}: averages.{a} must be a list of category names")
        for m in members:
            if m not in names:
                near = closest(m, names)
                raise error(f"{where}: averages.{a} names {m!r}, not a category of this gauntlet"
                            + (f" (did you mean {near!r}?)" if near else f" (categories: {', '.join(sorted(names))})"))
    return GauntletConfig(categories=tuple(categories), weighting=weighting, averages=dict(averages), **flags)


def load_gauntlet(path: str | os.PathLike, *, error: type[Exception] = EvalError) -> GauntletConfig:
    """A gauntlet YAML file (``eval_gauntlet:`` at its top, or the mapping itself)."""
    return parse_gauntlet(str(path), error=error)


# ----------------------------------------------------------------------------------------- aggregation
@dataclass
class GauntletResult:
    """``benchmarks``: per benchmark ``{category, name, num_fewshot, accuracy, random_baseline, score,
    weight}`` (score after baseline subtraction / rescaling; missing ones have accuracy None);
    ``categories``: category -> score (complete categories only); ``averages``: name -> score;
    ``missing``: category -> the benchmarks (``name/k-shot``) without results."""

    benchmarks: list[dict]
    categories: dict[str, float]
    averages: dict[str, float]
    missing: dict[str, list[str]] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        """llm-foundry's logged names: ``icl/metrics/eval_gauntlet/{category or average}`` -> value."""
        return {PREFIX + k: v for k, v in {**self.categories, **self.averages}.items()}

    def to_dict(self) -> dict:
        return {"benchmarks": self.benchmarks, "categories": self.categories, "averages": self.averages,
                "missing": self.missing}


def benchmark_accuracies(results) -> dict[str, float]:
    """``name/k-shot`` -> the mean of every accuracy metric of every evaluation under that label (the
    categories of a ``has_categories`` task included): llm-foundry's ``extract_metrics_from_state``.
    ``results``: :class:`~mptkit.eval.icl_tasks.TaskResult` rows."""
    vals: dict[str, list[float]] = {}
    for r in results:
        for m, v in r.metrics.items():
            if "Accuracy" in m:
                vals.setdefault(f"{r.label}/{r.num_fewshot}-shot", []).append(float(v))
    return {k: sum(v) / len(v) for k, v in vals.items()}


def aggregate(gauntlet: GauntletConfig, results) -> GauntletResult:
    """llm-foundry's gauntlet scores from :class:`~mptkit.eval.icl_tasks.TaskResult` rows (see the module
    docstring for the rules)."""
    acc = benchmark_accuracies(results)
    sizes = {r.eval_label: r.examples for r in results}
    rows, cats, missing = [], {}, {}
    for c in gauntlet.categories:
        scored = []
        for b in c.benchmarks:
            if gauntlet.weighting == "EQUAL":
                weight = 1.0
            else:
                n = max(sum(v for k, v in sizes.items() if k.startswith(b.key)), 1)
                weight = float(n) if gauntlet.weighting == "SAMPLE_SZ" else max(math.log2(n), 1.0)
            a = acc.get(b.key)
            row = {"category": c.name, "name": b.name, "num_fewshot": b.num_fewshot, "accuracy": a,
                   "random_baseline": b.random_baseline, "score": None, "weight": weight}
            if a is None:
                missing.setdefault(c.name, []).append(b.key)
            else:
                s = a
                if gauntlet.subtract_random_baseline:
                    s -= b.random_baseline
                    if gauntlet.rescale_accuracy:
                        s /= 1.0 - b.random_baseline
                row["score"] = s
                scored.append((s, weight))
            rows.append(row)
        if c.name in missing:
            log.warning("gauntlet: category %s left out, benchmarks without results: %s", c.name,
                        ", ".join(missing[c.name]))
            continue
        total = sum(w for _, w in scored)
        cats[c.name] = sum(s * (w / total) for s, w in scored)
    averages = {}
    for name, members in gauntlet.named_averages().items():
        present = [cats[m] for m in members if m in cats]
        averages[name] = sum(present) / len(present) if present else 0.0
    return GauntletResult(benchmarks=rows, categories=cats, averages=averages, missing=missing)


# ----------------------------------------------------------------------------------------- tables
def results_rows(results, gauntlet: GauntletConfig | None = None, model: str = "") -> list[dict]:
    """llm-foundry's eval-script results table (``calculate_markdown_results``): per (shots, benchmark,
    metric) a row ``Category, Benchmark, Subtask, Accuracy, Number few shot, Model``; a task with categories
    gets an ``Average`` row, then one row per category (Benchmark empty). Category is the gauntlet category
    of the benchmark ('' without a gauntlet or when the gauntlet does not list it)."""
    taxonomy = {b.name: c.name for c in (gauntlet.categories if gauntlet else ()) for b in c.benchmarks}
    groups: dict[tuple, list] = {}
    for r in results:
        for m, v in r.metrics.items():
            if "Accuracy" in m:
                groups.setdefault((r.num_fewshot, r.label, m), []).append((r.category, v))
    order = sorted({k for k, _, _ in groups}, key=lambda k: [r.num_fewshot for r in results].index(k))
    rows = []
    for k in order:
        for (shots, label, metric), subs in groups.items():
            if shots != k:
                continue
            base = {"Category": taxonomy.get(label, ""), "Number few shot": f"{k}-shot", "Model": model,
                    "Metric": metric}
            if len(subs) == 1 and subs[0][0] is None:
                rows.append({**base, "Benchmark": label, "Subtask": "", "Accuracy": subs[0][1]})
            else:
                rows.append({**base, "Benchmark": label, "Subtask": "Average",
                             "Accuracy": sum(v for _, v in subs) / len(subs)})
                rows += [{**base, "Benchmark": "", "Subtask": c, "Accuracy": v} for c, v in subs]
    return rows


RESULT_COLUMNS = ("Category", "Benchmark", "Subtask", "Accuracy", "Number few shot", "Model")


def markdown_table(rows: list[dict], columns) -> str:
    """A GitHub-flavoured Markdown table (numbers with 4 decimals)."""
    def cell(v):
        if v is None:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(":---" if c != "Accuracy" else "---:"
                                                                 for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], columns) -> str:
    """The same table aligned for a terminal."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    numeric = [any(isinstance(r.get(c), float) for r in rows) for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    return "\n".join([line(list(columns))] + [line(row) for row in cells])


def gauntlet_rows(res: GauntletResult, model: str = "") -> tuple[list[dict], list[str]]:
    """llm-foundry's gauntlet table: one row (the model) with a column per category, then per average."""
    row = {"model_name": model, **res.categories, **res.averages}
    return [row], ["model_name", *res.categories, *res.averages]
