"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream over SSE with
``stream: true``, ending ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text) and ``GET /`` (a small web chat page).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: invalid parameters and
malformed JSON -> 400 naming the field, unknown model -> 404, bad or missing key -> 401, body too large
-> 413, over capacity -> 429 with ``Retry-After``, engine down -> 503 with ``Retry-After``; the framework's
own errors (unknown path 404, wrong method 405) take the same shape.

Security: with an API key every endpoint but ``/health`` and the page ``/`` needs ``Authorization: Bearer
KEY`` (``/metrics`` too, unless ``public_metrics``; the scheme in any case, the key compared in constant time).
Text is tokenized as text: a chat message or a completion prompt that spells ``<|im_end|>`` or
``<|endoftext|>`` does not produce the control token (``parse_special_tokens`` opts a completion prompt in).
Prompts are tokenized in a worker thread, and a request whose client disconnects is cancelled, streaming or
not.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import html
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mptkit.data.tokenizer import encode_batch
from mptkit.errors import InferenceError
from mptkit.infer.engine import Engine, EngineOverloaded, EngineStopped, Event
from mptkit.infer.sampling import SamplingParams
from mptkit.prompts import DEFAULT_SYSTEM_PROMPT, IM_END, encode_chatml, im_end_token_id

log = logging.getLogger(__name__)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import HTTPException as _BodyHTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - the serve extra is optional
    FastAPI = None  # type: ignore[assignment]
    _BodyHTTPException = StarletteHTTPException = Exception  # type: ignore[assignment,misc]
    BaseModel = object  # type: ignore[assignment,misc]

    def Field(*a, **k):  # type: ignore[no-redef]
        return None

    def ConfigDict(**k):  # type: ignore[no-redef]
        return {}


STATIC = Path(__file__).with_name("static")


# ----------------------------------------------------------------------------- limits


@dataclass
class ServerLimits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_tokens: int = 2048  # most new tokens one choice may ask for
    default_max_tokens: int = 16  # /v1/completions default, as OpenAI
    default_chat_max_tokens: int = 512
    max_n: int = 8
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # sequences waiting for a slot
    retry_after_s: int = 1


# ----------------------------------------------------------------------------- request schemas


class _Base(BaseModel):  # type: ignore[misc,valid-type]
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


