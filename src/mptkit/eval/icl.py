"""In-context-learning (ICL) accuracy on llm-foundry's JSONL task formats, with llm-foundry's prompts.

Formats (one JSON object per line; the task type is given or inferred from the keys of the first record):

* ``language_modeling``: ``{"context": str, "continuation": str}``. Correct iff the model's greedy (argmax)
  token at every continuation position equals the continuation's token there (LAMBADA-style).
* ``multiple_choice``: ``{"query": str, "choices": [str, ...], "gold": int}``. Each choice is scored by the
  summed log-likelihood of its tokens given the prompt. ``accuracy``: the choice with the highest sum is
  gold; ``accuracy_norm``: the highest mean per-token log-likelihood (llm-foundry's multiple-choice
  accuracy: lowest per-token perplexity). Ties go to the first choice.
* ``schema``: ``{"context_options": [str, ...], "continuation": str, "gold": int}`` (Winograd-style partial
  scoring): the one continuation is scored after each context option.
* ``generation_task_with_answers``: ``{"context": str, "answer": str}`` with optional ``"aliases": [str, ...]``
  and ``"chain_of_thought": str``: greedy generation, correct when the output (cut at the first stop string,
  after the last ``cot_delimiter``, normalized unless ``do_normalization`` is false) starts with the answer or
  an alias (normalized likewise).

The prompt is built as llm-foundry's ``InContextLearningDataset`` builds it (the rules, not its code):

* every string field of every record is stripped first (``strip_whitespace``, llm-foundry's
  ``strip_dataset``, default on); lists (``choices``, ``context_options``, ``aliases``) are not;
* the shots of record ``i`` are :func:`fewshot_draws` (llm-foundry's sampler: one ``random.Random(seed)``
  walking the records in order);
* preamble = ``prompt_string`` + each shot, a shot being ``[ED] + question_prelimiter + context + CD +
  answer`` (ED = ``example_delimiter`` whenever text precedes it; a schema shot is ``question_prelimiter + [ED]
  + context_options[gold] + CD + continuation``; a generation shot's answer is ``chain_of_thought +
  cot_delimiter + answer`` when the file has chains of thought);
* context = ``[ED] + question_prelimiter + context + CD``, right-stripped (a schema record: one per option,
  ``question_prelimiter + [ED + option + CD.rstrip()]``, the bare option at zero shots);
* the preamble is tokenized with the tokenizer's special tokens (a trailing EOS dropped), the context
  without, and the two concatenated; each answer is tokenized on its own after a space when the tokenizer
  needs one (byte-level BPEs: :func:`needs_prefix_space`);
* a context too long for ``max_seq_len`` (llm-foundry's ``icl_seq_len``; default the model's) minus the
  answer (generation: minus the answer budget) loses tokens from its start.

Requests are scored in batches, right-padded (causal attention: padding after a token cannot change it),
longest first.
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
    "generation_task_with_answers": ("context", "answer"),  # optional: aliases, chain_of_thought
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
        al = rec.get("aliases", [])
        if not isinstance(al, list) or not all(isinstance(a, str) for a in al) or not any(
                a.strip() for a in [rec["answer"], *al]):
            raise EvalError(f"{where}: key 'aliases' (optional) must be a list of strings (with 'answer', at "
                            "least one non-empty answer)")
        if not isinstance(rec.get("chain_of_thought", ""), str):
            raise EvalError(f"{where}: key 'chain_of_thought' (optional) must be a string")
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


# ----------------------------------------------------------------------------- llm-foundry's prompt construction
def strip_record(rec: dict) -> dict:
    """llm-foundry's ``strip_data``: every string value of the record stripped (lists such as ``choices``,
    ``context_options`` and ``aliases`` are left as they are)."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in rec.items()}


