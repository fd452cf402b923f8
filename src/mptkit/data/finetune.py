"""Finetuning data: instruction and chat examples -> fixed-length token samples with loss masks.

The formats (one JSON object per example; JSONL, a JSON array, CSV, Parquet, Arrow or a ``datasets``
``save_to_disk`` folder):

* ``{"prompt": ..., "response": ...}`` — llm-foundry's finetuning format (MPT-7B-Instruct style data);
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` — a conversation, rendered
  with the ChatML template MPT-7B-Chat was trained with and tokenized by :mod:`mptkit.prompts`'
  ``encode_segments`` (the markers as control tokens, message content as text: a message spelling
  ``<|im_end|>`` stays text), so `mptkit chat` and the server prompt a finetuned model with exactly the
  ids it was trained on;
* ``{"instruction": ..., "input"/"context": ..., "output"/"response": ...}`` (Alpaca / Dolly records) —
  formatted with the Dolly prompt MPT-7B-Instruct used (:data:`INSTRUCT_PROMPT`).

Each example becomes turns ``(prompt_text, response_text)``; every piece is tokenized on its own and the
pieces are concatenated (llm-foundry's way: a response's tokens do not depend on its prompt). Labels are
the token ids where the loss applies and -100 elsewhere: ``target_responses`` ``last`` (default) or ``all``
assistant responses, ``target_prompts`` ``none`` (default), ``all`` or ``length>=N``. The final response
ends with the tokenizer's EOS token (prompt/response and instruction examples; a chat turn ends with
``<|im_end|>``), so the model learns to stop.

Too long: an example whose first trained token lies past ``max_seq_len`` (its prompt fills the window) is
dropped and counted; otherwise the end is cut at ``max_seq_len`` and counted as truncated. Bad records
(malformed JSON, missing or non-string fields, unknown roles) are reported with file and line, skipped and
counted, or raise with ``strict``. Samples are right-padded to ``max_seq_len`` (causal attention: padding
after a sequence never changes it) with labels -100; ``packing_ratio`` > 1 or ``auto`` packs several
examples per sample (first-fit decreasing, nothing dropped) with a ``sequence_id`` per example, which the
model uses to keep examples apart when its ``attn_uses_sequence_id`` is set.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mptkit.data.corpus import (
    ARROW_SUFFIXES,
    CSV_SUFFIXES,
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    Issues,
    _hf_dataset_arrow_files,
    _is_hf_datasets_dir,
    iter_csv_rows,
    iter_json_records,
    iter_jsonl_records,
    open_table,
    source_kind,
)
from mptkit.data.tokenizer import encode_batch
from mptkit.errors import DataError
from mptkit.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    INSTRUCT_PROMPT,
    INSTRUCT_PROMPT_WITH_INPUT,
    ROLES,
    chatml_message,
    encode_segments,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_SUFFIXES = JSONL_SUFFIXES | JSON_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES | ARROW_SUFFIXES
_TARGET_PROMPTS = re.compile(r"^(none|all|length>=\s*(\d+))$")


@dataclass
class FinetuneOptions:
    """How examples become samples (llm-foundry's key names)."""

    max_seq_len: int
    target_prompts: str = "none"  # none | all | length>=N
    target_responses: str = "last"  # last | all
    packing_ratio: float | str | None = None  # None / 1 = one example per sample; > 1 or "auto" = pack
    allow_pad_trimming: bool = False  # batches cut to their longest sample (fewer padded positions computed)
    append_eos: bool = True  # end the final response of prompt/response examples with EOS
    strict: bool = False  # the first bad record raises instead of being skipped and counted
    preprocessing_fn: str | Callable[[dict], dict] | None = None  # "module:function": record -> example
    # chat examples without a system message get this one ("default" = the one `mptkit chat` and the server
    # add, so training and inference see the same prompt; None or "" = none)
    system_prompt: str | None = "default"
    # the id that ends the final response with append_eos (and pads when the tokenizer has no pad token);
    # None = the tokenizer's eos_token_id
    eos_token_id: int | None = None

    def __post_init__(self):
        if int(self.max_seq_len) < 2:
            raise DataError(f"finetuning: max_seq_len must be >= 2, got {self.max_seq_len}")
        if not _TARGET_PROMPTS.match(str(self.target_prompts).strip()):
            raise DataError(f"finetuning: target_prompts must be none, all or length>=N, got {self.target_prompts!r}")
        if self.target_responses not in ("last", "all"):
            raise DataError(f"finetuning: target_responses must be last or all, got {self.target_responses!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool) or not isinstance(
                self.eos_token_id, int) or self.eos_token_id < 0):
            raise DataError(f"finetuning: eos_token_id must be a token id (an integer >= 0), got {self.eos_token_id!r}")
        pr = self.packing_ratio
        if pr is not None and pr != "auto":
            try:
                val = float(pr)
            except (TypeError, ValueError):
                raise DataError(f"finetuning: packing_ratio must be a number >= 1 or 'auto', got {pr!r}") from None
            if val < 1.0:
                raise DataError(f"finetuning: packing_ratio must be >= 1 (or 'auto'), got {pr!r}")

    @property
    def packing(self) -> bool:
        return self.packing_ratio == "auto" or (self.packing_ratio is not None and float(self.packing_ratio) > 1.0)

    def prompt_is_target(self, n_tokens: int) -> bool:
        m = _TARGET_PROMPTS.match(str(self.target_prompts).strip())
        if m.group(1) == "none":
            return False
        if m.group(1) == "all":
            return True
        return n_tokens >= int(m.group(2))


