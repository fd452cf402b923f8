"""Chat: the ChatML template MPT-7B-Chat was trained with, and history trimming to the context window.

Template (one turn per message, then the assistant's opening)::

    <|im_start|>system
    A conversation between a user and an LLM-based AI assistant. ...<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

Generation stops at ``<|im_end|>`` (as a stop string, and as a stop token when the tokenizer has it).
"""

from __future__ import annotations

from typing import Any

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


def render_chatml(messages: list[dict], *, add_generation_prompt: bool = True, default_system: str | None = None) -> str:
    """The ChatML prompt for ``messages`` (dicts with role and content)."""
    parts = []
    if default_system and not (messages and messages[0].get("role") == "system"):
        parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise InferenceError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        parts.append(f"{IM_START}{role}\n{message_text(m.get('content'), f'messages[{i}]')}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def im_end_token_id(tokenizer) -> int | None:
    """The id of ``<|im_end|>`` when the tokenizer has it as one token (MPT-7B-Chat's does)."""
    if tokenizer is None:
        return None
    try:
        ids = tokenizer.encode(IM_END, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - any tokenizer object: one that cannot encode it has no such token
        return None
    return ids[0] if len(ids) == 1 else None


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
            return len(tok.encode(render_chatml(msgs), add_special_tokens=False))

        msgs = trim_history(self.messages(), count, budget)
        kept = len(msgs) - (1 if self.system_prompt else 0)
        self.history = self.history[len(self.history) - kept :]
        return tok.encode(render_chatml(msgs), add_special_tokens=False)

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