SEED_LIMIT = 2**63  # seeds are int64 >= 0, as OpenAI's (torch takes up to 2^64 - 1; larger is an error)


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)  # choice i uses seed + i (checked below)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # refused unless empty: no insertion (see completions)
    best_of: int | None = None  # refused unless 1: no server-side choice among candidates
    parse_special_tokens: bool | None = None  # None: the server's setting (default off: special tokens are text)


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and a latency histogram, written as Prometheus text."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.lat_counts = [0] * (len(self.BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_n = 0
        self.ttft_sum = 0.0
        self.ttft_n = 0
        self.in_flight = 0

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def latency(self, seconds: float) -> None:
        self.lat_sum += seconds
        self.lat_n += 1
        for i, b in enumerate(self.BUCKETS):
            if seconds <= b:
                self.lat_counts[i] += 1
                return
        self.lat_counts[-1] += 1

    def render(self, engine: Engine) -> str:
        lines = [
            "# HELP mptkit_requests_total HTTP requests by endpoint and status.",
            "# TYPE mptkit_requests_total counter",
        ]
        for (ep, st), n in sorted(self.requests.items()):
            lines.append(f'mptkit_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
        lines += [
            "# HELP mptkit_prompt_tokens_total Prompt tokens processed.",
            "# TYPE mptkit_prompt_tokens_total counter",
            f"mptkit_prompt_tokens_total {self.prompt_tokens}",
            "# HELP mptkit_prompt_tokens_cached_total Prompt tokens whose keys/values a slot already held (not prefilled).",
            "# TYPE mptkit_prompt_tokens_cached_total counter",
            f"mptkit_prompt_tokens_cached_total {getattr(engine, 'prompt_tokens_cached', 0)}",
            "# HELP mptkit_generation_tokens_total Tokens generated.",
            "# TYPE mptkit_generation_tokens_total counter",
            f"mptkit_generation_tokens_total {engine.tokens_generated}",
            "# HELP mptkit_queue_depth Sequences waiting for a batch slot.",
            "# TYPE mptkit_queue_depth gauge",
            f"mptkit_queue_depth {engine.num_waiting}",
            "# HELP mptkit_running_sequences Sequences in the running batch.",
            "# TYPE mptkit_running_sequences gauge",
            f"mptkit_running_sequences {engine.num_running}",
            "# HELP mptkit_requests_in_flight Generation requests being served.",
            "# TYPE mptkit_requests_in_flight gauge",
            f"mptkit_requests_in_flight {self.in_flight}",
            "# HELP mptkit_requests_cancelled_total Generation requests cancelled before their end (client gone).",
            "# TYPE mptkit_requests_cancelled_total counter",
            f"mptkit_requests_cancelled_total {getattr(engine, 'requests_cancelled', 0)}",
            "# HELP mptkit_decode_steps_total Batched decode steps run.",
            "# TYPE mptkit_decode_steps_total counter",
            f"mptkit_decode_steps_total {engine.steps}",
            "# HELP mptkit_request_latency_seconds Time from arrival to the last token.",
            "# TYPE mptkit_request_latency_seconds histogram",
        ]
        cum = 0
        for b, c in zip(self.BUCKETS, self.lat_counts):
            cum += c
            lines.append(f'mptkit_request_latency_seconds_bucket{{le="{b}"}} {cum}')
        lines.append(f'mptkit_request_latency_seconds_bucket{{le="+Inf"}} {self.lat_n}')
        lines.append(f"mptkit_request_latency_seconds_sum {self.lat_sum:.6f}")
        lines.append(f"mptkit_request_latency_seconds_count {self.lat_n}")
        lines += [
            "# HELP mptkit_time_to_first_token_seconds Time from arrival to the first token.",
            "# TYPE mptkit_time_to_first_token_seconds summary",
            f"mptkit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
            f"mptkit_time_to_first_token_seconds_count {self.ttft_n}",
        ]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- body-size guard


class BodyLimit:
    """ASGI middleware: reject bodies over ``limit`` bytes with 413 (by Content-Length, or while reading)."""

    def __init__(self, app, limit: int, metrics: Metrics | None = None):
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is not None:
            path, inner_send = scope.get("path", ""), send
            if path not in KNOWN_PATHS:
                path = "other"

            async def send(msg, _path=path, _send=inner_send):
                if msg["type"] == "http.response.start":
                    self.metrics.request(_path, msg["status"])
                await _send(msg)

        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = self.limit + 1
                if n > self.limit:
                    return await self._reject(send, n)
        seen = 0

        async def guarded():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen, self.limit)
            return msg

        try:
            await self.app(scope, guarded, send)
        except _TooLarge as e:
            await self._reject(send, e.seen)

    async def _reject(self, send, n):
        body = json.dumps({"error": {"message": _too_large(n, self.limit), "type": "invalid_request_error",
                                     "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def _too_large(n: int, limit: int) -> str:
    return f"request body of {n} bytes exceeds the limit of {limit} bytes"


class _TooLarge(_BodyHTTPException):
    """A body over the limit while it is read (chunked, no Content-Length). FastAPI turns any other error of
    the body read into a 400 "error parsing the body"; its own HTTPException it lets through, to the app's
    handler (-> 413 in OpenAI's shape)."""

    def __init__(self, seen: int, limit: int):
        super().__init__(413, _too_large(seen, limit))
        self.seen = seen


# ----------------------------------------------------------------------------- engine thread -> event loop


class _Relay:
    """Hands engine events (engine thread) to the requests' inboxes on one event loop.

    ``call_soon_threadsafe`` wakes the loop through its self-pipe (a syscall and a GIL hand-off) each time, so
    events are buffered and the loop is woken once per batch — by the engine (``Engine.add_waker``) as its next
    forward pass starts: the loop's Python (SSE formatting and writes, per event; measured:
    bench/results/inference.md) then runs while the engine computes outside the GIL rather than contending
    with its sampling and step set-up. Events put from
    the loop's own thread (a request finished at submission) are delivered at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.loop_thread = threading.get_ident()  # made on the loop
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, q: _Inbox, ev: Event) -> None:
        if threading.get_ident() == self.loop_thread:
            q.put(ev)
            return
        if self.loop.is_closed():  # the server is shutting down: nobody is listening
            raise RuntimeError("event loop closed")  # the engine cancels the request
        with self.lock:
            self.pending.append((q, ev))

    def kick(self) -> bool:
        """Wake the loop to deliver what is pending (any thread); False once the loop is closed (the engine then
        drops this relay's waker)."""
        if self.loop.is_closed():
            with self.lock:
                self.pending.clear()
            return False
        with self.lock:
            if not self.pending or self.scheduled:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop closed meanwhile (server shutting down): nobody is listening
            with self.lock:
                self.pending.clear()
                self.scheduled = False
            return False
        return True

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for q, ev in items:
            q.put(ev)


class _Inbox:
    """One request's events on the event loop (loop thread only): ``put`` from the relay's flush, ``get`` with a
    timeout. A future and a timer per wait — ``asyncio.wait_for(queue.get(), t)`` makes a task besides, per
    token of every stream (each costing loop time, on a loop that shares the cores with the engine)."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque[Event] = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, ev: Event) -> None:
        self.items.append(ev)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        if not self.items:
            fut = self.waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _wake, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self.waiter = None
        return self.items.popleft() if self.items else None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# ----------------------------------------------------------------------------- the app


class Server:
    """Holds the engine, tokenizer and limits; builds the FastAPI app."""

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None = None,
                 limits: ServerLimits | None = None, public_metrics: bool = False,
                 parse_special_tokens: bool = False):
        if FastAPI is None:
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
        self.parse_special_tokens = parse_special_tokens  # /v1/completions text prompts: special tokens parsed
        self.limits = limits or ServerLimits()
        self.metrics = Metrics()
        self.created = int(time.time())
        self.im_end_id = im_end_token_id(self.tok)
        self._relays: dict[asyncio.AbstractEventLoop, _Relay] = {}

    # ---------------------------------------------------------------- helpers
    @property
    def max_context(self) -> int:
        return self.gen.max_context

    def check_auth(self, request: Request) -> None:
        """``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235) when the server has a key; the key is
        compared in constant time."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        good = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._key)
        if not (good and scheme.lower() == "bearer"):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

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

    def sampling(self, req: _Sampling, *, max_tokens: int | None, default_max: int, prompt_len: int,
                 logprobs: int | None, extra_stop: list[str] = (), extra_stop_ids: list[int] = ()) -> list[SamplingParams]:
        lim = self.limits
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty (0 tokens)", param="prompt")
        room = self.max_context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens but this model's context is {self.max_context} "
                                f"tokens; at most {self.max_context - 1} prompt tokens fit", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            mt = min(default_max, room, lim.max_tokens)
        else:
            if max_tokens > lim.max_tokens:
                raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {lim.max_tokens}",
                               param="max_tokens")
            if prompt_len + max_tokens > self.max_context:
                raise APIError(400, f"this model's context is {self.max_context} tokens; you asked for "
                                    f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                               param="max_tokens", code="context_length_exceeded")
            mt = max_tokens
        if req.n > lim.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {lim.max_n}", param="n")
        if req.seed is not None and req.seed + req.n - 1 >= SEED_LIMIT:
            raise APIError(400, f"seed={req.seed} with n={req.n}: choice i uses seed + i, which must stay below 2^63",
                           param="seed")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 + len(extra_stop):
            raise APIError(400, "at most 4 stop sequences", param="stop")
        out = []
        for i in range(req.n):
            try:
                out.append(SamplingParams(
                    max_tokens=mt, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty,
                    seed=None if req.seed is None else req.seed + i,
                    stop=stop + list(extra_stop), stop_token_ids=list(req.stop_token_ids or []) + list(extra_stop_ids),
                    ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
                ))
            except InferenceError as e:
                raise APIError(400, str(e)) from None
        return out

    def chat_ids(self, msgs: list[dict]) -> list[int]:
        """The chat prompt's ids: ChatML markers as control tokens, message content as text (a message cannot
        forge a turn). Blocking: call it through ``run_in_threadpool``."""
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer; chat needs one", param="messages")
        try:
            return encode_chatml(self.tok, msgs, default_system=DEFAULT_SYSTEM_PROMPT)
        except InferenceError as e:
            raise APIError(400, str(e), param="messages") from None

    def token_str(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok is not None else str(t)

    # ---------------------------------------------------------------- running a request
    def start(self, prompt_ids: list[int], params: list[SamplingParams]):
        """Submit to the engine (errors become 429/503/400 before any response starts)."""
        loop = asyncio.get_running_loop()
        q = _Inbox(loop)
        relay = self._relays.get(loop)
        if relay is None:
            for old in [lp for lp in self._relays if lp.is_closed()]:  # loops that are gone (a test client's)
                del self._relays[old]
            relay = self._relays[loop] = _Relay(loop)
            self.engine.add_waker(relay.kick)

        def cb(ev: Event, _put=relay.put) -> None:
            _put(q, ev)

        try:
            h = self.engine.submit(prompt_ids, params, cb)
        except EngineOverloaded as e:
            raise APIError(429, str(e), code="overloaded", headers={"Retry-After": str(self.limits.retry_after_s)})
        except EngineStopped as e:
            raise APIError(503, str(e), code="unavailable", headers={"Retry-After": str(self.limits.retry_after_s)})
        except InferenceError as e:
            raise APIError(400, str(e), param="prompt")
        self.metrics.prompt_tokens += len(prompt_ids)
        self.metrics.in_flight += 1
        return h, q

    async def events(self, request: Request, h, q: _Inbox):
        """Yield the engine's events for ``h`` until every choice is done; cancel it if we stop early."""
        done = 0
        t0 = time.perf_counter()
        first = True
        try:
            while done < len(h.seqs):
                ev = await q.get(timeout=1.0)
                if ev is _CLIENT_GONE:  # a non-streaming request's client disconnected (_collect's watcher)
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

    # ---------------------------------------------------------------- endpoints
    async def completions(self, req: CompletionRequest, request: Request):
        self.check_auth(request)
        self.check_model(req.model)
        # fields of OpenAI's API this server does not implement: an error naming the field, never a silent
        # answer to another question (lm-eval's loglikelihood sends echo + logprobs and reads the prompt's logprobs)
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of} is not supported (only 1): request n choices and pick among "
                                "them on the client", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix (text after the insertion point) is not supported by this server",
                           param="suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs asks for the prompt tokens' logprobs, which this server does not "
                                "return: send echo without logprobs, or logprobs without echo (the generated "
                                "tokens' logprobs)", param="echo")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "this server takes one prompt per request (send a string or one token list)",
                               param="prompt")
            p = p[0]
        parse = self.parse_special_tokens if req.parse_special_tokens is None else req.parse_special_tokens
        ids = await run_in_threadpool(self.encode, p, "prompt", parse)  # off the event loop: a 1 MB prompt takes s
        params = self.sampling(req, max_tokens=req.max_tokens, default_max=self.limits.default_max_tokens,
                               prompt_len=len(ids), logprobs=req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = (await run_in_threadpool(self.tok.decode, ids) if self.tok is not None else "") if req.echo else ""
        n = len(params)

        def lp_obj(evs: list[Event], offset0: int) -> dict:
            tokens, lps, tops, offs = [], [], [], []
            off = offset0
            for e in evs:
                if e.logprob is None:
                    continue
                s = self.token_str(e.logprob.token)
                tokens.append(s)
                lps.append(e.logprob.logprob)
                tops.append({self.token_str(t): v for t, v in e.logprob.top})
                offs.append(off)
                off += len(s)
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        h, q = self.start(ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse():
                toks = 0
                if echo:
                    for i in range(n):
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                    "choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}]})
                async for ev in self.events(request, h, q):
                    if ev.token is not None:
                        toks += 1
                    if not ev.text and not ev.finished and req.logprobs is None:
                        continue
                    ch = {"index": ev.choice, "text": ev.text,
                          "logprobs": lp_obj([ev], 0) if req.logprobs is not None and ev.logprob else None,
                          "finish_reason": ev.finish_reason if ev.finished else None}
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": [ch]})
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": [], "usage": _usage(len(ids), toks, h.cached_tokens)})
                yield "data: [DONE]\n\n"

            return self._stream(sse())
        texts, evs, reasons, toks = await self._collect(request, h, q, n)
        choices = [{"index": i, "text": echo + "".join(texts[i]),
                    "logprobs": lp_obj(evs[i], len(echo)) if req.logprobs is not None else None,
                    "finish_reason": reasons[i] or "length"} for i in range(n)]
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(len(ids), toks, h.cached_tokens)}

    async def chat(self, req: ChatRequest, request: Request):
        self.check_auth(request)
        self.check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
        ids = await run_in_threadpool(self.chat_ids, msgs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, max_tokens=max_tokens, default_max=self.limits.default_chat_max_tokens,
                               prompt_len=len(ids), logprobs=k, extra_stop=[IM_END],
                               extra_stop_ids=[self.im_end_id] if self.im_end_id is not None else [])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n = len(params)

        def lp_content(evs: list[Event]) -> list[dict]:
            out = []
            for e in evs:
                if e.logprob is None:
                    continue
                s = self.token_str(e.logprob.token)
                out.append({"token": s, "logprob": e.logprob.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token_str(t), "logprob": v,
                                              "bytes": list(self.token_str(t).encode())} for t, v in e.logprob.top]})
            return out

        h, q = self.start(ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage=None):
                d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                     "choices": choices}
                if usage is not None:
                    d["usage"] = usage
                return _sse(d)

            async def sse():
                toks = 0
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for ev in self.events(request, h, q):
                    if ev.token is not None:
                        toks += 1
                    if not ev.text and not ev.finished and not req.logprobs:
                        continue
                    delta = {"content": ev.text} if ev.text else {}
                    yield chunk([{"index": ev.choice, "delta": delta,
                                  "logprobs": {"content": lp_content([ev])} if req.logprobs else None,
                                  "finish_reason": ev.finish_reason if ev.finished else None}])
                if include_usage:
                    yield chunk([], _usage(len(ids), toks, h.cached_tokens))
                yield "data: [DONE]\n\n"

            return self._stream(sse())
        texts, evs, reasons, toks = await self._collect(request, h, q, n)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": {"content": lp_content(evs[i])} if req.logprobs else None,
                    "finish_reason": reasons[i] or "length"} for i in range(n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(len(ids), toks, h.cached_tokens)}

    async def _collect(self, request: Request, h, q: _Inbox, n: int):
        """A non-streaming request's events, per choice: (texts, events, finish reasons), and the tokens."""
        texts: list[list[str]] = [[] for _ in range(n)]
        evs: list[list[Event]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        toks = 0
        # nothing is sent until the end, so nothing else notices a client that goes away: watch for it (the
        # request's receive channel says http.disconnect) and end the events, which cancels the sequences
        watcher = asyncio.get_running_loop().create_task(_await_disconnect(request, q))
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

    def _stream(self, agen):
        return StreamingResponse(agen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- app
    def app(self) -> FastAPI:
        app = FastAPI(title="mptkit", version="1", docs_url=None, redoc_url=None)
        srv = self

        @app.exception_handler(APIError)
        async def _api_error(request, exc: APIError):
            return exc.response()

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, exc: RequestValidationError):
            errs = exc.errors()
            first = errs[0] if errs else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            if first.get("type") == "json_invalid":
                return APIError(400, f"malformed JSON body: {first.get('msg', '')}", code="invalid_json").response()
            param = ".".join(loc) or None
            msg = f"invalid value for '{param}': {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
            return APIError(400, msg, param=param).response()

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request, exc: StarletteHTTPException):  # the framework's own: 404, 405, body errors
            if isinstance(exc, _TooLarge):
                return APIError(413, str(exc.detail), code="body_too_large").response()
            st = exc.status_code
            msg = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(st, str(exc.detail))
            code = {404: "not_found", 405: "method_not_allowed"}.get(st)
            return APIError(st, msg, code=code, headers=getattr(exc, "headers", None)).response()

        @app.exception_handler(Exception)
        async def _unexpected(request, exc: Exception):
            log.exception("unexpected error")
            return APIError(500, f"internal error: {type(exc).__name__}").response()

        @app.post("/v1/completions")
        async def completions(req: CompletionRequest, request: Request):
            return await srv.completions(req, request)

        @app.post("/v1/chat/completions")
        async def chat(req: ChatRequest, request: Request):
            return await srv.chat(req, request)

        @app.get("/v1/models")
        async def models(request: Request):
            srv.check_auth(request)
            return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                                "owned_by": "mptkit", "max_model_len": srv.max_context}]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            srv.check_auth(request)
            srv.check_model(name)
            return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "mptkit",
                    "max_model_len": srv.max_context}

        @app.get("/health")
        async def health():
            if not srv.engine.running:
                return JSONResponse({"status": "unavailable", "error": srv.engine.error}, status_code=503,
                                    headers={"Retry-After": str(srv.limits.retry_after_s)})
            return {"status": "ok", "model": srv.model_name, "running": srv.engine.num_running,
                    "waiting": srv.engine.num_waiting}

        @app.get("/metrics")
        async def metrics(request: Request):
            if not srv.public_metrics:
                srv.check_auth(request)
            return PlainTextResponse(srv.metrics.render(srv.engine), media_type="text/plain; version=0.0.4")

        @app.get("/", response_class=HTMLResponse)
        async def index():
            page = (STATIC / "index.html").read_text(encoding="utf-8")
            return HTMLResponse(page.replace("{{MODEL}}", html.escape(srv.model_name)).replace(
                "{{NEEDS_KEY}}", "true" if srv.api_key else "false"))

        return BodyLimit(app, self.limits.max_body_bytes, self.metrics)