# ----------------------------------------------------------------------------------------- records


def data_files(path: str | Path | list, split: str | None) -> list[Path]:
    """The files holding ``split`` of a local dataset: a file (the split is the file), a folder with files
    or sub-folders named after splits (``train.jsonl``, ``test-00000.parquet``, ``train/``), a
    ``datasets.save_to_disk`` folder, or a list of these."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise DataError("finetuning data: an empty list of files")
        return [f for p in path for f in data_files(p, split)]
    p = Path(path).expanduser()
    if not p.exists():
        hub = "/" in str(path) and not str(path).startswith((".", "/", "~"))
        raise DataError(f"finetuning data {path}: no such file or folder" + (
            " (a hub dataset name? mptkit reads local files only: download it first, e.g. `huggingface-cli "
            "download NAME --repo-type dataset --local-dir DIR`, and point hf_name at DIR)" if hub else ""))
    if p.is_file():
        return [p]
    if _is_hf_datasets_dir(p):
        return _hf_dataset_arrow_files(p, split)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataError(f"finetuning data {p}: the folder holds no {'/'.join(sorted(DATA_SUFFIXES))} files")
    if split:
        def in_split(f: Path) -> bool:
            rel = f.relative_to(p).parts
            return rel[0] == split or (len(rel) == 1 and re.match(rf"^{re.escape(split)}([-_.].*)?$", f.stem) is not None)

        chosen = [f for f in files if in_split(f)]
        if chosen:
            return chosen
        names = ", ".join(str(f.relative_to(p)) for f in files[:8])
        if split != "train":
            raise DataError(f"finetuning data {p}: no files for split {split!r} (expected {split}.jsonl, "
                            f"{split}-*.parquet or a {split}/ folder; found {names})")
        # no file is named after the train split: every file that is not another split's is training data
        held_out = {"test", "val", "valid", "validation", "eval", "dev"}
        rest = [f for f in files if not any(
            f.relative_to(p).parts[0] == h or re.match(rf"^{h}([-_.].*)?$", f.stem) for h in held_out)]
        if not rest:
            raise DataError(f"finetuning data {p}: no training files (found only held-out splits: {names})")
        if len(rest) < len(files):
            log.info("finetuning data %s: split 'train' = %s (files named after test/val splits left out)", p,
                     ", ".join(str(f.relative_to(p)) for f in rest[:8]))
        return rest
    return files


def _records_jsonl(path: Path, issues: Issues) -> Iterator[tuple[str, Any]]:
    for lineno, rec in iter_jsonl_records(path, issues):
        yield f"{path}:{lineno}", rec


def _records_json(path: Path, issues: Issues) -> Iterator[tuple[str, Any]]:
    for _, where, rec in iter_json_records(path, issues):
        yield where, rec


def _records_csv(path: Path, issues: Issues) -> Iterator[tuple[str, Any]]:
    for lineno, row in iter_csv_rows(path, issues):
        yield f"{path}:{lineno}", dict(row)


def _records_table(path: Path, kind: str, issues: Issues) -> Iterator[tuple[str, Any]]:
    try:
        _, batches = open_table(path, kind)
        rows = [rec for b in batches for rec in b.to_pylist()]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError subclasses
        issues.report("unreadable_file", str(path), f"cannot read as {kind} ({e}); file skipped")
        return
    for row, rec in enumerate(rows):
        yield f"{path}:row {row}", rec


def iter_records(path: Path, issues: Issues) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of one file; unreadable parts reported to ``issues``."""
    kind = source_kind(path)
    try:
        if kind == "jsonl":
            yield from _records_jsonl(path, issues)
        elif kind == "json":
            yield from _records_json(path, issues)
        elif kind == "csv":
            yield from _records_csv(path, issues)
        elif kind in ("parquet", "arrow"):
            yield from _records_table(path, kind, issues)
        else:
            issues.report("unsupported_file", str(path), "not JSONL/JSON/CSV/Parquet/Arrow; file skipped")
    except OSError as e:
        issues.report("unreadable_file", str(path), f"cannot read ({e.strerror or e})")


