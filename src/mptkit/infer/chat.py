"""Chat: a multi-turn session keeping its KV cache across turns, and history trimming to the context window.

A conversation is rendered by :class:`ChatFormat`: with the model's tokenizer's own ``chat_template`` when it
has one (the renderer finetuning uses, :func:`mptkit.data.finetune.chat_template_renderer`, so a model is
prompted as it was trained), else with ChatML (:mod:`mptkit.prompts`; generation stops at ``<|im_end|>``, as a
stop string, and as a stop token when the tokenizer has it). ``mptkit chat`` and the server's chat endpoint
both use it."""

from __future__ import annotations

from mptkit.errors import DataError, InferenceError
from mptkit.infer.generate import reusable_prefix
from mptkit.prompts import DEFAULT_SYSTEM_PROMPT, IM_END, encode_chatml, im_end_token_id

_PROBE = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


def _template_name(template: str) -> str:
    """How an error names a template: its start (the template itself, not where it came from)."""
    first = " ".join(template.split())
    return "the tokenizer's chat_template " + repr(first[:60] + ("..." if len(first) > 60 else ""))


class ChatFormat:
    """How a conversation becomes prompt ids, and where a reply ends, for one tokenizer.

    * The tokenizer's own ``chat_template`` (unless it renders ChatML as mptkit does): the prompt is the
      template's text with the generation prompt, tokenized whole as ``tokenizer.apply_chat_template(...,
      add_generation_prompt=True)`` tokenizes it (the template's markers are its special tokens). No default
      system message is added (the template decides). A reply ends at the tokenizer's EOS (the generator's
      own stop) and at the template's end-of-turn text (what it renders after an assistant message's
      content: ``</s>``, ``<|eot_id|>``), as a stop string and, when it is one token, a stop id.
    * Otherwise ChatML (:func:`mptkit.prompts.encode_chatml`: markers as control tokens, content as text),
      the default system message added when the conversation has none; a reply ends at ``<|im_end|>``.

    ``template`` is the template used (None: ChatML). A template that fails on a plain conversation is an
    :class:`InferenceError` naming it, at construction; one that fails on a request's conversation, at
    :meth:`encode`."""

    def __init__(self, tokenizer):
        from mptkit.data.finetune import chat_template_renderer

        self.tokenizer = tokenizer
        self.template: str | None = None
        self._render = None
        self.stop: list[str] = [IM_END]
        im_end = im_end_token_id(tokenizer)
        self.stop_ids: list[int] = [im_end] if im_end is not None else []
        if tokenizer is None:
            return
        try:
            render = chat_template_renderer(tokenizer)
        except DataError as e:
            raise InferenceError(f"{_template_name(tokenizer.chat_template)} cannot be used: {e}") from None
        if render is None:
            return
        self.template = str(tokenizer.chat_template)
        self._render = render
        try:  # the spellings the tokenizer reads as its added/special tokens (a message must not spell them)
            self._specials = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        except (AttributeError, TypeError):
            self._specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        try:
            prompt, full = render(_PROBE[:1], True), render(_PROBE, False)
        except Exception as e:  # noqa: BLE001 - the template's own errors
            raise InferenceError(f"{_template_name(self.template)} cannot render a user/assistant conversation "
                                 f"({type(e).__name__}: {e})") from None
        reply = full[len(prompt):] if full.startswith(prompt) else ""
        end = reply[reply.find("A") + 1:].strip() if "A" in reply else ""
        self.stop, self.stop_ids = ([end] if end else []), []
        if end:
            from mptkit.prompts import marker_id

            mid = marker_id(tokenizer, end)
            if mid is not None:
                self.stop_ids.append(mid)

    @property
    def name(self) -> str:
        return "ChatML" if self.template is None else _template_name(self.template)

    def encode(self, messages: list[dict], *, default_system: str | None = None,
               parse_special_tokens: bool = False) -> list[int]:
        """The prompt ids of ``messages`` with the generation prompt (``default_system``: ChatML's system message
        for a conversation without one; the tokenizer's own template gets the messages as they are).

        Message content is text: with ChatML its special tokens' spellings are tokenized as characters; the
        tokenizer's own template is tokenized whole (its markers are special tokens), so a message that
        spells one of the tokenizer's special tokens is refused (it would open or close a turn), unless
        ``parse_special_tokens`` (trusted input)."""
        if self._render is None:
            return encode_chatml(self.tokenizer, messages, default_system=default_system,
                                 parse_special_tokens=parse_special_tokens)
        from mptkit.data.tokenizer import encode_batch
        from mptkit.prompts import ROLES, message_text

        msgs = []
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise InferenceError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            text = message_text(m.get("content"), f"messages[{i}]")
            forged = None if parse_special_tokens else next((t for t in self._specials if t in text), None)
            if forged is not None:
                raise InferenceError(
                    f"messages[{i}].content spells the tokenizer's special token {forged!r}: with the model's own "
                    "chat_template it would be read as that token (a message could open or close a turn), so "
                    "it is refused")
            msgs.append({"role": m["role"], "content": text})
        try:
            text = self._render(msgs, True)
        except Exception as e:  # noqa: BLE001 - the template's own errors (a role order it refuses, ...)
            raise InferenceError(f"{self.name} cannot render this conversation ({type(e).__name__}: {e})") from None
        return encode_batch(self.tokenizer, [text], parse_special_tokens=True)[0]


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
        self.format = ChatFormat(generator.tokenizer)
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
        budget = self.gen.max_context - max(1, min(self.params.max_tokens, self.gen.max_context // 2))

        def count(msgs):
            return len(self.format.encode(msgs))

        msgs = trim_history(self.messages(), count, budget)
        kept = len(msgs) - (1 if self.system_prompt else 0)
        self.history = self.history[len(self.history) - kept :]
        return self.format.encode(msgs)

    def send(self, user_text: str):
        """Yield the reply's text deltas; the full reply is appended to the history at the end."""
        import dataclasses

        self.history.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        params = dataclasses.replace(
            self.params, stop=list(self.params.stop) + self.format.stop,
            stop_token_ids=list(self.params.stop_token_ids) + self.format.stop_ids,
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