_CLIENT_GONE: Any = object()  # put in a request's inbox when its client disconnects


async def _await_disconnect(request: Request, q: _Inbox) -> None:
    """Wait for the client of a request whose body is read to disconnect, then wake its inbox with
    ``_CLIENT_GONE`` (ASGI: once the body is in, ``receive`` returns only ``http.disconnect``)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            q.put(_CLIENT_GONE)
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(p: int, c: int, cached: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens a slot already held (not
    prefilled again)."""
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ----------------------------------------------------------------------------- building and running


def build_server(model_path: str, *, max_context: int | None = None, api_key: str | None = None,
                 limits: ServerLimits | None = None, model_name: str | None = None, compile: bool = False,
                 dtype=None, device: str = "cpu", kv_dtype=None, public_metrics: bool = False,
                 parse_special_tokens: bool = False):
    """Load a model (a model folder, a training run or a checkpoint) and return a started :class:`Server`
    (call ``.app()`` for the ASGI app)."""
    import torch

    from mptkit.infer.generate import Generator
    from mptkit.io.source import open_model_source

    limits = limits or ServerLimits()
    with open_model_source(model_path) as source:
        model = source.load_model(dtype=dtype or torch.float32, device=device)
        tok = source.load_tokenizer()
    gen = Generator(model, tok, max_context=max_context, compile=compile, kv_dtype=kv_dtype)
    engine = Engine(gen, max_batch=limits.max_batch, max_queue=limits.max_queue).start()
    name = model_name or Path(model_path).resolve().name
    return Server(engine, model_name=name, api_key=api_key, limits=limits, public_metrics=public_metrics,
                  parse_special_tokens=parse_special_tokens)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    try:
        uvicorn.run(server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.engine.stop()


class BackgroundServer:
    """A server running uvicorn in a daemon thread (notebooks, tests, benchmarks): ``base_url`` once healthy;
    ``stop()`` (or leaving the ``with`` block) shuts uvicorn down and stops the engine."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 ready_timeout: float = 30.0):
        import socket

        import uvicorn

        if port == 0:  # pick a free port
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.server = server
        self.base_url = f"http://{host}:{port}"
        self._uv = uvicorn.Server(uvicorn.Config(server.app(), host=host, port=port, log_level=log_level))
        self._thread = threading.Thread(target=self._uv.run, name="mptkit-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise InferenceError(f"the server did not start on {host}:{port} within {ready_timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self._uv.should_exit = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        self.server.engine.stop()

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
