"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream over SSE with
``stream: true``, ending ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text, requests labelled by the app's routes) and ``GET /`` (a small web chat page).

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

One module per job (as vLLM's ``entrypoints/openai``):

* :mod:`.protocol` — request schemas, :class:`ServerLimits`, :class:`APIError` (the error shape), SSE and usage
* :mod:`.middleware` — the API key check, :class:`Metrics` and the per-route request counter, the body limit
* :mod:`.relay` — engine events from the engine's thread to each request on the event loop; client disconnects
* :mod:`.serving` — :class:`Server`: what every generation endpoint shares (checks, prompt ids, sampling
  parameters, submission, the events of a request)
* :mod:`.completions`, :mod:`.chat_completions` — the two generation endpoints
* :mod:`.app` — the app (error handlers, ``/v1/models``, ``/health``, ``/metrics``, ``/``), :func:`build_server`,
  :func:`serve`, :class:`BackgroundServer`

A new endpoint is a module with a ``register(app, srv)`` called from :func:`.app.build_app`; its path gets its
own ``/metrics`` label from the route.
"""

from mptkit.infer.server.app import BackgroundServer, build_app, build_server, serve
from mptkit.infer.server.middleware import Metrics
from mptkit.infer.server.protocol import APIError, ChatMessage, ChatRequest, CompletionRequest, ServerLimits
from mptkit.infer.server.serving import Server

__all__ = [
    "APIError",
    "BackgroundServer",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "Metrics",
    "Server",
    "ServerLimits",
    "build_app",
    "build_server",
    "serve",
]
