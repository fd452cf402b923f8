"""``POST /v1/completions``: a prompt (text or token ids) continued, plain or streamed over SSE."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from mptkit.infer.server._deps import Request, run_in_threadpool
from mptkit.infer.server.protocol import SSE_DONE, APIError, CompletionRequest, sse_event, usage

if TYPE_CHECKING:
    from mptkit.infer.engine import Event
    from mptkit.infer.server._deps import FastAPI
    from mptkit.infer.server.serving import Server

PATH = "/v1/completions"


def register(app: FastAPI, srv: Server) -> None:
    @app.post(PATH)
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(srv, req, request)


async def create_completion(srv: Server, req: CompletionRequest, request: Request):
    srv.check_auth(request)
    srv.check_model(req.model)
    # fields of OpenAI's API this server does not implement: an error naming the field, never a silent
    # answer to another question (lm-eval's loglikelihood sends echo + logprobs and reads the prompt's logprobs)
    if req.best_of not in (None, 1):
        raise APIError(
            400,
            f"best_of={req.best_of} is not supported (only 1): request n choices and pick among "
            "them on the client",
            param="best_of",
        )
    if req.suffix:
        raise APIError(
            400, "suffix (text after the insertion point) is not supported by this server", param="suffix"
        )
    if req.echo and req.logprobs is not None:
        raise APIError(
            400,
            "echo with logprobs asks for the prompt tokens' logprobs, which this server does not "
            "return: send echo without logprobs, or logprobs without echo (the generated "
            "tokens' logprobs)",
            param="echo",
        )
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise APIError(
                400,
                "this server takes one prompt per request (send a string or one token list)",
                param="prompt",
            )
        p = p[0]
    parse = srv.parse_special_tokens if req.parse_special_tokens is None else req.parse_special_tokens
    ids = await run_in_threadpool(srv.encode, p, "prompt", parse)  # off the event loop: a 1 MB prompt takes s
    params = srv.sampling(
        req,
        max_tokens=req.max_tokens,
        default_max=srv.limits.default_max_tokens,
        prompt_len=len(ids),
        logprobs=req.logprobs,
    )
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo = (await run_in_threadpool(srv.tok.decode, ids) if srv.tok is not None else "") if req.echo else ""
    n = len(params)
    name = srv.model_name

    def lp_obj(evs: list[Event], offset0: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        off = offset0
        for e in evs:
            if e.logprob is None:
                continue
            s = srv.token_str(e.logprob.token)
            tokens.append(s)
            lps.append(e.logprob.logprob)
            tops.append({srv.token_str(t): v for t, v in e.logprob.top})
            offs.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    h, q = srv.start(ids, params)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            toks = 0
            if echo:
                for i in range(n):
                    yield sse_event(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": name,
                            "choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}],
                        }
                    )
            async for ev in srv.events(request, h, q):
                if ev.token is not None:
                    toks += 1
                if not ev.text and not ev.finished and req.logprobs is None:
                    continue
                ch = {
                    "index": ev.choice,
                    "text": ev.text,
                    "logprobs": lp_obj([ev], 0) if req.logprobs is not None and ev.logprob else None,
                    "finish_reason": ev.finish_reason if ev.finished else None,
                }
                yield sse_event(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": name,
                        "choices": [ch],
                    }
                )
            if include_usage:
                yield sse_event(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": usage(len(ids), toks, h.cached_tokens),
                    }
                )
            yield SSE_DONE

        return srv.stream(sse())
    texts, evs, reasons, toks = await srv.collect(request, h, q, n)
    choices = [
        {
            "index": i,
            "text": echo + "".join(texts[i]),
            "logprobs": lp_obj(evs[i], len(echo)) if req.logprobs is not None else None,
            "finish_reason": reasons[i] or "length",
        }
        for i in range(n)
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": usage(len(ids), toks, h.cached_tokens),
    }