# ----------------------------------------------------------------------------------------- built-in data

BUILTIN_DATASETS = ("mptkit:stdlib-instruct", "mptkit:stdlib-chat")


@functools.lru_cache(maxsize=1)
def _stdlib_functions() -> tuple[tuple[str, str, str, str], ...]:
    """(module, name, arguments, summary) of the public top-level functions with a docstring in the running
    interpreter's standard library (top-level modules), in a fixed order."""
    import ast

    from mptkit.data.corpus import stdlib_root

    out = []
    for f in sorted(stdlib_root().glob("*.py")):
        if f.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            summary = " ".join(summary.split())
            if not summary or len(summary) > 160:
                continue
            out.append((f.stem, node.name, ast.unparse(node.args), summary))
    return tuple(out)


def builtin_records(name: str, split: str | None) -> list[tuple[str, dict]]:
    """A small offline dataset made from the standard library's documented functions (1 in 20 held out as
    ``test``): ``mptkit:stdlib-instruct`` asks for a function's ``def`` line from its docstring summary
    (Alpaca-style records); ``mptkit:stdlib-chat`` is a two-turn conversation about a function (what does it
    do, how is it called). Enough to run the Instruct and Chat recipes end to end on the quickstart model."""
    import zlib

    if name not in BUILTIN_DATASETS:
        raise DataError(f"finetuning data {name}: unknown built-in dataset (known: {', '.join(BUILTIN_DATASETS)})")
    want_test = split in ("test", "val", "validation")
    recs = []
    for mod, fn, args, summary in _stdlib_functions():
        if (zlib.crc32(f"{mod}.{fn}".encode()) % 20 == 0) != want_test:
            continue
        where = f"{name}:{mod}.{fn}"
        if name.endswith("instruct"):
            recs.append((where, {"instruction": f"Write the def line of a Python function that does this: {summary}",
                                 "output": f"def {fn}({args}):"}))
        else:
            recs.append((where, {"messages": [
                {"role": "user", "content": f"What does {mod}.{fn} do?"},
                {"role": "assistant", "content": summary},
                {"role": "user", "content": "How do I call it?"},
                {"role": "assistant", "content": f"{mod}.{fn}({args})"}]}))
    return recs


# ----------------------------------------------------------------------------------------- formats


