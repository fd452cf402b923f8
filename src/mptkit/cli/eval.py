"""`mptkit eval perplexity`, `mptkit eval long-context`, `mptkit eval icl`, `mptkit eval gauntlet`."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from mptkit.errors import EvalError
from mptkit.utils import cli_args
from mptkit.utils.dtypes import WEIGHT_DTYPES

log = logging.getLogger(__name__)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="HF-layout model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one in the model folder)")
    p.add_argument("--adapter", default=None, metavar="ADAPTER",
                   help="a LoRA adapter (adapter folder or LoRA run) applied unmerged on top of MODEL")
    p.add_argument("--device", default="auto", type=cli_args.device_or_auto,
                   help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, …")
    p.add_argument("--dtype", default="fp32", choices=sorted(WEIGHT_DTYPES), help="weights dtype (default fp32)")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantise the block Linears' weights while loading: int8 (llama.cpp's q8_0 blocks) or q4 "
                        "(its q4_0 blocks)")
    p.add_argument("--threads", type=cli_args.threads, default=None,
                   help="torch CPU threads, 1 or more (default: torch's choice)")
    p.add_argument("--attn-impl", default=None, metavar="IMPL",
                   help="attention backend (auto, torch, sdpa, blockwise, flex, flash; default: the folder's "
                        "config.json). auto keeps long windows O(T) in memory; torch holds T x T scores")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")


def _json_results(p: Path) -> bool:
    """An earlier --json results file (a JSON object) or an empty file: what --json may replace."""
    try:
        with open(p, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"")


def _load(args, *, need_tokenizer: bool = True):
    import torch

    from mptkit.eval.scoring import load_model
    from mptkit.utils.outputs import check_output

    if args.json:  # before the model is loaded and evaluated, not after
        check_output(args.json, kind="file", flag="--json", replaceable=_json_results,
                     earlier="a JSON results file", overwrite=None, error=EvalError)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                      need_tokenizer=need_tokenizer, attn_impl=args.attn_impl, quant=args.quant,
                      adapter=getattr(args, "adapter", None))


def _write_json(path, payload) -> None:
    if not path:
        return
    from mptkit.utils.fs import atomic_write_json

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(path), payload)
    except OSError as e:
        raise EvalError(f"--json {path}: cannot write ({e.strerror or e})") from None
    print(f"results written to {path}")


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _stream(args, model, tok, max_tokens):
    from mptkit.eval.data import is_prepared_folder, load_token_stream

    prepared = is_prepared_folder(args.data)
    return load_token_stream(args.data, tok if (tok is not None or not prepared) else None, split=args.split,
                             max_tokens=max_tokens, text_field=args.text_field, vocab_size=model.config.vocab_size)


# ----------------------------------------------------------------------------- perplexity
def _perplexity(args) -> int:
    from mptkit.eval.data import is_prepared_folder
    from mptkit.eval.perplexity import perplexity

    model, tok = _load(args, need_tokenizer=not is_prepared_folder(args.data))
    stream = _stream(args, model, tok, args.max_tokens)
    res = perplexity(model, stream, max_seq_len=args.max_seq_len, stride=args.stride, batch_size=args.batch_size,
                     allow_short=args.allow_short)
    print(f"data           {res.source}")
    print(f"windows        {res.windows} of {res.max_seq_len} tokens, stride {res.stride} "
          f"(context >= {res.max_seq_len - res.stride if res.stride < res.max_seq_len else 1} tokens after the "
          "first window)")
    seps = f" ({res.separators:,} of them EOS separators between documents)" if res.separators else ""
    print(f"tokens scored  {res.tokens:,}{seps}")
    print(f"loss           {res.loss:.4f} nats/token (all scored tokens)")
    print(f"perplexity     {res.perplexity:.4f}")
    if res.bits_per_byte is not None:
        print(f"bits per byte  {res.bits_per_byte:.4f} (document tokens only: {res.tokens - res.separators:,} "
              f"tokens, {res.n_bytes:,} bytes)")
    _write_json(args.json, {"model": str(args.model), **res.to_dict()})
    return 0


# ----------------------------------------------------------------------------- long context
def _long_context(args) -> int:
    from mptkit.eval.data import is_prepared_folder
    from mptkit.eval.long_context import long_context_curve, parse_lengths

    lengths = parse_lengths(args.lengths)  # fail on bad lengths before loading anything
    model, tok = _load(args, need_tokenizer=not is_prepared_folder(args.data))
    stream = _stream(args, model, tok, args.max_tokens)
    rows = long_context_curve(model, stream, lengths, buckets=args.buckets, max_tokens=args.max_tokens,
                              batch_tokens=args.batch_tokens)
    msl = model.config.max_seq_len
    last = f"last 1/{args.buckets}" if args.buckets > 1 else "last bucket"
    print(f"data: {stream.source}; model max_seq_len {msl} ({'ALiBi' if model.config.alibi else 'learned positions'})")
    print(f"{'length':>8} {'windows':>8} {'loss':>8} {'ppl':>10} {'loss ' + last:>16}")
    for r in rows:
        mark = "  (past max_seq_len)" if r.past_max_seq_len else ""
        ppl = f"{r.perplexity:.3f}" if math.isfinite(r.perplexity) else "inf"
        print(f"{r.length:>8} {r.windows:>8} {r.loss:>8.4f} {ppl:>10} {r.last_bucket_loss:>16.4f}{mark}")
    _write_json(args.json, {"model": str(args.model), "data": stream.source, "max_seq_len": msl,
                            "buckets": args.buckets,
                            "lengths": [r.to_dict(positions=args.positions) for r in rows]})
    return 0


# ----------------------------------------------------------------------------- icl
def _split_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _stop_strings(arg: str | None) -> list[str] | None:
    """``--stop``: comma-separated strings, or a JSON list (for strings with commas: '["a, b", "\\n"]')."""
    if not arg:
        return None
    if arg.lstrip().startswith("["):
        try:
            out = json.loads(arg, strict=False)  # a backslash-n is already a newline here (_unescape)
        except ValueError as e:
            raise EvalError(f"--stop {arg!r}: not a JSON list of strings ({e})") from None
        if not isinstance(out, list) or not all(isinstance(x, str) and x for x in out):
            raise EvalError(f"--stop {arg!r}: expected a JSON list of non-empty strings")
        return out
    return [x for x in arg.split(",") if x]


PROMPT_FLAGS = {"task_type": "--task-type", "num_fewshot": "--num-fewshot", "seed": "--seed",
                "example_delimiter": "--example-delimiter", "continuation_delimiter": "--continuation-delimiter",
                "prompt_string": "--prompt-string", "question_prelimiter": "--question-prelimiter",
                "cot_delimiter": "--cot-delimiter", "stop": "--stop"}


def _distributed(args):
    """Under torchrun (WORLD_SIZE > 1): the process group (gloo on CPU, NCCL on GPU), each rank on its own GPU
    when --device is auto or cuda; None for one process. The records are split over the ranks and gathered
    (mptkit.eval.distributed); rank 0 reports."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    from mptkit.train.distributed import init_distributed

    info = init_distributed("cpu" if args.device == "cpu" else "auto")
    if info.device.type == "cuda" and args.device in ("auto", "cuda"):
        args.device = str(info.device)
    return info


