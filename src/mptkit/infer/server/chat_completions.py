"""``POST /v1/chat/completions``: a conversation (the tokenizer's own chat_template, else ChatML) answered by
the assistant, plain or streamed over SSE."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from mptkit.infer.server._deps import Request, run_in_threadpool
from mptkit.infer.server.protocol import SSE_DONE, APIError, ChatRequest, sse_event, usage

if TYPE_CHECKING:
    from mptkit.infer.engine import Event
    from mptkit.infer.server._deps import FastAPI
    from mptkit.infer.server.serving import Server

PATH = "/v1/chat/completions"


def register(app: FastAPI, srv: Server) -> None:
    @app.post(PATH)
    async def chat(req: ChatRequest, request: Request):
        return await create_chat_completion(srv, req, request)


async def create_chat_completion(srv: Server, req: ChatRequest, request: Request):
    srv.check_auth(request)
    srv.check_model(req.model)
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, "only response_format type 'text' is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(
            400,
            "top_logprobs needs logprobs: true (the top tokens come with the chosen one's)",
            param="top_logprobs",
        )
    msgs = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages
    ]
    ids = await run_in_threadpool(srv.chat_ids, msgs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = srv.sampling(
        req,
        max_tokens=max_tokens,
        default_max=srv.limits.default_chat_max_tokens,
        prompt_len=len(ids),
        logprobs=k,
        extra_stop=srv.chat_format.stop,
        extra_stop_ids=srv.chat_format.stop_ids,
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    n = len(params)

    def lp_content(evs: list[Event]) -> list[dict]:
        out = []
        for e in evs:
            if e.logprob is None:
                continue
            s = srv.token_str(e.logprob.token)
            out.append(
                {
                    "token": s,
                    "logprob": e.logprob.logprob,
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": srv.token_str(t), "logprob": v, "bytes": list(srv.token_str(t).encode())}
                        for t, v in e.logprob.top
                    ],
                }
            )
        return out

    h, q = srv.start(ids, params)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage_=None):
            d = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": srv.model_name,
                "choices": choices,
            }
            if usage_ is not None:
                d["usage"] = usage_
            return sse_event(d)

        async def sse():
            toks = 0
            for i in range(n):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            async for ev in srv.events(request, h, q):
                if ev.token is not None:
                    toks += 1
                if not ev.text and not ev.finished and not req.logprobs:
                    continue
                delta = {"content": ev.text} if ev.text else {}
                yield chunk(
                    [
                        {
                            "index": ev.choice,
                            "delta": delta,
                            "logprobs": {"content": lp_content([ev])} if req.logprobs else None,
                            "finish_reason": ev.finish_reason if ev.finished else None,
                        }
                    ]
                )
            if include_usage:
                yield chunk([], usage(len(ids), toks, h.cached_tokens))
            yield SSE_DONE

        return srv.stream(sse())
    texts, evs, reasons, toks = await srv.collect(request, h, q, n)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "".join(texts[i])},
            "logprobs": {"content": lp_content(evs[i])} if req.logprobs else None,
            "finish_reason": reasons[i] or "length",
        }
        for i in range(n)
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": srv.model_name,
        "choices": choices,
        "usage": usage(len(ids), toks, h.cached_tokens),
    }
