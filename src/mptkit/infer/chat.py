"""Chat: the ChatML template MPT-7B-Chat was trained with, and history trimming to the context window.

Template (one turn per message, then the assistant's opening)::

    <|im_start|>system
    A conversation between a user and an LLM-based AI assistant. ...<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

Generation stops at ``<|im_end|>`` (as a stop string, and as a stop token when the tokenizer has it).

A conversation is tokenized by :func:`encode_chatml`: the markers are inserted as their token ids and every
message's content is tokenized as text (special tokens not parsed), so a message cannot forge a turn.
"""

from __future__ import annotations

from typing import Any

from mptkit.data.tokenizer import encode_batch
from mptkit.errors import InferenceError
from mptkit.infer.generate import reusable_prefix

DEFAULT_SYSTEM_PROMPT = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
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
    """One message's :func:`chatml_segments` pieces, always these five: ``<|im_start|>``, the role header
    ``"ROLE\\n"``, the content, ``<|im_end|>``, the newline after it."""
    return [(IM_START, True), (f"{role}\n", False), (content, False), (IM_END, True), ("\n", False)]


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


def marker_id(tokenizer, marker: str) -> int | None:
    """The id of a template marker (``<|im_start|>``) when the tokenizer has it as one token, else None."""
    if tokenizer is None:
        return None
    try:
        ids = encode_batch(tokenizer, [marker])[0]
    except Exception:  # noqa: BLE001 - any tokenizer object: one that cannot encode it has no such token
        return None
    return ids[0] if len(ids) == 1 else None


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


def trim_history(messages: list[dict], count_tokens, budget: int) -> list[dict]:
    """Drop the oldest non-system turns until ``count_tokens(render(messages)) <= budget``.

    The system message and the last message are always kept; if even those do not fit, raise."""
    msgs = list(messages)
    while count_tokens(msgs) > budget:
        first = 1 if msgs and msgs[0].get("role") == "system" else 0
        if len(msgs) - first <= 1:
            raise InferenceError(
                f"the conversation needs {count_tokens(msgs)} tokens but only {budget} fit in the context "
                "window (after room for the reply); shorten the message or the system prompt"
            )
        del msgs[first]
        # do not start the kept history with an assistant turn
        while len(msgs) - first > 1 and msgs[first].get("role") == "assistant":
            del msgs[first]
    return msgs


class ChatSession:
    """A conversation with a :class:`~mptkit.infer.generate.Generator` (the ``mptkit chat`` REPL's state).

    One KV cache lives across turns: each turn's prompt (the whole conversation) shares its start with what the
    cache holds — the previous prompt and reply — so only the new part is prefilled (``last_cached`` tokens
    were not). Once old turns are trimmed to fit the context the start changes and the prompt is prefilled
    whole."""

    def __init__(self, generator, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, params=None):
        from mptkit.infer.sampling import SamplingParams

        self.gen = generator
        self.system_prompt = system_prompt
        self.params = params or SamplingParams(max_tokens=256, temperature=0.7, top_p=0.95)
        self.history: list[dict] = []
        self._cache = None
        self._held: list[int] = []  # tokens whose keys/values the cache holds
        self.last_cached = 0  # prompt tokens of the last turn that were not prefilled

    def messages(self) -> list[dict]:
        sys_msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys_msgs + self.history

    def prompt_ids(self) -> list[int]:
        tok = self.gen.tokenizer
        budget = self.gen.max_context - max(1, min(self.params.max_tokens, self.gen.max_context // 2))

        def count(msgs):
            return len(encode_chatml(tok, msgs))

        msgs = trim_history(self.messages(), count, budget)
        kept = len(msgs) - (1 if self.system_prompt else 0)
        self.history = self.history[len(self.history) - kept :]
        return encode_chatml(tok, msgs)

    def send(self, user_text: str):
        """Yield the reply's text deltas; the full reply is appended to the history at the end."""
        import dataclasses

        self.history.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        stop_ids = list(self.params.stop_token_ids)
        im_end = im_end_token_id(self.gen.tokenizer)
        if im_end is not None:
            stop_ids.append(im_end)
        params = dataclasses.replace(
            self.params, stop=list(self.params.stop) + [IM_END], stop_token_ids=stop_ids,
            max_tokens=min(self.params.max_tokens, self.gen.max_context - len(ids)),
        )
        reply = []
        for text in self._stream(ids, params):
            if text:
                reply.append(text)
                yield text
        self.history.append({"role": "assistant", "content": "".join(reply)})

    def _stream(self, ids: list[int], params):
        """Generate after ``ids`` on the session's cache, prefilling only what it does not hold already."""
        gen = self.gen
        if self._cache is None:
            self._cache = gen.new_cache(slots=1, capacity=min(gen.max_context, len(ids) + params.max_tokens))
        cache = self._cache
        n = reusable_prefix(self._held, ids)
        if n:
            cache.lengths[0] = n
        else:
            cache.reset_slot(0)
        self._held = []
        self.last_cached = n
        seq = gen.new_sequence(ids, params)
        if seq.finished:  # max_tokens 0
            return
        # prefill/decode run in inference mode themselves (not across the yields: the caller's code between
        # tokens runs as it would anyway)
        logits = gen.prefill(cache, 0, ids[n:])
        tok, delta = seq.step(logits)
        yield delta
        while not seq.finished:
            logits = gen.decode(cache, [tok])[0]
            tok, delta = seq.step(logits)
            yield delta
        self._held = seq.fed_tokens(cache.lengths[0])