def _icl(args) -> int:
    info = None
    try:
        info = _distributed(args)
        return _icl_run(args, info)
    finally:
        if info is not None:
            from mptkit.train.distributed import shutdown

            shutdown(info)


def _icl_run(args, info) -> int:
    if getattr(args, "config", None):
        return _icl_config(args, info=info)
        return _icl_config(args)
    if getattr(args, "gauntlet", None):
        raise EvalError("--gauntlet needs --config TASKS.yaml (the gauntlet's benchmarks are the tasks' labels)")
    if not args.tasks:
        raise EvalError("give --tasks FILE.jsonl[,...] or --config TASKS.yaml")
    from mptkit.eval.distributed import icl_accuracy_sharded as icl_accuracy
    from mptkit.eval.icl import (
        DEFAULT_CONTINUATION_DELIMITER,
        DEFAULT_EXAMPLE_DELIMITER,
        normalize_task_type,
        read_icl_jsonl,
    )

    ed = DEFAULT_EXAMPLE_DELIMITER if args.example_delimiter is None else args.example_delimiter
    cd = DEFAULT_CONTINUATION_DELIMITER if args.continuation_delimiter is None else args.continuation_delimiter
    seed = 1234 if args.seed is None else args.seed
    files = _split_list(args.tasks)
    if not files:
        raise EvalError("--tasks: give one or more JSONL files, comma-separated")
    types = [normalize_task_type(t) for t in _split_list(args.task_type)]
    if len(types) not in (0, 1, len(files)):
        raise EvalError(f"--task-type: {len(types)} types for {len(files)} task files (give one for all, or one "
                        "per file)")
    try:
        shots = [int(x) for x in _split_list(args.num_fewshot)] or [0]
    except ValueError:
        raise EvalError(f"--num-fewshot {args.num_fewshot!r}: expected integers, e.g. 0 or 0,1,5") from None
    tasks = [read_icl_jsonl(f, types[0] if len(types) == 1 else (types[i] if types else None))
             for i, f in enumerate(files)]  # validate every file before loading the model
    model, tok = _load(args)
    results = []
    for task in tasks:
        for k in shots:
            results.append(icl_accuracy(model, tok, task, num_fewshot=k, seed=seed, example_delimiter=ed,
                                        continuation_delimiter=cd, prompt_string=args.prompt_string or "",
                                        question_prelimiter=args.question_prelimiter or "",
                                        cot_delimiter=args.cot_delimiter or "",
                                        do_normalization=not args.no_normalization,
                                        strip_whitespace=not args.no_strip, batch_size=args.batch_size,
                                        max_examples=args.max_examples, max_seq_len=args.max_seq_len,
                                        stop=_stop_strings(args.stop)))
    if info is not None and not info.is_main:
        return 0  # every rank holds the results; rank 0 reports them
    w = max(4, *(len(r.task) for r in results))
    tw = max(18, *(len(r.task_type) for r in results))
    print(f"{'task':<{w}} {'type':<{tw}} {'shots':>5} {'n':>6} {'accuracy':>9} {'acc_norm':>9}")
    for r in results:
        print(f"{r.task:<{w}} {r.task_type:<{tw}} {r.num_fewshot:>5} {r.examples:>6} {r.accuracy:>9.4f} "
              f"{_fmt(r.accuracy_norm):>9}" + (f"  ({r.truncated} prompts truncated)" if r.truncated else ""))
    _write_json(args.json, {"model": str(args.model), "seed": seed, "example_delimiter": ed,
                            "continuation_delimiter": cd,
                            "results": [r.to_dict(details=args.details) for r in results]})
    return 0


