"""The serve extra's imports (fastapi, pydantic, starlette), in one place.

Without the extra the package still imports (the schemas become plain classes, the framework names None);
:class:`~mptkit.infer.server.serving.Server` then raises an error naming ``pip install 'mptkit[serve]'``."""

from __future__ import annotations

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import HTTPException as BodyHTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Match
except ImportError:  # pragma: no cover - the serve extra is optional
    FastAPI = Request = RequestValidationError = Match = run_in_threadpool = None  # type: ignore[assignment,misc]
    HTMLResponse = JSONResponse = PlainTextResponse = StreamingResponse = None  # type: ignore[assignment,misc]
    BodyHTTPException = StarletteHTTPException = Exception  # type: ignore[assignment,misc]
    BaseModel = object  # type: ignore[assignment,misc]

    def Field(*a, **k):  # type: ignore[no-redef]
        return None

    def ConfigDict(**k):  # type: ignore[no-redef]
        return {}


AVAILABLE = FastAPI is not None

__all__ = [
    "AVAILABLE",
    "BaseModel",
    "BodyHTTPException",
    "ConfigDict",
    "FastAPI",
    "Field",
    "HTMLResponse",
    "JSONResponse",
    "Match",
    "PlainTextResponse",
    "Request",
    "RequestValidationError",
    "StarletteHTTPException",
    "StreamingResponse",
    "run_in_threadpool",
]
