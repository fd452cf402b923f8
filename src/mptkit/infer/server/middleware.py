"""What wraps every request: the API key check, the request counters (labelled by the app's routes) with the
latency histogram behind ``/metrics``, and the body-size limit (413)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mptkit.infer.server._deps import BodyHTTPException, Match, Request
from mptkit.infer.server.protocol import APIError

if TYPE_CHECKING:
    from mptkit.infer.engine import Engine

# ----------------------------------------------------------------------------- API key


def check_api_key(request: Request, key: bytes) -> None:
    """``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235); the key is compared in constant time.
    Raises a 401 :class:`APIError` otherwise."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    good = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key)
    if not (good and scheme.lower() == "bearer"):
        raise APIError(
            401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
        )


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


OTHER = "other"  # the label of a request no route matches (unbounded paths must not make new labels)


def route_label(routes: Sequence[Any], scope: dict) -> str:
    """The ``endpoint`` label of a request: the path template of the first route whose path matches it (its
    method too or not: a 405 counts under its route), else ``"other"``."""
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is not None and matches(scope)[0] is not Match.NONE:
            return route.path
    return OTHER


class RequestMetrics:
    """ASGI middleware: count every HTTP response by route (:func:`route_label`, read from ``routes()`` at each
    request, so a route added to the app gets its own label) and status."""

    def __init__(self, app, metrics: Metrics, routes: Callable[[], Sequence[Any]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label, metrics = route_label(self.routes(), scope), self.metrics

        async def counted(msg):
            if msg["type"] == "http.response.start":
                metrics.request(label, msg["status"])
            await send(msg)

        return await self.app(scope, receive, counted)


# ----------------------------------------------------------------------------- body-size guard


class BodyLimit:
    """ASGI middleware: reject bodies over ``limit`` bytes with 413 (by Content-Length, or while reading)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
                    raise TooLarge(seen, self.limit)
            return msg

        try:
            await self.app(scope, guarded, send)
        except TooLarge as e:
            await self._reject(send, e.seen)

    async def _reject(self, send, n):
        body = json.dumps(APIError(413, too_large(n, self.limit), code="body_too_large").body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def too_large(n: int, limit: int) -> str:
    return f"request body of {n} bytes exceeds the limit of {limit} bytes"


class TooLarge(BodyHTTPException):
    """A body over the limit while it is read (chunked, no Content-Length). FastAPI turns any other error of
    the body read into a 400 "error parsing the body"; its own HTTPException it lets through, to the app's
    handler (-> 413 in OpenAI's shape)."""

    def __init__(self, seen: int, limit: int):
        super().__init__(413, too_large(seen, limit))
        self.seen = seen
