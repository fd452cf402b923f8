"""In-context-learning (ICL) accuracy on llm-foundry's JSONL task formats.

Formats (one JSON object per line; the task type is given or inferred from the keys of the first record):

* ``language_modeling``: ``{"context": str, "continuation": str}``. Correct iff the model's greedy (argmax)
  token at every continuation position equals the continuation's token there (LAMBADA-style; the same
  single forward pass, no sampling).
* ``multiple_choice``: ``{"query": str, "choices": [str, ...], "gold": int}``. Each choice is scored by the
  summed log-likelihood of its tokens given the prompt. ``accuracy``: the choice with the highest sum is
  gold; ``accuracy_norm``: the highest mean per-token log-likelihood (length-normalized; the criterion
  llm-foundry's multiple-choice accuracy uses, lowest per-token perplexity). Ties go to the first choice.
* ``schema``: ``{"context_options": [str, ...], "continuation": str, "gold": int}`` (Winograd-style partial
  scoring): the one continuation is scored after each context option; the option under which it is most
  likely is the model's choice (summed and per-token mean give the same pick: the continuation is the same
  tokens each time). Shots show ``context_options[gold]`` + ``CD`` + ``continuation``.
* ``generation_task_with_answers``: ``{"context": str, "answer": str, "aliases": [str, ...]}`` (TriviaQA-style):
  the model generates greedily after the prompt — at most the longest answer's tokens + 10, stopping early at
  any of ``stop`` (llm-foundry's ``early_stopping_criteria``) or EOS — and is correct when its output,
  normalized as llm-foundry does (lowercase, punctuation and the articles a/an/the removed, whitespace
  collapsed), starts with a normalized alias (``answer`` counts as one). Shots show ``context`` + ``CD`` +
  ``answer``; the prompt's trailing whitespace is dropped (the model writes the space itself).

The prompt (llm-foundry's ``prompt_string`` / ``example_delimiter`` / ``continuation_delimiter``: ``ED`` goes
between consecutive parts, after a non-empty ``prompt_string`` too)::

    [prompt_string + ED +] shot_1 + ED + ... + shot_k + ED + context + CD      then the answer
    shot_j = context_j + CD + answer_j      (answer = continuation, or choices[gold])

``ED`` defaults to ``"\\n"``, ``CD`` to ``" "`` and ``prompt_string`` to ``""`` (llm-foundry's defaults); with
``num_fewshot=k`` the ``k`` shots are drawn without replacement from the *other* records of the same file,
by a generator seeded with ``(seed, record index)`` (the same shots whatever subset or order is evaluated).
Whitespace at the end of the prompt (usually ``CD``) is moved to the front of the answer before tokenizing,
as lm-eval-harness does: byte-level BPEs attach a space to the word after it (`` Paris`` is one token), so
``"... is"`` + ``" Paris"`` is how the model saw such text in training, ``"... is "`` + ``"Paris"`` is not.
Prompt and answer are tokenized separately (no special tokens) and concatenated; an empty prompt becomes
the EOS token. A prompt too long for ``max_seq_len`` (default the model's) loses tokens from its start (the
answer is always kept whole). Requests are scored in batches, right-padded (causal attention: padding after
a token cannot change it), longest first.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mptkit.data.tokenizer import encode_batch
from mptkit.errors import EvalError
from mptkit.eval.scoring import check_token_ids, model_device, next_token_logprobs

log = logging.getLogger(__name__)

TASK_KEYS = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer", "aliases"),
}
TASK_ALIASES = {"lm": "language_modeling", "mc": "multiple_choice", "language-modeling": "language_modeling",
                "multiple-choice": "multiple_choice", "generation": "generation_task_with_answers",
                "question_answering": "generation_task_with_answers"}  # llm-foundry's former name
CHOICE_TYPES = ("multiple_choice", "schema")  # the model picks among alternatives; ``gold`` is the right one
GENERATION_BUFFER = 10  # new tokens beyond the longest answer (llm-foundry's _MAX_ANSWER_BUFFER_LENGTH)
DEFAULT_EXAMPLE_DELIMITER = "\n"  # llm-foundry's defaults: example_delimiter "\n",
DEFAULT_CONTINUATION_DELIMITER = " "  # continuation_delimiter " ", prompt_string ""


@dataclass
class ICLTask:
    """A task file's records (validated) and its type. ``lines[i]`` is record ``i``'s line number."""

    name: str
    task_type: str
    examples: list[dict]
    path: str = ""
    lines: list[int] = field(default_factory=list)


@dataclass
class ICLResult:
    """``accuracy``: fraction correct (LM: greedy match; MC / schema: highest summed log-likelihood;
    generation: normalized output starts with an alias); ``accuracy_norm``: MC / schema by mean per-token
    log-likelihood (None otherwise); ``truncated``: prompts cut to fit; ``details``: per record
    ``{"index", "correct", ...}`` (MC / schema: ``"logprobs"``, ``"tokens"`` per choice; generation:
    ``"output"``)."""

    task: str
    task_type: str
    num_fewshot: int
    examples: int
    accuracy: float
    accuracy_norm: float | None = None
    truncated: int = 0
    details: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, *, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("details")
        return d


def normalize_task_type(name: str | None) -> str | None:
    """``lm``/``mc`` aliases -> the full names; unknown names are an :class:`EvalError`."""
    if name is None:
        return None
    t = TASK_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if t not in TASK_KEYS:
        raise EvalError(f"unknown task type {name!r}: supported are {', '.join(TASK_KEYS)} (or lm, mc, generation)")
    return t


def infer_task_type(record: dict, where: str) -> str:
    for t, keys in TASK_KEYS.items():
        if all(k in record for k in keys):
            return t
    expected = "; ".join(f"{t}: {', '.join(repr(k) for k in keys)}" for t, keys in TASK_KEYS.items())
    raise EvalError(f"{where}: cannot tell the task type from the keys {sorted(record)} (expected {expected}); "
                    "pass --task-type")


def _check_record(rec: dict, task_type: str, where: str) -> None:
    keys = TASK_KEYS[task_type]
    for k in keys:
        if k not in rec:
            raise EvalError(f"{where}: missing key {k!r} (a {task_type} record needs "
                            f"{', '.join(repr(x) for x in keys)}; found {sorted(rec)})")
    if task_type == "language_modeling":
        for k in keys:
            if not isinstance(rec[k], str):
                raise EvalError(f"{where}: key {k!r} is {type(rec[k]).__name__}, expected a string")
        if not rec["continuation"].strip():
            raise EvalError(f"{where}: key 'continuation' is empty (nothing to predict)")
    elif task_type == "generation_task_with_answers":
        for k in ("context", "answer"):
            if not isinstance(rec[k], str):
                raise EvalError(f"{where}: key {k!r} is {type(rec[k]).__name__}, expected a string")
        al = rec["aliases"]
        if not isinstance(al, list) or not all(isinstance(a, str) for a in al) or not any(
                a.strip() for a in [rec["answer"], *al]):
            raise EvalError(f"{where}: key 'aliases' must be a list of strings (with 'answer', at least one "
                            "non-empty answer)")
    else:
        opts_key = "choices" if task_type == "multiple_choice" else "context_options"
        text_key = "query" if task_type == "multiple_choice" else "continuation"
        if not isinstance(rec[text_key], str):
            raise EvalError(f"{where}: key {text_key!r} is {type(rec[text_key]).__name__}, expected a string")
        if task_type == "schema" and not rec["continuation"].strip():
            raise EvalError(f"{where}: key 'continuation' is empty (nothing to score)")
        ch = rec[opts_key]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise EvalError(f"{where}: key {opts_key!r} must be a list of at least 2 non-empty strings")
        g = rec["gold"]
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(ch):
            raise EvalError(f"{where}: key 'gold' is {g!r}, expected an integer index into {opts_key!r} "
                            f"(0..{len(ch) - 1})")


def read_icl_jsonl(path, task_type: str | None = None) -> ICLTask:
    """Read and validate an ICL JSONL file. Malformed lines and missing keys raise :class:`EvalError`
    naming ``file:line`` and the keys expected."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"--tasks {path}: no such file" + (" (a folder: give the .jsonl files)" if p.is_dir() else ""))
    task_type = normalize_task_type(task_type)
    examples, lines = [], []
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise EvalError(f"{p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{p}: invalid UTF-8 ({e})") from None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{where}: malformed JSON ({e}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise EvalError(f"{where}: a JSON {type(rec).__name__}, expected an object with keys "
                            + (", ".join(repr(k) for k in TASK_KEYS[task_type]) if task_type else
                               " or ".join(", ".join(repr(k) for k in ks) for ks in TASK_KEYS.values())))
        if task_type is None:
            task_type = infer_task_type(rec, where)
        _check_record(rec, task_type, where)
        examples.append(rec)
        lines.append(lineno)
    if not examples:
        raise EvalError(f"{p}: no records (an empty ICL task file)")
    return ICLTask(name=p.stem, task_type=task_type, examples=examples, path=str(p), lines=lines)


def _context(rec: dict, task_type: str, option: int | None = None) -> str:
    """The text before ``CD``: as a shot, and as asked (a schema record is asked once per context option;
    ``option`` None is its gold one)."""
    if task_type == "multiple_choice":
        return rec["query"]
    if task_type == "schema":
        return rec["context_options"][rec["gold"] if option is None else option]
    return rec["context"]


def _gold_answer(rec: dict, task_type: str) -> str:
    if task_type == "multiple_choice":
        return rec["choices"][rec["gold"]]
    if task_type == "generation_task_with_answers":
        return rec["answer"]
    return rec["continuation"]


def _alternatives(rec: dict, task_type: str, prefix: str, cd: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs to score for a record, ``prefix`` being the prompt string and shots joined with
    their trailing delimiter."""
    if task_type == "multiple_choice":
        return [(prefix + _context(rec, task_type) + cd, c) for c in rec["choices"]]
    if task_type == "schema":
        return [(prefix + _context(rec, task_type, j) + cd, rec["continuation"])
                for j in range(len(rec["context_options"]))]
    return [(prefix + _context(rec, task_type) + cd, rec["continuation"])]


def fewshot_indices(n: int, index: int, k: int, seed: int) -> list[int]:
    """``k`` distinct record indices in ``[0, n)`` other than ``index``, drawn by a generator seeded with
    ``(seed, index)``."""
    if k <= 0:
        return []
    if k > n - 1:
        raise EvalError(f"--num-fewshot {k}: the task has only {n} records ({n - 1} available as shots)")
    rng = random.Random(f"{int(seed)}:{int(index)}")
    return [j + (j >= index) for j in rng.sample(range(n - 1), k)]


def _prefix(task: ICLTask, index: int, num_fewshot: int, seed: int, example_delimiter: str,
            continuation_delimiter: str, prompt_string: str) -> str:
    """``prompt_string`` and the shots, each followed by the example delimiter ("" when there are none)."""
    t = task.task_type
    shots = [task.examples[j] for j in fewshot_indices(len(task.examples), index, num_fewshot, seed)]
    parts = ([prompt_string] if prompt_string else []) + [
        _context(s, t) + continuation_delimiter + _gold_answer(s, t) for s in shots]
    return "".join(p + example_delimiter for p in parts)


def build_prompt(task: ICLTask, index: int, *, num_fewshot: int = 0, seed: int = 1234,
                 example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER,
                 continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER, prompt_string: str = "",
                 option: int | None = None) -> str:
    """The prompt text of record ``index`` (shots included), before the answer (see the module docstring);
    for a schema record, the prompt of context option ``option`` (default: gold)."""
    prefix = _prefix(task, index, num_fewshot, seed, example_delimiter, continuation_delimiter, prompt_string)
    return prefix + _context(task.examples[index], task.task_type, option) + continuation_delimiter


def normalize_answer(text: str) -> str:
    """llm-foundry's answer normalization for generation tasks: underscores to spaces, lowercase, punctuation
    (and curly quotes, backtick, acute accent) to spaces, the articles a/an/the removed, whitespace
    collapsed."""
    import re
    import string

    text = text.replace("_", " ").lower()
    punct = set(string.punctuation + "\u2018\u2019\u00b4`")
    text = "".join(" " if ch in punct else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def split_trailing_space(prompt: str, answer: str) -> tuple[str, str]:
    """Move the prompt's trailing whitespace to the start of the answer."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + answer


def _encode(tokenizer, text: str) -> list[int]:
    return encode_batch(tokenizer, [text])[0] if text else []


@torch.inference_mode()
def score_requests(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                   max_seq_len: int | None = None) -> tuple[list[tuple[float, int, bool]], int]:
    """Score ``(prompt_ids, answer_ids)`` pairs: ``([(sum log p(answer | prompt), answer tokens, greedy
    match), ...], number of prompts truncated)``. Prompts longer than ``max_seq_len`` minus the answer lose
    tokens from the start."""
    limit = int(max_seq_len or model.config.max_seq_len)
    seqs, truncated = [], 0
    for p, a in requests:
        if not a:
            raise EvalError("an answer encodes to no tokens")
        if not p:
            raise EvalError("a prompt encodes to no tokens (no EOS token to stand in for it)")
        room = limit - len(a)
        if room < 1:
            raise EvalError(f"an answer of {len(a)} tokens does not fit a window of {limit} tokens with at least "
                            "one token of prompt; raise --max-seq-len or shorten the answers")
        if len(p) > room:
            p = p[-room:]
            truncated += 1
        seqs.append((p, a))
    if int(batch_size) < 1:
        raise EvalError(f"--batch-size {batch_size}: must be >= 1")
    check_token_ids([t for p, a in seqs for t in (min(p), max(p), min(a), max(a))], model.config.vocab_size,
                    "ICL prompts and answers")
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    out: list = [None] * len(seqs)
    dev = model_device(model)
    for s in range(0, len(order), int(batch_size)):
        idx = order[s : s + int(batch_size)]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
        width = max(width, 2)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        sel = torch.zeros((len(idx), width - 1), dtype=torch.bool)
        for r, i in enumerate(idx):
            p, a = seqs[i]
            x[r, : len(p) + len(a)] = torch.tensor(p + a)
            sel[r, len(p) - 1 : len(p) + len(a) - 1] = True
        logp, am = next_token_logprobs(model, x.to(dev), sel, greedy=True)
        logp, am = logp.double().cpu(), am.cpu()
        tgt = x[:, 1:][sel]
        off = 0
        for i in idx:
            n = len(seqs[i][1])
            out[i] = (float(logp[off : off + n].sum()), n, bool((am[off : off + n] == tgt[off : off + n]).all()))
            off += n
    return out, truncated


def as_task(task, task_type: str | None = None) -> ICLTask:
    """``task`` (a JSONL path, an :class:`ICLTask` or a list of record dicts) as a validated :class:`ICLTask`."""
    if isinstance(task, ICLTask):
        if task_type is not None and normalize_task_type(task_type) != task.task_type:
            raise EvalError(f"task {task.name} is {task.task_type}, not {task_type}")
    elif isinstance(task, (list, tuple)):
        recs = list(task)
        if not recs:
            raise EvalError("the task has no records")
        tt = normalize_task_type(task_type)
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise EvalError(f"record {i}: expected a dict, got {type(r).__name__}")
            tt = tt or infer_task_type(r, f"record {i}")
            _check_record(r, tt, f"record {i}")
        return ICLTask(name="task", task_type=tt, examples=recs, lines=list(range(1, len(recs) + 1)))
    else:
        return read_icl_jsonl(task, task_type)
    return task


def icl_accuracy(model, tokenizer, task, *, task_type: str | None = None, num_fewshot: int = 0, seed: int = 1234,
                 example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER,
                 continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER, prompt_string: str = "",
                 batch_size: int = 16, max_examples: int | None = None,
                 max_seq_len: int | None = None, stop: str | list[str] | None = None,
                 indices=None) -> ICLResult:
    """Accuracy of ``model`` on an ICL task (see the module docstring for the formats and the prompt).

    ``task``: a JSONL path, an :class:`ICLTask`, or a list of record dicts. ``num_fewshot``: shots per prompt,
    drawn (seeded) from the other records. ``max_examples``: evaluate only the first N records (shots still
    come from the whole file). ``stop``: generation tasks' early-stopping strings (llm-foundry's
    ``early_stopping_criteria``; default none: EOS or the token limit). ``indices``: score only these records
    of the first ``max_examples`` (one rank's share, :func:`mptkit.eval.distributed.icl_accuracy_sharded`;
    shots, the generation budget and the rest are those of the whole set). Returns an :class:`ICLResult`."""
    task = as_task(task, task_type)
    if tokenizer is None:
        raise EvalError("ICL tasks need a tokenizer (the model folder has none; pass --tokenizer)")
    if max_seq_len is not None:
        from mptkit.eval.perplexity import check_window_length

        check_window_length(model, int(max_seq_len))
    if int(num_fewshot) < 0:
        raise EvalError(f"--num-fewshot {num_fewshot}: must be >= 0")
    if max_examples is not None and int(max_examples) < 1:
        raise EvalError(f"--max-examples {max_examples}: must be >= 1")
    n = len(task.examples) if max_examples is None else min(len(task.examples), int(max_examples))
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < n for i in idx):
        raise EvalError(f"record indices must be in [0, {n}), got {idx}")
    eos = getattr(tokenizer, "eos_token_id", None)
    t = task.task_type
    fmt = {"num_fewshot": int(num_fewshot), "seed": seed, "example_delimiter": example_delimiter,
           "continuation_delimiter": continuation_delimiter, "prompt_string": prompt_string}
    if t == "generation_task_with_answers":
        return _generation_accuracy(model, tokenizer, task, n, fmt, stop=stop, batch_size=batch_size,
                                    max_seq_len=max_seq_len, indices=idx)
    requests, owner = [], []
    for i in idx:
        prefix = _prefix(task, i, **fmt)
        for c, (prompt, ans) in enumerate(_alternatives(task.examples[i], t, prefix, continuation_delimiter)):
            ptxt, atxt = split_trailing_space(prompt, ans)
            p_ids = _encode(tokenizer, ptxt) or ([eos] if eos is not None else [])
            a_ids = _encode(tokenizer, atxt)
            if not a_ids:
                where = f"{task.path}:{task.lines[i]}" if task.path else f"record {i}"
                raise EvalError(f"{where}: the answer {ans!r} encodes to no tokens")
            requests.append((p_ids, a_ids))
            owner.append((i, c))
    scores, truncated = score_requests(model, requests, batch_size=batch_size, max_seq_len=max_seq_len) if (
        requests) else ([], 0)
    if truncated:
        log.warning("%s: %d of %d prompts were cut from the start to fit the window", task.name, truncated,
                    len(requests))
    per: dict[int, list[tuple[float, int, bool]]] = {i: [] for i in idx}
    for (i, _), sc in zip(owner, scores):
        per[i].append(sc)
    details, correct, correct_norm = [], 0, 0
    for i, sc in per.items():
        if t == "language_modeling":
            ok = sc[0][2]
            details.append({"index": i, "correct": ok, "logprob": sc[0][0], "tokens": sc[0][1]})
        else:  # multiple choice / schema: the most likely alternative
            sums = [s for s, _, _ in sc]
            means = [s / k for s, k, _ in sc]
            pick = max(range(len(sums)), key=lambda j: (sums[j], -j))
            pick_n = max(range(len(means)), key=lambda j: (means[j], -j))
            gold = task.examples[i]["gold"]
            ok = pick == gold
            correct_norm += pick_n == gold
            details.append({"index": i, "correct": ok, "correct_norm": pick_n == gold, "choice": pick,
                            "choice_norm": pick_n, "gold": gold, "logprobs": sums, "tokens": [k for _, k, _ in sc]})
        correct += ok
    m = max(1, len(idx))
    return ICLResult(task=task.name, task_type=t, num_fewshot=int(num_fewshot), examples=len(idx),
                     accuracy=correct / m, accuracy_norm=(correct_norm / m if t in CHOICE_TYPES else None),
                     truncated=truncated, details=details)


def _generation_accuracy(model, tokenizer, task: ICLTask, n: int, fmt: dict, *, stop, batch_size: int,
                         max_seq_len: int | None, indices: list[int]) -> ICLResult:
    """Greedy generation after each prompt (mptkit.infer's batched generator: a cache slot per prompt, no
    padding), cut at the first stop string, scored by normalized prefix match against the aliases."""
    from mptkit.infer.generate import Generator
    from mptkit.infer.sampling import SamplingParams

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(x, str) or not x for x in stops):
        raise EvalError(f"--stop {stop!r}: stop strings must be non-empty")
    answers = [[r["answer"], *r["aliases"]] for r in task.examples[:n]]
    longest = max(len(_encode(tokenizer, " " + a)) for al in answers for a in al if a)
    limit = int(max_seq_len or model.config.max_seq_len)
    new = longest + GENERATION_BUFFER
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts, truncated = [], 0
    for i in indices:
        ids = _encode(tokenizer, build_prompt(task, i, **fmt).rstrip()) or ([eos] if eos is not None else [])
        if not ids:
            raise EvalError("a prompt encodes to no tokens (no EOS token to stand in for it)")
        room = limit - new
        if room < 1:
            raise EvalError(f"answers of up to {longest} tokens (+{GENERATION_BUFFER} to spare) do not fit a window "
                            f"of {limit} tokens; raise --max-seq-len or shorten the answers")
        if len(ids) > room:
            ids, truncated = ids[-room:], truncated + 1
        prompts.append(ids)
    check_token_ids([t for p in prompts for t in (min(p), max(p))], model.config.vocab_size, "ICL prompts")
    if int(batch_size) < 1:
        raise EvalError(f"--batch-size {batch_size}: must be >= 1")
    gen = Generator(model, tokenizer, max_context=limit)
    params = SamplingParams(max_tokens=new, temperature=0.0, stop=stops)
    outputs: list[str] = []
    for s in range(0, len(prompts), int(batch_size)):
        outputs += [o.text for o in gen.generate(prompts[s : s + int(batch_size)], params)]
    details, correct = [], 0
    for i, out in zip(indices, outputs):
        al = answers[i]
        got = normalize_answer(out)
        ok = any(got.startswith(normalize_answer(a)) for a in al if normalize_answer(a))
        correct += ok
        details.append({"index": i, "correct": ok, "output": out})
    return ICLResult(task=task.name, task_type=task.task_type, num_fewshot=fmt["num_fewshot"],
                     examples=len(indices), accuracy=correct / max(1, len(indices)), truncated=truncated,
                     details=details)