def fewshot_draws(n: int, k: int, seed: int) -> list[list[int]]:
    """The shot indices of every record of an ``n``-record task at ``k`` shots, as llm-foundry draws them: one
    ``random.Random(seed)`` walks the records in order; record ``i`` takes ``rng.sample(range(n), k)``, and if
    that holds ``i`` itself, ``i`` is replaced by ``rng.choice(range(n))`` draws until one is new. The shots
    are put in the order llm-foundry iterates them (a Python ``set`` of the draws). So record ``i``'s shots
    depend on the seed and on ``n`` (every record before it draws first), not on which records are scored."""
    if k <= 0:
        return [[] for _ in range(n)]
    if k > n - 1:
        raise EvalError(f"--num-fewshot {k}: the task has only {n} records ({n - 1} available as shots)")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        picked = set(rng.sample(range(n), k))
        if i in picked:
            picked.remove(i)
            if len(picked) < n - 1:
                extra = rng.choice(range(n))
                while extra == i or extra in picked:
                    extra = rng.choice(range(n))
                picked.add(extra)
        out.append(list(picked))
    return out


@dataclass(frozen=True)
class PromptFormat:
    """llm-foundry's prompt settings (its ``icl_tasks`` keys and defaults)."""

    prompt_string: str = ""
    example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER
    continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER
    question_prelimiter: str = ""
    cot_delimiter: str = ""
    strip_whitespace: bool = True  # llm-foundry's strip_dataset


def _has_cot(task: ICLTask) -> bool:
    return task.task_type == "generation_task_with_answers" and any("chain_of_thought" in r for r in task.examples)


def _shot(rec: dict, task_type: str, f: PromptFormat, preceding: str, cot: bool) -> str:
    """A solved example as llm-foundry writes it after ``preceding`` (ED first when something precedes)."""
    ed = f.example_delimiter if preceding else ""
    if task_type == "schema":  # llm-foundry puts the prelimiter before the delimiter here
        return f"{f.question_prelimiter}{ed}{rec['context_options'][rec['gold']]}{f.continuation_delimiter}" \
               f"{rec['continuation']}"
    if task_type == "multiple_choice":
        ctx, ans = rec["query"], rec["choices"][rec["gold"]]
    elif task_type == "generation_task_with_answers":
        ctx = rec["context"]
        ans = f"{rec.get('chain_of_thought') or ''}{f.cot_delimiter}{rec['answer']}" if cot else rec["answer"]
    else:
        ctx, ans = rec["context"], rec["continuation"]
    return f"{ed}{f.question_prelimiter}{ctx}{f.continuation_delimiter}{ans}"


def _asked(rec: dict, task_type: str, f: PromptFormat, preceding: str) -> list[str]:
    """The text after the shots for each alternative (one, or one per schema context option)."""
    ed = f.example_delimiter if preceding else ""
    if task_type == "schema":
        if not preceding:  # llm-foundry: a zero-shot schema context has no continuation delimiter
            return [f"{f.question_prelimiter}{c}" for c in rec["context_options"]]
        cd = f.continuation_delimiter.rstrip() if f.strip_whitespace else f.continuation_delimiter
        return [f"{f.question_prelimiter}{ed}{c}{cd}" for c in rec["context_options"]]
    ctx = rec["query"] if task_type == "multiple_choice" else rec["context"]
    text = f"{ed}{f.question_prelimiter}{ctx}{f.continuation_delimiter}"
    return [text.rstrip() if f.strip_whitespace else text]


def prompt_texts(task: ICLTask, index: int, shots: list[int], f: PromptFormat) -> tuple[str, list[str]]:
    """``(preamble, [context, ...])`` of record ``index`` with the shot records ``shots``: the preamble is
    ``prompt_string`` and the shots (tokenized with the tokenizer's special tokens, as llm-foundry does), each
    context what follows it for one alternative (tokenized on its own)."""
    recs = task.examples
    view = strip_record if f.strip_whitespace else (lambda r: r)
    cot = _has_cot(task)
    pre = f.prompt_string
    for j in shots:
        pre += _shot(view(recs[j]), task.task_type, f, pre, cot)
    return pre, _asked(view(recs[index]), task.task_type, f, pre)


def build_prompt(task: ICLTask, index: int, *, num_fewshot: int = 0, seed: int = 1234,
                 example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER,
                 continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER, prompt_string: str = "",
                 question_prelimiter: str = "", cot_delimiter: str = "", strip_whitespace: bool = True,
                 option: int | None = None) -> str:
    """The prompt text of record ``index`` (shots included) before the answer, as llm-foundry builds it; for a
    schema record, the prompt of context option ``option`` (default: gold)."""
    f = PromptFormat(prompt_string, example_delimiter, continuation_delimiter, question_prelimiter, cot_delimiter,
                     strip_whitespace)
    shots = fewshot_draws(len(task.examples), num_fewshot, seed)[index]
    pre, ctxs = prompt_texts(task, index, shots, f)
    if task.task_type == "schema":
        return pre + ctxs[task.examples[index]["gold"] if option is None else option]
    return pre + ctxs[0]