class BadRecord(ValueError):
    """A record that is not a usable example; the message says why (kind, text)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _text(rec: dict, key: str, *, required: bool = True) -> str:
    v = rec.get(key)
    if v is None:
        if required:
            raise BadRecord("missing_field", f"no field {key!r} (found {sorted(rec)[:8]})")
        return ""
    if not isinstance(v, str):
        raise BadRecord("non_string_field", f"field {key!r} is {type(v).__name__}, expected a string")
    return v


def chat_turns(messages: Any, system_prompt: str | None = None) -> list[tuple[list, list]]:
    """ChatML turns of a conversation, as :func:`mptkit.prompts.chatml_segments` pieces: each assistant
    message is a response (its content and ``<|im_end|>``), everything before it (since the previous
    response) its prompt, ending with ``<|im_start|>assistant\\n``. ``system_prompt`` opens a conversation
    that has no system message. The pieces joined are ``render_chatml``'s text, and tokenized
    (``encode_segments``) they are the ids the server and ``mptkit chat`` prompt with: message content is
    text, the markers are control tokens."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad_messages", "'messages' must be a non-empty list of {role, content} objects")
    turns: list[tuple[list, list]] = []
    pending: list = []
    if system_prompt and not (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        pending = chatml_message("system", system_prompt)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord("bad_messages", f"messages[{i}] is {type(m).__name__}, expected an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord("bad_role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise BadRecord("bad_role", f"messages[{i}]: a system message may only come first")
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRecord("non_string_field", f"messages[{i}].content is {type(content).__name__}, expected a string")
        segs = chatml_message(role, content)  # an assistant's: marker, header, content, marker, newline
        if role == "assistant":
            turns.append((pending + segs[:2], segs[2:4]))
            pending = segs[4:]  # the newline after the reply's <|im_end|> opens the next prompt
        else:
            pending += segs
    if not turns:
        raise BadRecord("no_response", "the conversation has no assistant message to learn from")
    return turns


_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


def chat_template_renderer(tokenizer) -> Callable[..., str] | None:
    """``render(messages, add_generation_prompt)`` with the tokenizer's own ``chat_template``, or None when it
    has none or its template renders ChatML exactly as :mod:`mptkit.prompts` does (then conversations keep
    mptkit's ChatML path: content as text, the markers as control tokens; ChatML is the default)."""
    from mptkit.prompts import render_chatml

    if not getattr(tokenizer, "chat_template", None) or not callable(getattr(tokenizer, "apply_chat_template", None)):
        return None

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        if render(_PROBE) == render_chatml(_PROBE, add_generation_prompt=False) and render(
                _PROBE[:2], True) == render_chatml(_PROBE[:2]):
            return None
    except Exception as e:  # noqa: BLE001 - a template that cannot render a plain conversation
        try:  # templates that refuse a system role (Mistral's, Gemma's) render user/assistant turns
            render(_PROBE[1:])
        except Exception:  # noqa: BLE001
            raise DataError(f"the tokenizer's chat_template cannot render a system/user/assistant conversation "
                            f"({type(e).__name__}: {e})") from None
    return render


def template_chat_turns(messages: Any, render: Callable[..., str],
                        system_prompt: str | None = None) -> list[tuple[str, str]]:
    """Turns of a conversation rendered with a tokenizer's own chat template: each assistant message's
    response is what the template adds for it (its content and the template's end-of-turn text), its prompt
    what the template renders before it since the previous response, through the generation prompt. The
    pieces are texts tokenized as the tokenizer reads the rendered conversation (the template's markers are
    its special tokens), as llm-foundry tokenizes templated chat."""
    chat_turns(messages)  # the same checks of roles and contents (raises BadRecord)
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    turns: list[tuple[str, str]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            prompt, full = render(msgs[:i], True), render(msgs[:i + 1], False)
        except Exception as e:  # noqa: BLE001 - the template's own errors (e.g. role order it refuses)
            raise BadRecord("chat_template", f"the tokenizer's chat_template failed: {type(e).__name__}: {e}") from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise BadRecord("chat_template", "the tokenizer's chat_template does not render the conversation turn by "
                                             "turn (a longer conversation changes the text before it)")
        turns.append((prompt[len(done):], full[len(prompt):]))
        done = full
    return turns


def example_turns(rec: Any, preprocess: Callable[[dict], Any] | None = None,
                  system_prompt: str | None = None,
                  render: Callable[..., str] | None = None) -> tuple[list[tuple[Any, Any]], bool]:
    """``(turns, is_chat)`` of one record, in any of the module's formats (conversations with ``render``, a
    tokenizer's chat template: :func:`chat_template_renderer`, when given)."""
    if preprocess is not None:
        try:
            rec = preprocess(rec)
        except BadRecord:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: report, do not crash on one record
            raise BadRecord("preprocessing_failed", f"preprocessing_fn failed: {type(e).__name__}: {e}") from None
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"the record is {type(rec).__name__}, expected a JSON object")
    if "messages" in rec:
        if render is not None:
            return template_chat_turns(rec["messages"], render, system_prompt), True
        return chat_turns(rec["messages"], system_prompt), True
    if "instruction" in rec:
        instruction = _text(rec, "instruction")
        ctx = _text(rec, "input", required=False) or _text(rec, "context", required=False)
        out = _text(rec, "output") if "output" in rec else _text(rec, "response")
        prompt = (INSTRUCT_PROMPT_WITH_INPUT.format(instruction=instruction, input=ctx) if ctx.strip()
                  else INSTRUCT_PROMPT.format(instruction=instruction))
        return [(prompt, out)], False
    if "prompt" in rec or "response" in rec:
        return [(_text(rec, "prompt"), _text(rec, "response"))], False
    raise BadRecord("unknown_format", "expected {prompt, response}, {messages: [...]} or {instruction, output} "
                                      f"(found keys {sorted(rec)[:8]})")


def load_preprocessing_fn(spec: str | Callable | None) -> Callable[[dict], Any] | None:
    """``"package.module:function"`` -> the function (llm-foundry's ``preprocessing_fn``)."""
    if spec is None or callable(spec):
        return spec
    mod, _, fn = str(spec).partition(":")
    if not mod or not fn:
        raise DataError(f"finetuning: preprocessing_fn must be 'module:function', got {spec!r}")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise DataError(f"finetuning: preprocessing_fn {spec!r} cannot be loaded ({e})") from None
    if not callable(f):
        raise DataError(f"finetuning: preprocessing_fn {spec!r} is not callable")
    return f


# ----------------------------------------------------------------------------------------- tokens


@dataclass
class FinetuneStats:
    records: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    target_tokens: int = 0
    tokens: int = 0
    samples: int = 0
    bad: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tokenize_example(turns: list[tuple[list[int], list[int]]], opts: FinetuneOptions) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of one example from its tokenized turns, cut at max_seq_len; None when no trained
    token would be left in the window."""
    ids: list[int] = []
    labels: list[int] = []
    last = len(turns) - 1
    for t, (p, r) in enumerate(turns):
        ids += p
        labels += p if opts.prompt_is_target(len(p)) else [IGNORE_INDEX] * len(p)
        ids += r
        labels += r if (opts.target_responses == "all" or t == last) else [IGNORE_INDEX] * len(r)
    T = int(opts.max_seq_len)
    ids, labels = ids[:T], labels[:T]
    # the loss at position i predicts token i+1 from tokens <= i: at least one labelled token after the first
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        return None
    return ids, labels


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, first-fit decreasing (ties by index: deterministic); every example lands.

    Each example goes to the lowest-numbered bin with room for it, found in O(log n) with a max-tree over
    the bins' free room (a linear scan of the bins is quadratic: minutes at 10^5-10^6 examples)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [capacity] * (2 * size)  # leaves: free room of bin b (an unused bin has the whole capacity)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"pack_first_fit: an item of {n} does not fit a bin of {capacity}")
        node = 1
        while node < size:  # leftmost leaf with room >= n
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    for b in bins:
        b.sort()
    return bins


class FinetuneDataset:
    """Fixed-length samples: ``input_ids``, ``labels`` (-100 = no loss) and, when packed, ``sequence_id``
    (T,) LongTensors, and ``num_tokens`` (the sample's non-padding length, what llm-foundry counts as its
    tokens); ``collate`` stacks them (and cuts trailing padding with ``allow_pad_trimming``)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], opts: FinetuneOptions, pad_id: int,
                 stats: FinetuneStats | None = None):
        self.opts = opts
        self.pad_id = int(pad_id)
        self.stats = stats or FinetuneStats()
        T = int(opts.max_seq_len)
        bins = pack_first_fit([len(e[0]) for e in examples], T) if opts.packing else [[i] for i in range(len(examples))]
        n = len(bins)
        # int32 storage (half of int64's memory for a large dataset); items are handed out as int64
        self.input_ids = torch.full((n, T), self.pad_id, dtype=torch.int32)
        self.labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.int32)
        self.sequence_id = torch.full((n, T), -1, dtype=torch.int32) if opts.packing else None
        self.lengths = torch.zeros(n, dtype=torch.long)
        for s, b in enumerate(bins):
            at = 0
            for j, i in enumerate(b):
                ids, lab = examples[i]
                self.input_ids[s, at:at + len(ids)] = torch.tensor(ids, dtype=torch.int32)
                self.labels[s, at:at + len(ids)] = torch.tensor(lab, dtype=torch.int32)
                if j:  # an example's first token is never a target (alone, nothing precedes it)
                    self.labels[s, at] = IGNORE_INDEX
                if self.sequence_id is not None:
                    self.sequence_id[s, at:at + len(ids)] = j
                at += len(ids)
            if self.sequence_id is not None:
                self.sequence_id[s, at:] = len(b)  # padding: a sequence of its own
            self.lengths[s] = at
        self.stats.samples = n
        self.stats.examples = len(examples)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def token_count(self) -> int:
        """Non-padding tokens over all samples (the trainer converts ``tok`` durations with it)."""
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> dict:
        d = {"input_ids": self.input_ids[i].long(), "labels": self.labels[i].long(), "num_tokens": self.lengths[i]}
        if self.sequence_id is not None:
            d["sequence_id"] = self.sequence_id[i].long()
        return d

    def collate(self, items: list[dict]) -> dict:
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if self.opts.allow_pad_trimming:
            real = (out["labels"] != IGNORE_INDEX) | (out["input_ids"] != self.pad_id)
            cols = torch.nonzero(real.any(0)).flatten()
            keep = int(cols[-1]) + 1 if len(cols) else 1
            keep = min(out["input_ids"].shape[1], -(-keep // 8) * 8)  # a multiple of 8: fewer distinct shapes
            out = {k: (v[:, :keep] if v.dim() == 2 else v) for k, v in out.items()}
        return out


def _encode_pieces(tokenizer, pieces: list[str | list]) -> list[list[int]]:
    """Ids of each piece: a text (prompt/response and instruction formats) as the tokenizer reads it; a chat
    turn's ChatML pieces through ``encode_segments`` (content as text, markers as control tokens)."""
    texts = [i for i, p in enumerate(pieces) if isinstance(p, str)]
    chats = [i for i, p in enumerate(pieces) if not isinstance(p, str)]
    out: list[list[int]] = [[] for _ in pieces]
    for i, ids in zip(texts, encode_batch(tokenizer, [pieces[i] for i in texts])):
        out[i] = ids
    for i, ids in zip(chats, encode_segments(tokenizer, [pieces[i] for i in chats])):
        out[i] = ids
    return out


def build_finetune_dataset(path: str | Path | list, tokenizer, opts: FinetuneOptions, *, split: str | None = "train",
                           where: str = "train_loader.dataset") -> FinetuneDataset:
    """Read, format, tokenize and lay out a finetuning dataset; raises :class:`DataError` naming the file
    and line of the first bad record with ``strict``, or when nothing usable is left."""
    issues = Issues(strict=opts.strict)
    preprocess = load_preprocessing_fn(opts.preprocessing_fn)
    system = opts.system_prompt
    if system == "default":
        system = DEFAULT_SYSTEM_PROMPT
    stats = FinetuneStats()
    render = chat_template_renderer(tokenizer)
    if render is not None:
        log.info("finetuning data %s: conversations are rendered with the tokenizer's own chat_template", path)
    texts: list[str | list] = []  # prompt/response texts, or a chat turn's ChatML pieces
    layout: list[tuple[int, int, bool]] = []  # per example: first text index, number of turns, is_chat
    if isinstance(path, str) and path.startswith("mptkit:"):
        sources = [builtin_records(path, split)]
    else:
        sources = [iter_records(f, issues) for f in data_files(path, split)]
    for src in sources:
        for at, rec in src:
            stats.records += 1
            try:
                turns, is_chat = example_turns(rec, preprocess, system, render)
            except BadRecord as e:
                issues.report(e.kind, at, str(e))
                continue
            layout.append((len(texts), len(turns), is_chat))
            for p, r in turns:
                texts += [p, r]
    eos = opts.eos_token_id if opts.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if opts.eos_token_id is not None and opts.eos_token_id >= len(tokenizer):
        raise DataError(f"{where}.eos_token_id: {opts.eos_token_id} is not an id of the tokenizer "
                        f"({len(tokenizer)} tokens)")
    encoded = _encode_pieces(tokenizer, texts)
    examples = []
    for start, nt, is_chat in layout:
        turns = [(encoded[start + 2 * t], encoded[start + 2 * t + 1]) for t in range(nt)]
        if opts.append_eos and not is_chat and eos is not None and (not turns[-1][1] or turns[-1][1][-1] != eos):
            turns[-1] = (turns[-1][0], turns[-1][1] + [int(eos)])
        full = sum(len(p) + len(r) for p, r in turns)
        ex = tokenize_example(turns, opts)
        if ex is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += full > opts.max_seq_len
        stats.tokens += len(ex[0])
        stats.target_tokens += sum(lab != IGNORE_INDEX for lab in ex[1][1:])
        examples.append(ex)
    stats.bad = issues.as_dict()
    if not examples:
        raise DataError(
            f"{where}: {path} gives no usable finetuning example ({stats.records} records read, "
            f"{issues.total} bad, {stats.dropped_too_long} with no trained token inside max_seq_len="
            f"{opts.max_seq_len})" + (f"; first problem: {issues.examples[0]}" if issues.examples else ""))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    ds = FinetuneDataset(examples, opts, pad if pad is not None else 0, stats)
    log.info("finetuning data %s (%s): %d examples -> %d samples of %d tokens (%.1f examples per sample), "
             "%d target tokens; %d truncated, %d dropped (prompt fills max_seq_len), %d bad records",
             path, split, stats.examples, stats.samples, opts.max_seq_len, stats.examples / max(1, stats.samples),
             stats.target_tokens, stats.truncated, stats.dropped_too_long, issues.total)
    return ds
