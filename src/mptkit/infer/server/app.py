"""The app and its start-up: :func:`build_app` puts the endpoints (one module each), ``/v1/models``,
``/health``, ``/metrics`` and the web chat page ``/`` into a FastAPI app with the OpenAI-shaped error
handlers and the middleware; :func:`build_server` loads a model into a started :class:`Server`;
:func:`serve` runs uvicorn in the foreground, :class:`BackgroundServer` in a thread."""

from __future__ import annotations

import html
import logging
import threading
import time
from pathlib import Path

from mptkit.errors import InferenceError
from mptkit.infer.engine import Engine
from mptkit.infer.server import chat_completions, completions, tokenize
from mptkit.infer.server._deps import (
    FastAPI,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Request,
    RequestValidationError,
    StarletteHTTPException,
)
from mptkit.infer.server.middleware import BodyLimit, RequestMetrics, TooLarge
from mptkit.infer.server.protocol import APIError, ServerLimits
from mptkit.infer.server.serving import Server

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parents[1] / "static"  # mptkit/infer/static (package data)


def build_app(srv: Server):
    """The ASGI app of ``srv``: FastAPI inside :class:`~.middleware.BodyLimit` inside
    :class:`~.middleware.RequestMetrics` (whose labels are this app's routes)."""
    app = FastAPI(title="mptkit", version="1", docs_url=None, redoc_url=None)
    _error_handlers(app)
    completions.register(app, srv)
    chat_completions.register(app, srv)
    tokenize.register(app, srv)
    _info_routes(app, srv)
    return RequestMetrics(BodyLimit(app, srv.limits.max_body_bytes), srv.metrics, lambda: app.routes)


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: the server's own (:class:`APIError`), invalid bodies (400 naming the
    field), the framework's (404, 405, 413) and anything unexpected (500, logged)."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(
                400, f"malformed JSON body: {first.get('msg', '')}", code="invalid_json"
            ).response()
        param = ".".join(loc) or None
        msg = (
            f"invalid value for '{param}': {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
        )
        return APIError(400, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # the framework's own: 404, 405, body errors
        if isinstance(exc, TooLarge):
            return APIError(413, str(exc.detail), code="body_too_large").response()
        st = exc.status_code
        msg = {
            404: f"no such endpoint: {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(st, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(st)
        return APIError(st, msg, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()


def _info_routes(app: FastAPI, srv: Server) -> None:
    """``/v1/models``, ``/health``, ``/metrics`` and the page ``/``."""

    def model_card() -> dict:
        return {
            "id": srv.model_name,
            "object": "model",
            "created": srv.created,
            "owned_by": "mptkit",
            "max_model_len": srv.max_context,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        srv.check_auth(request)
        srv.check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        if not srv.engine.running:
            return JSONResponse(
                {"status": "unavailable", "error": srv.engine.error},
                status_code=503,
                headers={"Retry-After": str(srv.limits.retry_after_s)},
            )
        return {
            "status": "ok",
            "model": srv.model_name,
            "running": srv.engine.num_running,
            "waiting": srv.engine.num_waiting,
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        if not srv.public_metrics:
            srv.check_auth(request)
        return PlainTextResponse(srv.metrics.render(srv.engine), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(
            page.replace("{{MODEL}}", html.escape(srv.model_name)).replace(
                "{{NEEDS_KEY}}", "true" if srv.api_key else "false"
            )
        )


# ----------------------------------------------------------------------------- building and running


def build_server(
    model_path: str,
    *,
    max_context: int | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    model_name: str | None = None,
    compile: bool = False,
    dtype=None,
    device: str = "cpu",
    kv_dtype=None,
    public_metrics: bool = False,
    parse_special_tokens: bool = False,
    quant: str | None = None,
    attn_impl: str | None = None,
    adapter: str | None = None,
) -> Server:
    """Load a model (a model folder, a training run or a checkpoint; ``quant="int8"`` quantises it while
    loading; ``attn_impl`` replaces the config's attention backend) and return a started :class:`Server` (call
    ``.app()`` for the ASGI app)."""
    import torch

    from mptkit.infer.generate import Generator
    from mptkit.io.source import open_model_source

    limits = limits or ServerLimits()
    with open_model_source(model_path, adapter=adapter) as source:  # adapter: LoRA, applied unmerged
        model = source.load_model(dtype=dtype or torch.float32, device=device, quant=quant, attn_impl=attn_impl)
        tok = source.load_tokenizer()
    gen = Generator(model, tok, max_context=max_context, compile=compile, kv_dtype=kv_dtype)
    engine = Engine(gen, max_batch=limits.max_batch, max_queue=limits.max_queue).start()
    name = model_name or Path(model_path).resolve().name
    try:
        return Server(
            engine,
            model_name=name,
            api_key=api_key,
            limits=limits,
            public_metrics=public_metrics,
            parse_special_tokens=parse_special_tokens,
        )
    except BaseException:  # a model the server refuses (its chat template): no engine thread left behind
        engine.stop()
        raise


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    try:
        uvicorn.run(server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.engine.stop()


class BackgroundServer:
    """A server running uvicorn in a daemon thread (notebooks, tests, benchmarks): ``base_url`` once healthy;
    ``stop()`` (or leaving the ``with`` block) shuts uvicorn down and stops the engine."""

    def __init__(
        self,
        server: Server,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        ready_timeout: float = 30.0,
    ):
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
                raise InferenceError(
                    f"the server did not start on {host}:{port} within {ready_timeout:.0f} s"
                )
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