def needs_prefix_space(tokenizer) -> bool:
    """llm-foundry's test: a tokenizer that encodes ``" a"`` as one token (byte-level BPE) gets a space put
    before each answer that does not start with one; a SentencePiece one does not."""
    return len(_encode(tokenizer, " a")) == 1


def _encode_with_special(tokenizer, text: str) -> list[int]:
    """``tokenizer(text)["input_ids"]``: special tokens added as the tokenizer adds them (a BOS for Llama's)."""
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        return list(tokenizer(text, verbose=False)["input_ids"])
    return list(tokenizer.encode(text).ids)  # a raw tokenizers.Tokenizer


def _encode_preamble(tokenizer, text: str) -> list[int]:
    ids = _encode_with_special(tokenizer, text)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) > 1 and ids[-1] == eos:  # llm-foundry's _fix_eos_on_preamble
        ids = ids[:-1]
    return ids


@dataclass
class ICLRequest:
    """One sequence to score or generate from: record ``index``, alternative ``option`` (a choice or a
    schema context option; 0 otherwise), ``context`` token ids (already cut from the left to fit),
    ``answer`` token ids (empty for generation), ``truncated``: whether the context was cut."""

    index: int
    option: int
    context: list[int]
    answer: list[int]
    truncated: bool = False


def generation_budget(task: ICLTask, tokenizer, cot_delimiter: str = "") -> int:
    """llm-foundry's ``max_answer_length``: the most tokens (special tokens included) of any answer or alias,
    with ``chain_of_thought + cot_delimiter`` before it when the file has chains of thought, + 10 when
    ``cot_delimiter`` is set; the generation budget (at least 1) and the room kept for it in the window."""
    cot = _has_cot(task)
    longest = 0
    for r in task.examples:
        for a in [r["answer"], *r.get("aliases", [])]:
            resp = f"{r.get('chain_of_thought') or ''}{cot_delimiter}{a}" if cot else a
            longest = max(longest, len(_encode_with_special(tokenizer, resp)))
    return longest + (GENERATION_BUFFER if cot_delimiter else 0)


