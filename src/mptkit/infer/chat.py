"""Chat: a multi-turn session over the ChatML template (:mod:`mptkit.prompts`), keeping its KV cache across
turns, and history trimming to the context window. Generation stops at ``<|im_end|>`` (as a stop string, and as
a stop token when the tokenizer has it)."""

from __future__ import annotations

from mptkit.errors import InferenceError
from mptkit.infer.generate import reusable_prefix
from mptkit.prompts import DEFAULT_SYSTEM_PROMPT, IM_END, encode_chatml, im_end_token_id


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
