"""The OpenAI API's side of the server: request schemas, the server's limits on them, the error shape
``{"error": {"message", "type", "param", "code"}}`` and the response pieces every endpoint writes (SSE
events, the usage object)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from mptkit.infer.sampling import MAX_LOGPROBS
from mptkit.infer.server._deps import BaseModel, ConfigDict, Field, JSONResponse

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


class SamplingRequest(_Base):
    """The fields both endpoints share (model, sampling, stopping, streaming)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)  # choice i uses seed + i (Server.sampling checks)
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


class CompletionRequest(SamplingRequest):
    # a string, a list of strings, a list of token ids or a list of token-id lists: checked by
    # completions.prompt_list (a 400 naming "prompt" that says what is wrong, not a schema union's errors)
    prompt: Any = Field(...)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None  # refused unless empty: no insertion (see completions)
    best_of: int | None = Field(None, ge=1)  # candidates per prompt; the n best returned (see completions)
    parse_special_tokens: bool | None = (
        None  # None: the server's setting (default off: special tokens are text)
    )


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None


class TokenizeRequest(_Base):
    """``POST /tokenize`` (vLLM's): a completion prompt or a chat conversation (see :mod:`.tokenize`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = False  # mptkit's tokenizers add none to a prompt either way
    parse_special_tokens: bool | None = None  # None: the server's setting, as /v1/completions


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape; ``type`` follows from the status unless given."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type_: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
        }.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- response pieces


def sse_event(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(p: int, c: int, cached: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens a slot already held (not
    prefilled again)."""
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