def _icl_config(args, *, need_gauntlet: bool = False, info=None) -> int:
    """`eval icl --config TASKS.yaml [--gauntlet G.yaml]` and `eval gauntlet`: llm-foundry's icl_tasks YAML."""
    from mptkit.eval.gauntlet import (
        RESULT_COLUMNS,
        aggregate,
        gauntlet_rows,
        load_gauntlet,
        markdown_table,
        results_rows,
        text_table,
    )
    from mptkit.eval.icl_tasks import evaluate_icl_tasks, load_eval_config, task_partitions

    if getattr(args, "tasks", None):
        raise EvalError("give --tasks or --config, not both")
    given = [flag for key, flag in PROMPT_FLAGS.items() if getattr(args, key, None) is not None]
    given += [f for f, on in (("--no-normalization", getattr(args, "no_normalization", False)),
                              ("--no-strip", getattr(args, "no_strip", False))) if on]
    if given:
        raise EvalError(f"{', '.join(given)}: with --config each task's settings come from the YAML (llm-foundry's "
                        "keys: num_fewshot, continuation_delimiter, ...); set them there")
    cfg = load_eval_config(args.config)  # every task file checked before the model is loaded
    gauntlet = load_gauntlet(args.gauntlet) if args.gauntlet else cfg.gauntlet
    if need_gauntlet and gauntlet is None:
        raise EvalError(f"{args.config}: no eval_gauntlet; add one to the file or pass --gauntlet GAUNTLET.yaml")
    if gauntlet is not None:
        labels = {(t.label, k) for t in cfg.tasks for k in t.num_fewshot}
        for c in gauntlet.categories:
            for b in c.benchmarks:
                if (b.name, b.num_fewshot) not in labels:
                    log.warning("gauntlet benchmark %s is not among the tasks of %s: category %s will be left "
                                "out", b.key, args.config, c.name)
    if args.markdown and args.markdown != "-":
        from mptkit.utils.outputs import check_output

        check_output(args.markdown, kind="file", flag="--markdown", replaceable=lambda p: p.suffix == ".md",
                     earlier="a Markdown file", overwrite=None, error=EvalError)
    for t in cfg.tasks:  # every JSONL file read and checked before the model is loaded
        task_partitions(t)
    model, tok = _load(args)
    results = evaluate_icl_tasks(model, tok, cfg.tasks, batch_size=args.batch_size, max_examples=args.max_examples,
                                 max_seq_len=args.max_seq_len,
                                 progress=lambda r: log.info("%s: %s", r.eval_label, r.metrics))
    if info is not None and not info.is_main:
        return 0  # every rank holds the results; rank 0 reports them
    name = str(args.model)
    rows = results_rows(results, gauntlet, model=name)
    g = aggregate(gauntlet, results) if gauntlet is not None else None
    md = args.markdown is not None
    table = markdown_table if md else text_table
    out = [table(rows, RESULT_COLUMNS)]
    if g is not None:
        grows, gcols = gauntlet_rows(g, model=name)
        out += ["", table(grows, gcols)]
    truncated = [f"{r.eval_label} ({r.truncated})" for r in results if r.truncated]
    text = "\n".join(out)
    if args.markdown and args.markdown != "-":
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
        print(text_table(rows, RESULT_COLUMNS))
        if g is not None:
            print()
            print(text_table(*gauntlet_rows(g, model=name)))
        print(f"markdown written to {args.markdown}")
    else:
        print(text)
    if truncated:
        print(f"prompts cut from the start to fit the window: {', '.join(truncated)}")
    payload = {"model": name, "config": cfg.path, "tasks": [t.to_dict() for t in cfg.tasks],
               "results": [r.to_dict(details=args.details) for r in results]}
    if g is not None:
        payload["gauntlet"] = {**g.to_dict(), "scores": g.scores()}
    _write_json(args.json, payload)
    return 0


