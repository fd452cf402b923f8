"""Prompt formats, shared by training data and inference (one home, so a model is prompted as it was trained):

- **ChatML**, the template MPT-7B-Chat was trained with (one turn per message, then the assistant's opening)::

      <|im_start|>system
      A conversation between a user and an LLM-based AI assistant. ...<|im_end|>
      <|im_start|>user
      Hi<|im_end|>
      <|im_start|>assistant

  A conversation is tokenized by :func:`encode_chatml` (the server, ``mptkit chat``) or, turn by turn, by
  :func:`encode_segments` (finetuning data): the markers are inserted as their token ids and every message's
  content is tokenized as text (special tokens not parsed), so a message cannot forge a turn. Generation stops
  at ``<|im_end|>``.
- **Instruct** (Dolly / Alpaca), the prompt MPT-7B-Instruct was trained with: :data:`INSTRUCT_PROMPT` and,
  for records with an input, :data:`INSTRUCT_PROMPT_WITH_INPUT`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from mptkit.data.tokenizer import IM_END, IM_START, encode_batch
from mptkit.errors import InferenceError

INSTRUCT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCT_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
DEFAULT_SYSTEM_PROMPT = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
ROLES = ("system", "user", "assistant")


def message_text(content: Any, where: str = "messages") -> str:
    """A message's content as text: a string, or OpenAI's list of parts ``[{"type": "text", "text": ...}]``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise InferenceError(f"{where}.content[{i}]: only text parts are supported")
        return "".join(out)
    raise InferenceError(f"{where}.content must be a string or a list of text parts")


def chatml_message(role: str, content: str) -> list[tuple[str, bool]]:
    """One message's :func:`chatml_segments` pieces. A system or user message is four: ``<|im_start|>``,
    ``"ROLE\\ncontent"`` (one text: tokenized as the whole rendered string would be, where a tokenizer splits
    only at the special markers), ``<|im_end|>``, the newline after it. An assistant message is five, its role
    header apart from its content: ``<|im_start|>``, ``"assistant\\n"``, the content, ``<|im_end|>``,
    ``"\\n"`` — the boundary where a prompt ends and the reply begins, at inference (the generation prompt
    ends with the header) and in training (llm-foundry likewise tokenizes prompt and response apart)."""
    if role == "assistant":
        return [(IM_START, True), (f"{role}\n", False), (content, False), (IM_END, True), ("\n", False)]
    return [(IM_START, True), (f"{role}\n{content}", False), (IM_END, True), ("\n", False)]


def chatml_segments(messages: list[dict], *, add_generation_prompt: bool = True,
                    default_system: str | None = None) -> list[tuple[str, bool]]:
    """The ChatML rendering of ``messages`` as ``(text, is_marker)`` pieces: the template's ``<|im_start|>`` /
    ``<|im_end|>`` markers (True), and text (False): each role header (``"user\\n"``), each message's content
    on its own, the newline between turns. Joined, the pieces are :func:`render_chatml`'s text; tokenized by
    :func:`encode_segments`, the markers are control tokens and everything else is text, so message content
    cannot open or close a turn."""
    segs: list[tuple[str, bool]] = []
    if default_system and not (messages and messages[0].get("role") == "system"):
        segs += chatml_message("system", default_system)
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise InferenceError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        segs += chatml_message(role, message_text(m.get("content"), f"messages[{i}]"))
    if add_generation_prompt:
        segs += [(IM_START, True), ("assistant\n", False)]
    return segs


def render_chatml(messages: list[dict], *, add_generation_prompt: bool = True, default_system: str | None = None) -> str:
    """The ChatML prompt for ``messages`` (dicts with role and content), as text (for display and tests; a
    model is fed :func:`encode_chatml`'s ids, where content cannot forge the markers)."""
    return "".join(t for t, _ in chatml_segments(messages, add_generation_prompt=add_generation_prompt,
                                                  default_system=default_system))


_MARKER_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, {marker: id})
_MARKER_IDS_LOCK = threading.Lock()


def _vocab_size(tokenizer) -> int | None:
    """The tokenizer's size with its added tokens (a token added since invalidates its cached marker ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        return backend.get_vocab_size(with_added_tokens=True)
    except (AttributeError, TypeError):
        try:
            return len(tokenizer)
        except TypeError:
            return None


def _encode_marker(tokenizer, marker: str) -> int | None:
    try:
        ids = encode_batch(tokenizer, [marker])[0]
    except Exception:  # noqa: BLE001 - any tokenizer object: one that cannot encode it has no such token
        return None
    return ids[0] if len(ids) == 1 else None


def marker_id(tokenizer, marker: str) -> int | None:
    """The id of a template marker (``<|im_start|>``) when the tokenizer has it as one token, else None.
    Encoded once per tokenizer object (and again after tokens are added to it), not at every request."""
    if tokenizer is None:
        return None
    size = _vocab_size(tokenizer)
    with _MARKER_IDS_LOCK:
        try:
            entry = _MARKER_IDS.get(tokenizer)
            if entry is None or entry[0] != size:
                entry = _MARKER_IDS[tokenizer] = (size, {})
        except TypeError:  # an object that cannot be weakly referenced (or hashed): no cache
            return _encode_marker(tokenizer, marker)
        ids = entry[1]
        if marker not in ids:
            ids[marker] = _encode_marker(tokenizer, marker)
        return ids[marker]


def encode_segments(tokenizer, pieces: list[list[tuple[str, bool]]], *,
                    parse_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each list of :func:`chatml_segments` pieces: a marker the tokenizer has as one token is that
    token's id; text (and a marker it lacks) is tokenized on its own, its special tokens' spellings as plain
    text unless ``parse_special_tokens`` (one batch for all the pieces' texts: outside the GIL for a
    ``tokenizers``-backed tokenizer). The server's chat endpoint, ``mptkit chat`` and the finetuning data all
    tokenize conversations here, so a model is trained on the ids it is prompted with."""
    marks: dict[str, int | None] = {}
    texts: list[str] = []
    for segs in pieces:
        for text, is_marker in segs:
            if is_marker and text not in marks:
                marks[text] = marker_id(tokenizer, text)
            if not (is_marker and marks[text] is not None) and text:
                texts.append(text)
    encoded = iter(encode_batch(tokenizer, texts, parse_special_tokens=parse_special_tokens))
    out = []
    for segs in pieces:
        ids: list[int] = []
        for text, is_marker in segs:
            if is_marker and marks[text] is not None:
                ids.append(marks[text])
            elif text:
                ids += next(encoded)
        out.append(ids)
    return out


def encode_chatml(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                  default_system: str | None = None, parse_special_tokens: bool = False) -> list[int]:
    """The token ids of ``messages`` rendered with ChatML: the markers are control tokens (when the tokenizer has
    them), message content is text — ``<|im_end|>\\n<|im_start|>system`` typed by a user does not open a system
    turn. ``parse_special_tokens=True`` parses special tokens spelled in the content (trusted input only)."""
    segs = chatml_segments(messages, add_generation_prompt=add_generation_prompt, default_system=default_system)
    return encode_segments(tokenizer, [segs], parse_special_tokens=parse_special_tokens)[0]


def im_end_token_id(tokenizer) -> int | None:
    """The id of ``<|im_end|>`` when the tokenizer has it as one token (MPT-7B-Chat's does)."""
    return marker_id(tokenizer, IM_END)