def build_requests(task: ICLTask, tokenizer, *, num_fewshot: int = 0, seed: int = 1234,
                   example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER,
                   continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER, prompt_string: str = "",
                   question_prelimiter: str = "", cot_delimiter: str = "", strip_whitespace: bool = True,
                   max_seq_len: int, indices=None) -> list[ICLRequest]:
    """The token sequences llm-foundry builds for the records ``indices`` (default all) of ``task``: the
    preamble (prompt string + shots) tokenized with special tokens (a trailing EOS dropped), the context
    tokenized without, concatenated; each answer tokenized without special tokens after a space when the
    tokenizer needs one (:func:`needs_prefix_space`); contexts longer than ``max_seq_len`` minus the answer
    (generation: minus :func:`generation_budget`) lose tokens from the start. An empty context becomes the
    EOS token."""
    f = PromptFormat(prompt_string, example_delimiter, continuation_delimiter, question_prelimiter, cot_delimiter,
                     strip_whitespace)
    t = task.task_type
    n = len(task.examples)
    indices = range(n) if indices is None else indices
    draws = fewshot_draws(n, num_fewshot, seed)
    space = needs_prefix_space(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    limit = int(max_seq_len)
    gen_room = limit - generation_budget(task, tokenizer, cot_delimiter) if t == "generation_task_with_answers" \
        else None

    def answer_ids(text: str, i: int) -> list[int]:
        if space and not text.startswith(" "):
            text = " " + text
        ids = _encode(tokenizer, text)
        if not ids:
            where = f"{task.path}:{task.lines[i]}" if task.path else f"record {i}"
            raise EvalError(f"{where}: the answer {text!r} encodes to no tokens")
        return ids

    out = []
    for i in indices:
        pre, ctxs = prompt_texts(task, i, draws[i], f)
        pre_ids = _encode_preamble(tokenizer, pre)
        rec = strip_record(task.examples[i]) if strip_whitespace else task.examples[i]
        if t == "multiple_choice":
            answers = [answer_ids(c, i) for c in rec["choices"]]
        elif t == "generation_task_with_answers":
            answers = [[]]
        else:
            answers = [answer_ids(rec["continuation"], i)] * len(ctxs)
        for j, a in enumerate(answers):
            ctx = ctxs[j if t == "schema" else 0]
            ids = pre_ids + _encode(tokenizer, ctx)
            if not ids:
                if eos is None:
                    raise EvalError("a prompt encodes to no tokens (no EOS token to stand in for it)")
                ids = [eos]
            room = gen_room if gen_room is not None else limit - len(a)
            if room < 1:
                if gen_room is not None:
                    raise EvalError(f"answers of up to {limit - gen_room} tokens do not fit a window of {limit} "
                                    "tokens with a prompt; raise --max-seq-len or shorten the answers")
                raise EvalError(f"an answer of {len(a)} tokens does not fit a window of {limit} tokens with at "
                                "least one token of prompt; raise --max-seq-len or shorten the answers")
            cut = len(ids) > room
            out.append(ICLRequest(i, j, ids[-room:] if cut else ids, a, cut))
    return out


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


def generation_correct(output: str, labels: list[str], *, cot_delimiter: str = "",
                       do_normalization: bool = True) -> bool:
    """llm-foundry's exact-match rule: the output (already cut at the first stop string) after the last
    ``cot_delimiter``, normalized when ``do_normalization``, starts with a label (normalized likewise)."""
    final = output.split(cot_delimiter)[-1] if cot_delimiter else output
    if do_normalization:
        final, labels = normalize_answer(final), [normalize_answer(x) for x in labels]
    return any(final.startswith(x) for x in labels)


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


def _as_task(task, task_type: str | None) -> ICLTask:
    if isinstance(task, ICLTask):
        if task_type is not None and normalize_task_type(task_type) != task.task_type:
            raise EvalError(f"task {task.name} is {task.task_type}, not {task_type}")
        return task
    if isinstance(task, (list, tuple)):
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
    return read_icl_jsonl(task, task_type)


def icl_accuracy(model, tokenizer, task, *, task_type: str | None = None, num_fewshot: int = 0, seed: int = 1234,
                 example_delimiter: str = DEFAULT_EXAMPLE_DELIMITER,
                 continuation_delimiter: str = DEFAULT_CONTINUATION_DELIMITER, prompt_string: str = "",
                 question_prelimiter: str = "", cot_delimiter: str = "", do_normalization: bool = True,
                 strip_whitespace: bool = True, batch_size: int = 16, max_examples: int | None = None,
                 indices=None, max_seq_len: int | None = None, stop: str | list[str] | None = None) -> ICLResult:
    """Accuracy of ``model`` on an ICL task, with llm-foundry's prompts (see the module docstring).

    ``task``: a JSONL path, an :class:`ICLTask`, or a list of record dicts. ``num_fewshot``: shots per prompt,
    drawn as llm-foundry draws them with ``seed`` (its ``fewshot_random_seed``). The prompt settings are
    llm-foundry's ``icl_tasks`` keys (``strip_whitespace`` is its ``strip_dataset``). ``max_examples``: score
    only the first N records; ``indices``: score only these records (e.g. one rank's share); shots always come
    from the whole task. ``stop``: generation tasks' ``early_stopping_criteria`` (default none: EOS or the
    budget); ``cot_delimiter`` / ``do_normalization``: their answer matching. Returns an :class:`ICLResult`."""
    task = _as_task(task, task_type)
    if tokenizer is None:
        raise EvalError("ICL tasks need a tokenizer (the model folder has none; pass --tokenizer)")
    if max_seq_len is not None:
        from mptkit.eval.perplexity import check_window_length

        check_window_length(model, int(max_seq_len))
    if int(num_fewshot) < 0:
        raise EvalError(f"--num-fewshot {num_fewshot}: must be >= 0")
    if max_examples is not None and int(max_examples) < 1:
        raise EvalError(f"--max-examples {max_examples}: must be >= 1")
    if int(batch_size) < 1:
        raise EvalError(f"--batch-size {batch_size}: must be >= 1")
    total = len(task.examples)
    if indices is None:
        indices = list(range(total if max_examples is None else min(total, int(max_examples))))
    else:
        indices = [int(i) for i in indices]
        if any(not 0 <= i < total for i in indices):
            raise EvalError(f"indices must lie in [0, {total}) (the task's records)")
        if max_examples is not None:
            indices = indices[: int(max_examples)]
    t = task.task_type
    limit = int(max_seq_len or model.config.max_seq_len)
    reqs = build_requests(task, tokenizer, num_fewshot=int(num_fewshot), seed=seed,
                          example_delimiter=example_delimiter, continuation_delimiter=continuation_delimiter,
                          prompt_string=prompt_string, question_prelimiter=question_prelimiter,
                          cot_delimiter=cot_delimiter, strip_whitespace=strip_whitespace, max_seq_len=limit,
                          indices=indices)
    truncated = sum(r.truncated for r in reqs)
    if truncated:
        log.warning("%s: %d of %d prompts were cut from the start to fit the window of %d tokens", task.name,
                    truncated, len(reqs), limit)
    if t == "generation_task_with_answers":
        return _generation_accuracy(model, tokenizer, task, reqs, stop=stop, batch_size=batch_size, limit=limit,
                                    num_fewshot=int(num_fewshot), cot_delimiter=cot_delimiter,
                                    do_normalization=do_normalization, truncated=truncated)
    scores, _ = score_requests(model, [(r.context, r.answer) for r in reqs], batch_size=batch_size,
                               max_seq_len=limit)
    per: dict[int, list[tuple[float, int, bool]]] = {i: [] for i in indices}
    for r, sc in zip(reqs, scores):
        per[r.index].append(sc)
    details, correct, correct_norm = [], 0, 0
    for i in indices:
        sc = per[i]
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
    n = len(indices)
    return ICLResult(task=task.name, task_type=t, num_fewshot=int(num_fewshot), examples=n,
                     accuracy=correct / n if n else 0.0,
                     accuracy_norm=((correct_norm / n if n else 0.0) if t in CHOICE_TYPES else None),
                     truncated=truncated, details=details)


def _generation_accuracy(model, tokenizer, task: ICLTask, reqs: list[ICLRequest], *, stop, batch_size: int,
                         limit: int, num_fewshot: int, cot_delimiter: str, do_normalization: bool,
                         truncated: int) -> ICLResult:
    """Greedy generation after each prompt (mptkit.infer's batched generator: a cache slot per prompt, no
    padding) for llm-foundry's budget, cut at the first stop string, scored by llm-foundry's exact match."""
    from mptkit.infer.generate import Generator
    from mptkit.infer.sampling import SamplingParams

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(x, str) or not x for x in stops):
        raise EvalError(f"--stop {stop!r}: stop strings must be non-empty")
    new = max(generation_budget(task, tokenizer, cot_delimiter), 1)
    prompts = [r.context for r in reqs]
    if prompts:
        check_token_ids([t for p in prompts for t in (min(p), max(p))], model.config.vocab_size, "ICL prompts")
    gen = Generator(model, tokenizer, max_context=limit)
    params = SamplingParams(max_tokens=new, temperature=0.0, stop=stops)
    outputs: list[str] = []
    for s in range(0, len(prompts), int(batch_size)):
        outputs += [o.text for o in gen.generate(prompts[s : s + int(batch_size)], params)]
    details, correct = [], 0
    empty_label = False
    for r, out in zip(reqs, outputs):
        rec = task.examples[r.index]
        labels = [rec["answer"], *rec.get("aliases", [])]
        if do_normalization and any(not normalize_answer(x) for x in labels):
            empty_label = True
        ok = generation_correct(out, labels, cot_delimiter=cot_delimiter, do_normalization=do_normalization)
        correct += ok
        details.append({"index": r.index, "correct": ok, "output": out})
    if empty_label:
        log.warning("%s: an answer or alias normalizes to nothing (e.g. 'The'): any output matches it, as in "
                    "llm-foundry", task.name)
    n = len(reqs)
    return ICLResult(task=task.name, task_type=task.task_type, num_fewshot=num_fewshot, examples=n,
                     accuracy=correct / n if n else 0.0, truncated=truncated, details=details)