def _gauntlet(args) -> int:
    info = None
    try:
        info = _distributed(args)
        return _icl_config(args, need_gauntlet=True, info=info)
    finally:
        if info is not None:
            from mptkit.train.distributed import shutdown

            shutdown(info)


# ----------------------------------------------------------------------------- parser
def _unescape(s: str) -> str:
    """Command-line delimiters may be written with backslash escapes (\\n, \\t)."""
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def register(sub: argparse._SubParsersAction) -> None:
    from mptkit.eval.icl import DEFAULT_CONTINUATION_DELIMITER, DEFAULT_EXAMPLE_DELIMITER

    ep = sub.add_parser("eval", help="evaluate a model: perplexity, long-context curve, ICL accuracy",
                        description="Evaluate a model folder. See docs/evaluation.md.")
    esub = ep.add_subparsers(dest="eval_command", metavar="ACTION")
    ep.set_defaults(func=lambda a: (ep.print_help(), 0)[1])

    data_help = ("text/code/JSONL files or folders (tokenized with the model's tokenizer, documents joined "
                 "with EOS), or a folder prepared by `mptkit data prepare`")

    p = esub.add_parser("perplexity", help="token-level perplexity with sliding windows",
                        description="Perplexity with sliding windows: every token is scored once, with at least "
                                    "max_seq_len - stride tokens of context (after the first window).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--split", default="val", help="split of a prepared folder (default val)")
    p.add_argument("--text-field", default="text", help="JSON/CSV/Parquet field holding the text (default text)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="window length (default: the model's max_seq_len; ALiBi models may go past it)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: half the window; = window: no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the data")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--allow-short", action="store_true", help="score data shorter than one window as one window")
    p.set_defaults(func=_perplexity)

    p = esub.add_parser("long-context", help="mean loss per position for windows of several lengths",
                        description="The StoryWriter-style curve: loss per position bucket when the model reads "
                                    "windows of each length (ALiBi models may go past max_seq_len).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--lengths", required=True, help="window lengths in tokens, comma-separated (e.g. 256,512,1024)")
    p.add_argument("--split", default="val", help="split of a prepared folder (default val)")
    p.add_argument("--text-field", default="text", help="JSON/CSV/Parquet field holding the text (default text)")
    p.add_argument("--buckets", type=int, default=8, help="position buckets per length (default 8)")
    p.add_argument("--max-tokens", type=int, default=1 << 16,
                   help="tokens of data read per length (default 65536; every length reads the same prefix)")
    p.add_argument("--batch-tokens", type=int, default=1 << 14,
                   help="tokens per forward pass (windows of one length batched up to this; default 16384)")
    p.add_argument("--positions", action="store_true", help="write the loss of every position to --json")
    p.set_defaults(func=_long_context)

    p = esub.add_parser("icl", help="in-context-learning accuracy on llm-foundry JSONL tasks",
                        description="Accuracy on llm-foundry's JSONL task types: language_modeling ({context, "
                                    "continuation}: greedy match), multiple_choice ({query, choices, gold}: highest "
                                    "log-likelihood), schema ({context_options, continuation, gold}: the context "
                                    "under which the continuation is likeliest) and generation_task_with_answers "
                                    "({context, answer, aliases}: greedy generation, normalized prefix match).")
    _add_model_args(p)
    p.add_argument("--tasks", default=None, help="JSONL task files, comma-separated")
    p.add_argument("--config", default=None, metavar="TASKS.yaml",
                   help="llm-foundry's icl_tasks YAML (a list of tasks, or a mapping with icl_tasks and optionally "
                        "eval_gauntlet); instead of --tasks and the prompt options")
    p.add_argument("--gauntlet", default=None, metavar="GAUNTLET.yaml",
                   help="with --config: llm-foundry's eval_gauntlet YAML (default: the config's eval_gauntlet)")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="OUT.md",
                   help="with --config: print the tables as Markdown, or write them to OUT.md")
    p.add_argument("--task-type", default=None,
                   help="language_modeling / multiple_choice / schema / generation_task_with_answers (lm / mc / "
                        "generation): one for all files or one per file, comma-separated (default: inferred from "
                        "the keys)")
    p.add_argument("--num-fewshot", default=None, help="shots per prompt; a comma list runs each (default 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the few-shot draws (default 1234, llm-foundry's fewshot_random_seed)")
    p.add_argument("--example-delimiter", type=_unescape, default=None,
                   help=f"between shots, and after a --prompt-string (default {DEFAULT_EXAMPLE_DELIMITER!r}, "
                        "llm-foundry's example_delimiter; backslash escapes are read)")
    p.add_argument("--continuation-delimiter", type=_unescape, default=None,
                   help=f"between a context and its answer (default {DEFAULT_CONTINUATION_DELIMITER!r}, "
                        "llm-foundry's continuation_delimiter)")
    p.add_argument("--prompt-string", type=_unescape, default=None,
                   help="text before the first shot, followed by --example-delimiter (default: none)")
    p.add_argument("--question-prelimiter", type=_unescape, default=None,
                   help="text before every context, the shots' too (llm-foundry's question_prelimiter, e.g. "
                        "'Question: ')")
    p.add_argument("--cot-delimiter", type=_unescape, default=None,
                   help="generation tasks: between a chain of thought and the answer; the output is matched "
                        "after its last occurrence (llm-foundry's cot_delimiter)")
    p.add_argument("--no-normalization", action="store_true",
                   help="generation tasks: match outputs and answers as written (llm-foundry's "
                        "do_normalization: false)")
    p.add_argument("--no-strip", action="store_true",
                   help="keep the whitespace around record fields (llm-foundry strips it: strip_dataset)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records of each file")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + answer (default: the model's max_seq_len; with --config a task's "
                        "max_seq_len / the file's icl_seq_len come first); longer prompts lose their start")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--stop", type=_unescape, default=None,
                   help="generation tasks: stop strings, comma-separated or a JSON list (llm-foundry's "
                        "early_stopping_criteria, e.g. '\\n'; default: EOS or the token budget)")
    p.add_argument("--details", action="store_true", help="write per-record results to --json")
    p.set_defaults(func=_icl)

    p = esub.add_parser("gauntlet", help="llm-foundry's Eval Gauntlet: ICL tasks aggregated by category",
                        description="Run llm-foundry's icl_tasks YAML and aggregate the accuracies with its "
                                    "eval_gauntlet (random-baseline subtraction, rescaling, weighting, averages). "
                                    "See docs/evaluation.md.")
    _add_model_args(p)
    p.add_argument("--config", required=True, metavar="TASKS.yaml",
                   help="llm-foundry's icl_tasks YAML (with eval_gauntlet, or give --gauntlet)")
    p.add_argument("--gauntlet", default=None, metavar="GAUNTLET.yaml",
                   help="llm-foundry's eval_gauntlet YAML (default: the config's eval_gauntlet)")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="OUT.md",
                   help="print the tables as Markdown, or write them to OUT.md")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records of each task")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="window of tasks whose YAML sets no max_seq_len / icl_seq_len (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--details", action="store_true", help="write per-record results to --json")
    p.set_defaults(func=_gauntlet)
