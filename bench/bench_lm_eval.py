"""Agreement with EleutherAI's lm-evaluation-harness, per example.

The same two local tasks (made here from lines of the standard library's source: a 4-way multiple-choice task
and a LAMBADA-style last-word task, zero-shot) are scored three ways and compared request by request:

* ``mptkit``: ``mptkit eval icl MODEL --tasks mc.jsonl,lm.jsonl --details --json ...`` (the CLI, in-process);
* ``hf``: lm-eval's ``hf`` model (transformers' ``MptForCausalLM`` loading the same folder) on lm-eval task
  YAMLs over the same records (``dataset_path: json``, local ``data_files``);
* ``server``: lm-eval's ``local-completions`` model against ``mptkit serve`` (the server in a thread), its
  tokenizer taken from the server's ``/tokenize`` endpoints (``tokenizer_backend=remote``, what lm-eval's
  default ``auto`` picks) and, with ``--hf-tokenizer``, also from the folder (``tokenizer_backend=huggingface``).

Compared: each request's log-likelihood (max |difference| against mptkit), each multiple-choice record's pick
by summed log-likelihood (lm-eval's ``acc``, mptkit's ``accuracy``), and each LAMBADA record's greedy flag
(lm-eval's ``acc``, mptkit's ``accuracy``). The two harnesses normalize differently: lm-eval's ``acc_norm``
divides by the choice's *characters*, mptkit's ``acc_norm`` by its *tokens*; both are recomputed from each
side's per-choice log-likelihoods so like is compared with like.

Run:  flock /tmp/mptkit-bench.lock python bench/bench_lm_eval.py [--model FOLDER] [--examples 200] [--json OUT]
(without ``--model``: a tiny random-init MPT with the test tokenizer; needs ``pip install lm_eval``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("mptkit_mc", "mptkit_lm")
FILES = {"mptkit_mc": "mc.jsonl", "mptkit_lm": "lm.jsonl"}
SOURCES = ("textwrap", "argparse", "inspect", "json.decoder")


def source_lines(n: int) -> list[str]:
    """``n`` distinct lines of stdlib source with at least 3 words, stripped (deterministic)."""
    import importlib

    out: list[str] = []
    for mod in SOURCES:
        for ln in inspect.getsource(importlib.import_module(mod)).splitlines():
            s = " ".join(ln.split())
            if 12 <= len(s) <= 70 and len(s.split(" ")) >= 3 and s not in out:
                out.append(s)
                if len(out) == n:
                    return out
    raise SystemExit(f"only {len(out)} usable source lines for {n} examples")


def greedy_continuation(model, tok, prompt: str, max_k: int = 3) -> str | None:
    """The model's greedy continuation of ``prompt`` as text that tokenizes back to the same 1..``max_k``
    tokens (the first such length), alone and after the prompt (lm-eval tokenizes prompt + continuation as one
    text and cuts it, mptkit and llm-foundry tokenize the two apart: the same tokens only where no token spans
    the join), else None."""
    import torch

    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.inference_mode():
        for _ in range(max_k):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            k = len(ids) - len(tok.encode(prompt, add_special_tokens=False))
            text = tok.decode(ids[-k:])
            if (
                text.strip()
                and tok.encode(text, add_special_tokens=False) == ids[-k:]
                and tok.encode(prompt + text, add_special_tokens=False) == ids
            ):
                return text
    return None


def write_tasks(folder, n: int, model=None, tok=None) -> Path:
    """``folder/mc.jsonl`` and ``folder/lm.jsonl`` (llm-foundry's formats, which mptkit reads) and the lm-eval
    task YAMLs reading the same files. MC record i: a line cut after its first half's last word, the choices
    its own rest and the (different) rests of the next lines, gold 0. LM record i: a line minus its last word; the
    continuation is that word, read with llm-foundry's defaults (fields stripped, " " between context and
    continuation); lm-eval's ``loglikelihood`` output type adds no delimiter, so its target is ``' ' +
    continuation``, as its lambada_openai task writes it. Every other record (given ``model``) is cut where
    the model's greedy next token is a space and a word, when the line has such a cut, and that word is the
    continuation, so that the greedy flag is sometimes true."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = source_lines(n + 40)
    rest_of = [" ".join(w[len(w) // 2 :]) for w in (ln.split(" ") for ln in lines)]
    mc, lm = [], []
    for i in range(n):
        w = lines[i].split(" ")
        choices = [rest_of[i]]
        for r in rest_of[i + 1 :]:  # the rests of the next lines, all different (no exact ties to break)
            if len(choices) == 4:
                break
            if r not in choices:
                choices.append(r)
        mc.append({"query": " ".join(w[: len(w) // 2]), "choices": choices, "gold": 0})
        ctx, cont = lines[i].rsplit(" ", 1)
        if model is not None and i % 2:  # a cut of the line after which the model's greedy token is " word"
            w = lines[i].split(" ")
            for j in range(len(w) - 1, 0, -1):
                g = greedy_continuation(model, tok, " ".join(w[:j]), 1)
                if g is not None and g[:1] == " " and g[1:] and g[1:] == g[1:].strip():
                    ctx, cont = " ".join(w[:j]), g[1:]
                    break
        lm.append({"context": ctx, "continuation": cont})
    for name, recs in (("mc.jsonl", mc), ("lm.jsonl", lm)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "mptkit_mc.yaml").write_text(
        "task: mptkit_mc\n"
        + common.format(path=json.dumps(str(folder / "mc.jsonl")))
        + 'output_type: multiple_choice\ndoc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: gold\ntarget_delimiter: " "\nmetric_list:\n'
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n",
        encoding="utf-8",
    )
    (folder / "mptkit_lm.yaml").write_text(
        "task: mptkit_lm\n"
        + common.format(path=json.dumps(str(folder / "lm.jsonl")))
        + 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{\' \' + continuation}}"\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n",
        encoding="utf-8",
    )
    return folder


def _per_doc(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    """lm-eval's logged samples -> per record (by doc_id), per request: (log-likelihood, is_greedy)."""
    out: dict[int, list[tuple[float, bool]]] = {}
    for s in samples:
        out[s["doc_id"]] = [(float(r[0][0]), bool(r[0][1])) for r in s["resps"]]
    return [out[i] for i in range(len(out))]


def run_lm_eval(lm, task_dir) -> dict:
    """lm-eval's own evaluation of ``lm`` (an lm-eval model object) on the task folder: per task, the
    per-record requests' (log-likelihood, is_greedy) and lm-eval's metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=list(TASKS), task_manager=tm, log_samples=True, num_fewshot=0, bootstrap_iters=0
    )
    return {
        t: {
            "requests": _per_doc(res["samples"][t]),
            "metrics": {
                k.split(",")[0]: v
                for k, v in res["results"][t].items()
                if k.split(",")[0] in ("acc", "acc_norm")
            },
        }
        for t in TASKS
    }


def lm_eval_hf(model_dir, task_dir, *, batch_size: int = 8, logits_cache: bool = False) -> dict:
    """lm-eval's ``hf`` model on the folder. ``logits_cache`` off: with lm-eval's default (on), requests whose
    context + continuation are the same tokens split at different points (here an MC choice and a LAMBADA
    record cut from the same line) share one forward and the shorter continuation's log-probabilities are
    gathered from the first positions of the longer one's (lm-eval 0.4.13, models/huggingface.py: only the
    greedy check slices the trailing positions), so its log-likelihood is wrong."""
    from lm_eval.models.huggingface import HFLM

    return run_lm_eval(
        HFLM(
            pretrained=str(model_dir),
            device="cpu",
            batch_size=batch_size,
            dtype="float32",
            logits_cache=logits_cache,
        ),
        task_dir,
    )


def lm_eval_server(
    base_url: str,
    task_dir,
    *,
    tokenizer_backend: str = "remote",
    tokenizer=None,
    max_length: int,
    batch_size: int = 8,
    model: str = "model",
) -> dict:
    """lm-eval's ``local-completions`` against a running ``mptkit serve`` at ``base_url`` (``max_length``: the
    server's context minus 1, the one token lm-eval's requests ask to generate)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=base_url.rstrip("/") + "/v1/completions",
        model=model,
        tokenizer_backend=tokenizer_backend,
        tokenizer=tokenizer,
        max_length=max_length,
        batch_size=batch_size,
        tokenized_requests=True,
        max_retries=1,
    )
    return run_lm_eval(lm, task_dir)


def mptkit_icl(model_dir, task_dir, out_json, *, batch_size: int = 8) -> dict:
    """``mptkit eval icl`` (the CLI) on the same files: per task, per record, per request (log-likelihood,
    greedy flag or None), the token counts, and mptkit's metrics."""
    from mptkit.cli import main

    task_dir = Path(task_dir)
    out = {}
    for t in TASKS:  # llm-foundry's defaults: fields stripped, " " between context and answer
        rc = main(
            [
                "--quiet",
                "eval",
                "icl",
                str(model_dir),
                "--tasks",
                str(task_dir / FILES[t]),
                "--details",
                "--json",
                str(out_json),
                "--batch-size",
                str(batch_size),
                "--device",
                "cpu",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"mptkit eval icl failed with exit status {rc}")
        r = json.loads(Path(out_json).read_text())["results"][0]
        if r["task_type"] == "multiple_choice":
            reqs = [[(lp, None) for lp in d["logprobs"]] for d in r["details"]]
            toks = [d["tokens"] for d in r["details"]]
        else:
            reqs = [[(d["logprob"], d["correct"])] for d in r["details"]]
            toks = [[d["tokens"]] for d in r["details"]]
        out[t] = {
            "requests": reqs,
            "tokens": toks,
            "metrics": {"acc": r["accuracy"], "acc_norm": r["accuracy_norm"]},
        }
    return out


def _argmax(xs) -> int:  # the first of equal maxima, as numpy's argmax and mptkit
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


def compare(ref: dict, got: dict, task_dir) -> dict:
    """Per task: max |log-likelihood difference| over all requests, how many records' picks (MC: by sum; by
    sum / characters, lm-eval's acc_norm; by sum / tokens, mptkit's acc_norm) or greedy flags (LM) differ,
    and the metrics each side computes from its own numbers."""
    recs = {
        t: [json.loads(ln) for ln in (Path(task_dir) / FILES[t]).read_text().splitlines() if ln]
        for t in TASKS
    }
    out = {}
    for t in TASKS:
        a, b = ref[t]["requests"], got[t]["requests"]
        assert len(a) == len(b), (t, len(a), len(b))
        diffs = [abs(x[0] - y[0]) for ra, rb in zip(a, b) for x, y in zip(ra, rb, strict=True)]
        row = {
            "records": len(a),
            "requests": len(diffs),
            "max_abs_diff": max(diffs),
            "requests_over_1e-4": sum(d > 1e-4 for d in diffs),
        }
        if t == "mptkit_mc":
            chars = [[len(c) for c in r["choices"]] for r in recs[t]]
            toks = ref[t]["tokens"]
            for crit, norm in (("sum", None), ("per_char", chars), ("per_token", toks)):

                def pick(reqs, i, norm=norm):
                    ll = [x[0] for x in reqs[i]]
                    return _argmax(ll if norm is None else [v / k for v, k in zip(ll, norm[i])])

                pa, pb = [pick(a, i) for i in range(len(a))], [pick(b, i) for i in range(len(b))]
                row[f"picks_differ_{crit}"] = sum(x != y for x, y in zip(pa, pb))
                row[f"acc_{crit}"] = (
                    sum(p == r["gold"] for p, r in zip(pa, recs[t])) / len(a),
                    sum(p == r["gold"] for p, r in zip(pb, recs[t])) / len(b),
                )
        else:
            row["greedy_differ"] = sum(ra[0][1] != rb[0][1] for ra, rb in zip(a, b))
            row["acc"] = (sum(r[0][1] for r in a) / len(a), sum(r[0][1] for r in b) / len(b))
        row["metrics"] = (ref[t]["metrics"], got[t]["metrics"])
        out[t] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=None, help="model folder (default: a tiny random-init MPT, built here)"
    )
    ap.add_argument("--examples", type=int, default=200, help="records per task (default 200)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--hf-tokenizer",
        action="store_true",
        help="also run local-completions with the folder's tokenizer (tokenizer_backend=huggingface)",
    )
    ap.add_argument(
        "--logits-cache",
        action="store_true",
        help="also run lm-eval's hf model with its default logits_cache=True (see lm_eval_hf)",
    )
    ap.add_argument("--json", default=None, help="write the comparison here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from mptkit.infer.server import BackgroundServer, build_server
    from mptkit.io import load_tokenizer
    from mptkit.model import MPTForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="mptkit-lm-eval-"))
    if args.model:
        folder = Path(args.model)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers import SCORES, bpe_tokenizer, model_folder

        bpe_tokenizer().save_pretrained(str(tmp / "tok"))
        folder = model_folder(
            tmp / "model",
            load_tokenizer(tmp / "tok"),
            seed=0,
            spread=SCORES,
            expansion_ratio=4,
            max_seq_len=128,
        )  # transformers' MPT has a 4x MLP
    model = MPTForCausalLM.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    task_dir = write_tasks(tmp / "tasks", args.examples, model, tok)
    timings, runs = {}, {}
    t0 = time.perf_counter()
    runs["mptkit"] = mptkit_icl(folder, task_dir, tmp / "mptkit.json", batch_size=args.batch_size)
    timings["mptkit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs["hf"] = lm_eval_hf(folder, task_dir, batch_size=args.batch_size)
    timings["hf"] = time.perf_counter() - t0
    if args.logits_cache:
        runs["hf-logits_cache"] = lm_eval_hf(folder, task_dir, batch_size=args.batch_size, logits_cache=True)
    srv = build_server(str(folder), model_name="model")
    with BackgroundServer(srv) as bg:
        backends = ["remote"] + (["huggingface"] if args.hf_tokenizer else [])
        for be in backends:
            t0 = time.perf_counter()
            runs[f"server-{be}"] = lm_eval_server(
                bg.base_url,
                task_dir,
                tokenizer_backend=be,
                tokenizer=str(folder) if be == "huggingface" else None,
                max_length=srv.max_context - 1,
                batch_size=args.batch_size,
            )
            timings[f"server-{be}"] = time.perf_counter() - t0
    report = {
        "model": str(folder),
        "examples": args.examples,
        "seconds": timings,
        "comparison": {k: compare(runs["mptkit"], runs[k], task_dir) for k in runs if k != "mptkit"},
    }
    print(f"model {folder}; {args.examples} records per task, zero-shot; reference: mptkit eval icl")
    print(
        f"{'lm-eval model':<22} {'task':<10} {'requests':>8} {'max |dLL|':>10} {'picks/greedy differ':>20}"
        f"   metrics (lm-eval side, mptkit side)"
    )
    for k, cmp in report["comparison"].items():
        for t, row in cmp.items():
            if t == "mptkit_mc":
                differ = (
                    f"{row['picks_differ_sum']}/{row['picks_differ_per_char']}/"
                    f"{row['picks_differ_per_token']}"
                )
                m = (
                    f"acc {row['acc_sum'][1]:.4f}/{row['acc_sum'][0]:.4f}  acc_norm(chars) "
                    f"{row['acc_per_char'][1]:.4f}/{row['acc_per_char'][0]:.4f}  acc_norm(tokens) "
                    f"{row['acc_per_token'][1]:.4f}/{row['acc_per_token'][0]:.4f}"
                )
            else:
                differ = str(row["greedy_differ"])
                m = f"acc {row['acc'][1]:.4f}/{row['acc'][0]:.4f}"
            bad = f" ({row['requests_over_1e-4']} over 1e-4)" if row["requests_over_1e-4"] else ""
            print(
                f"{k:<22} {t:<10} {row['requests']:>8} {row['max_abs_diff']:>10.2e} {differ:>20}   {m}{bad}"
            )
    print(
        "MC picks differ: by sum / by sum per character (lm-eval's acc_norm) / by sum per token (mptkit's "
        "acc_norm)"
    )
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
