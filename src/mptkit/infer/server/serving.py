"""What every endpoint runs on: :class:`Server` holds the engine, tokenizer, key, limits and metrics, and does
the steps a generation request shares (auth and model checks, prompt ids, sampling parameters within the
limits, submission to the engine, the stream of its events until done or the client goes away)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from mptkit.data.tokenizer import encode_batch
from mptkit.errors import InferenceError
from mptkit.infer.chat import ChatFormat
from mptkit.infer.engine import Engine, EngineOverloaded, EngineStopped, Event
from mptkit.infer.sampling import SamplingParams
from mptkit.infer.server._deps import AVAILABLE, StreamingResponse
from mptkit.infer.server.middleware import Metrics, check_api_key
from mptkit.infer.server.protocol import SEED_LIMIT, APIError, SamplingRequest, ServerLimits
from mptkit.infer.server.relay import CLIENT_GONE, Inbox, LoopRelays, await_disconnect
from mptkit.prompts import DEFAULT_SYSTEM_PROMPT

if TYPE_CHECKING:
    from mptkit.infer.server._deps import Request


class Server:
    """Holds the engine, tokenizer and limits; ``app()`` builds the ASGI app (:mod:`.app`)."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        api_key: str | None = None,
        limits: ServerLimits | None = None,
        public_metrics: bool = False,
        parse_special_tokens: bool = False,
    ):
        if not AVAILABLE:
            raise InferenceError("serving needs fastapi and uvicorn: pip install 'mptkit[serve]'")
        if api_key is not None and not api_key.strip():
            raise InferenceError("the API key is empty")
        self.engine = engine
        self.gen = engine.gen
        self.tok = engine.gen.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self._key = api_key.strip().encode() if api_key is not None else b""
        self.public_metrics = public_metrics  # /metrics without the key
        self.parse_special_tokens = (
            parse_special_tokens  # /v1/completions text prompts: special tokens parsed
        )
        self.limits = limits or ServerLimits()
        self.metrics = Metrics()
        self.created = int(time.time())
        self.chat_format = ChatFormat(self.tok)  # the tokenizer's own chat_template, else ChatML
        self._token_strs: dict[int, str] = {}  # token_str's (at most the vocabulary's size)
        self._relays = LoopRelays(engine)

    def app(self):
        """The ASGI app: the FastAPI app with its endpoints inside the metrics and body-limit middleware."""
        from mptkit.infer.server.app import build_app

        return build_app(self)

    # ---------------------------------------------------------------- checks and prompts
    @property
    def max_context(self) -> int:
        return self.gen.max_context

    def check_auth(self, request: Request) -> None:
        """The API key, when the server has one (:func:`~.middleware.check_api_key`)."""
        if self.api_key is not None:
            check_api_key(request, self._key)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def encode(self, prompt: Any, param: str, parse_special_tokens: bool = False) -> list[int]:
        """A prompt's ids: token ids checked against the vocabulary, or text tokenized with its special tokens'
        spellings as text unless ``parse_special_tokens`` (blocking: call it through ``run_in_threadpool``)."""
        if isinstance(prompt, str):
            if self.tok is None:
                raise APIError(400, "this model has no tokenizer; send token ids", param=param)
            return encode_batch(self.tok, [prompt], parse_special_tokens=parse_special_tokens)[0]
        ids = list(prompt)
        v = self.gen.config.vocab_size
        for i in ids:
            if not 0 <= i < v:
                raise APIError(400, f"token id {i} is outside the vocabulary (0..{v - 1})", param=param)
        return ids

    def chat_ids(self, msgs: list[dict]) -> list[int]:
        """The chat prompt's ids (:class:`~mptkit.infer.chat.ChatFormat`): the tokenizer's own chat_template when it
        has one, as ``apply_chat_template(..., add_generation_prompt=True)`` tokenizes it; else ChatML, markers as
        control tokens, message content as text (a message cannot forge a turn), the default system message
        added. Blocking: call it through ``run_in_threadpool``."""
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer; chat needs one", param="messages")
        try:
            return self.chat_format.encode(msgs, default_system=DEFAULT_SYSTEM_PROMPT)
        except InferenceError as e:
            raise APIError(400, str(e), param="messages") from None

    def token_str(self, t: int) -> str:
        """One token's text (its id as text without a tokenizer); remembered, so the logprobs of a long
        prompt's tokens and their top k cost dictionary look-ups on the event loop, not decodes."""
        s = self._token_strs.get(t)
        if s is None:
            s = self._token_strs[t] = self.tok.decode([t]) if self.tok is not None else str(t)
        return s

    def sampling(
        self,
        req: SamplingRequest,
        *,
        max_tokens: int | None,
        default_max: int,
        prompt_len: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        count: int | None = None,
        extra_stop: list[str] = (),
        extra_stop_ids: list[int] = (),
    ) -> list[SamplingParams]:
        """One :class:`SamplingParams` per choice (``count``, default ``req.n``: choice i seeded ``seed + i``),
        the request checked against the context and the limits. ``max_tokens=0`` (scoring only) needs the
        prompt to fit the context; anything else needs room for one new token besides."""
        lim = self.limits
        count = req.n if count is None else count
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty (0 tokens)", param="prompt")
        room = self.max_context - prompt_len
        fits = self.max_context if max_tokens == 0 else self.max_context - 1  # prompt tokens that fit
        if prompt_len > fits:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but this model's context is {self.max_context} "
                f"tokens; at most {fits} prompt tokens fit",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            mt = min(default_max, room, lim.max_tokens)
        else:
            if max_tokens > lim.max_tokens:
                raise APIError(
                    400,
                    f"max_tokens={max_tokens} exceeds this server's limit of {lim.max_tokens}",
                    param="max_tokens",
                )
            if prompt_len + max_tokens > self.max_context:
                raise APIError(
                    400,
                    f"this model's context is {self.max_context} tokens; you asked for "
                    f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            mt = max_tokens
        if req.n > lim.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {lim.max_n}", param="n")
        if req.seed is not None and req.seed + count - 1 >= SEED_LIMIT:
            raise APIError(
                400,
                f"seed={req.seed} with {count} choices: choice i uses seed + i, which must stay below 2^63",
                param="seed",
            )
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 + len(extra_stop):
            raise APIError(400, "at most 4 stop sequences", param="stop")
        out = []
        for i in range(count):
            try:
                out.append(
                    SamplingParams(
                        max_tokens=mt,
                        temperature=req.temperature,
                        top_p=req.top_p,
                        top_k=req.top_k,
                        min_p=req.min_p,
                        presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty,
                        repetition_penalty=req.repetition_penalty,
                        seed=None if req.seed is None else req.seed + i,
                        stop=stop + list(extra_stop),
                        stop_token_ids=list(req.stop_token_ids or []) + list(extra_stop_ids),
                        ignore_eos=req.ignore_eos,
                        min_tokens=req.min_tokens,
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs,
                    )
                )
            except InferenceError as e:
                raise APIError(400, str(e)) from None
        return out

    # ---------------------------------------------------------------- running a request
    def start(self, prompt_ids: list[int], params: list[SamplingParams]):
        """Submit to the engine (errors become 429/503/400 before any response starts); returns the engine's
        handle and the request's :class:`~.relay.Inbox`."""
        return self.start_batch([(prompt_ids, params)])

    def start_batch(self, prompts: list[tuple[list[int], list[SamplingParams]]]):
        """:meth:`start` for a request of several prompts, each with its choices' parameters
        (:meth:`~mptkit.infer.engine.Engine.submit_batch`: the choices run prompt by prompt)."""
        loop = asyncio.get_running_loop()
        q = Inbox(loop)
        relay = self._relays.get(loop)

        def cb(ev: Event, _put=relay.put) -> None:
            _put(q, ev)

        try:
            h = self.engine.submit_batch(prompts, cb)
        except EngineOverloaded as e:
            raise APIError(
                429, str(e), code="overloaded", headers={"Retry-After": str(self.limits.retry_after_s)}
            )
        except EngineStopped as e:
            raise APIError(
                503, str(e), code="unavailable", headers={"Retry-After": str(self.limits.retry_after_s)}
            )
        except InferenceError as e:
            raise APIError(400, str(e), param="prompt")
        self.metrics.prompt_tokens += sum(len(ids) for ids, _ in prompts)
        self.metrics.in_flight += 1
        return h, q

    async def events(self, request: Request, h, q: Inbox):
        """Yield the engine's events for ``h`` until every choice is done; cancel it if we stop early."""
        done = 0
        t0 = time.perf_counter()
        first = True
        try:
            while done < len(h.seqs):
                ev = await q.get(timeout=1.0)
                if ev is CLIENT_GONE:  # a non-streaming request's client disconnected (collect's watcher)
                    return
                if ev is None:  # nothing for a second: is the client still there?
                    if await request.is_disconnected():
                        return
                    continue
                if ev.error:
                    raise APIError(503, f"generation failed: {ev.error}", headers={"Retry-After": "1"})
                if first and ev.token is not None:
                    first = False
                    self.metrics.ttft_sum += time.perf_counter() - t0
                    self.metrics.ttft_n += 1
                if ev.finished:
                    done += 1
                yield ev
            self.metrics.latency(time.perf_counter() - t0)
            self.metrics.completion_tokens += h.completion_tokens
        finally:
            self.metrics.in_flight -= 1
            if not h.finished:
                self.engine.cancel(h)  # client went away (or we failed): free the slots now

    async def collect(self, request: Request, h, q: Inbox, n: int):
        """A non-streaming request's events, per choice: (texts, events, finish reasons), and the tokens."""
        texts: list[list[str]] = [[] for _ in range(n)]
        evs: list[list[Event]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        toks = 0
        # nothing is sent until the end, so nothing else notices a client that goes away: watch for it (the
        # request's receive channel says http.disconnect) and end the events, which cancels the sequences
        watcher = asyncio.get_running_loop().create_task(await_disconnect(request, q))
        try:
            async for ev in self.events(request, h, q):
                texts[ev.choice].append(ev.text)
                evs[ev.choice].append(ev)
                toks += ev.token is not None
                if ev.finished:
                    reasons[ev.choice] = ev.finish_reason
        finally:
            watcher.cancel()
        return texts, evs, reasons, toks

    @staticmethod
    def stream(agen) -> StreamingResponse:
        """A server-sent-events response of ``agen``'s strings."""
        return StreamingResponse(
            agen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
