"""``POST /v1/completions``: prompts (text or token ids, one or a list) continued, plain or streamed over SSE.

As OpenAI's legacy completions and vLLM define them:

* ``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists; the prompts run
  together through the engine, ``n`` choices each, choice ``j`` of prompt ``i`` at ``index = i * n + j``;
  ``usage`` sums over the prompts (each prompt's tokens counted once).
* ``logprobs: k`` (0..:data:`~mptkit.infer.sampling.MAX_LOGPROBS`): per token its text, its log-probability
  under the model's raw distribution (fp32 ``log_softmax``), the ``k`` most likely tokens' and the token's own
  (so up to ``k + 1`` entries, as OpenAI documents) and its offset in the choice's text.
* ``echo: true``: the prompt's text before the completion; with ``logprobs`` the prompt's tokens come first
  in ``logprobs``, scored by the same forward pass that prefills them (the first has no log-probability:
  ``null``, and ``null`` top entries). ``max_tokens: 0`` with ``echo`` scores the prompt and generates
  nothing (``finish_reason`` "length"): lm-eval's log-likelihood requests. Streamed, a choice's first chunk
  carries the prompt's text and scores (with its first new token, if any), as vLLM streams them.
* ``best_of: m`` (>= n): ``m`` candidates per prompt (seeds ``seed + i``), the ``n`` with the highest mean
  log-probability per generated token returned, best first (OpenAI's rule); every candidate's tokens count
  in ``usage.completion_tokens``. Not streamable (as OpenAI): ``stream`` with ``best_of > n`` is a 400.
* ``suffix`` (insertion) is a 400 naming it.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from mptkit.infer.server._deps import Request, run_in_threadpool
from mptkit.infer.server.protocol import SSE_DONE, APIError, CompletionRequest, sse_event, usage

if TYPE_CHECKING:
    from mptkit.infer.engine import Event
    from mptkit.infer.generate import TokenLogprob
    from mptkit.infer.server._deps import FastAPI
    from mptkit.infer.server.serving import Server

PATH = "/v1/completions"
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a log-probability below this is reported as this (as vLLM)

PROMPT_KINDS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def register(app: FastAPI, srv: Server) -> None:
    @app.post(PATH)
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(srv, req, request)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def prompt_list(p: Any) -> list[str | list[int]]:
    """The request's prompts, each a string or a token-id list; anything else is a 400 naming ``prompt``."""
    if isinstance(p, str):
        return [p]
    if isinstance(p, list):
        if not p:
            raise APIError(400, f"prompt is an empty list; send {PROMPT_KINDS}", param="prompt")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if _is_ids(p):
            return [p]
        if all(isinstance(x, list) for x in p):
            for i, x in enumerate(p):
                if not _is_ids(x):
                    raise APIError(400, f"prompt[{i}] is not a list of token ids (integers)", param="prompt")
            return list(p)
        kinds = sorted({type(x).__name__ for x in p})
        raise APIError(
            400,
            f"prompt is a list mixing {', '.join(kinds)}: a list holds only strings, only token ids or only "
            "token-id lists",
            param="prompt",
        )
    raise APIError(400, f"prompt must be {PROMPT_KINDS}, got {type(p).__name__}", param="prompt")


def _check_fields(srv: Server, req: CompletionRequest) -> int:
    """Refuse what this server does not do or the request asks inconsistently; return ``best_of``."""
    if req.suffix:
        raise APIError(
            400, "suffix (text after the insertion point) is not supported by this server", param="suffix"
        )
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            400,
            "max_tokens=0 generates nothing: it is only useful with echo (the prompt back, scored with "
            "logprobs); ask for at least 1 token or set echo",
            param="max_tokens",
        )
    best_of = req.n if req.best_of is None else req.best_of
    if best_of < req.n:
        raise APIError(400, f"best_of={best_of} must be >= n={req.n}", param="best_of")
    if best_of > req.n and req.stream:
        raise APIError(
            400,
            f"best_of={best_of} > n={req.n} cannot be streamed (the best are known only at the end); "
            "send stream=false or best_of=n",
            param="best_of",
        )
    if best_of > srv.limits.max_n:
        raise APIError(
            400, f"best_of={best_of} exceeds this server's limit of {srv.limits.max_n}", param="best_of"
        )
    return best_of


def _score(lps: list[TokenLogprob]) -> float:
    """A candidate's rank for best_of: its mean log-probability per generated token."""
    return sum(e.logprob for e in lps) / len(lps) if lps else 0.0


async def create_completion(srv: Server, req: CompletionRequest, request: Request):
    srv.check_auth(request)
    srv.check_model(req.model)
    best_of = _check_fields(srv, req)
    prompts = prompt_list(req.prompt)
    n = req.n
    total = len(prompts) * best_of
    if total > srv.engine.max_queue:
        raise APIError(
            400,
            f"{len(prompts)} prompts x {best_of} choices = {total} sequences; this server queues at most "
            f"{srv.engine.max_queue} per request: send fewer prompts per request",
            param="prompt",
        )
    parse = srv.parse_special_tokens if req.parse_special_tokens is None else req.parse_special_tokens

    def encode_all() -> list[list[int]]:  # off the event loop: a 1 MB prompt takes seconds
        return [srv.encode(p, "prompt", parse) for p in prompts]

    ids_list = await run_in_threadpool(encode_all)
    want_lp = req.logprobs is not None
    score_prompt = req.echo and want_lp
    # best_of ranks candidates by their tokens' log-probabilities: computed whether or not they are returned
    gen_logprobs = req.logprobs if want_lp else (0 if best_of > n else None)
    batch = []
    for pi, ids in enumerate(ids_list):
        try:
            params = srv.sampling(
                req,
                max_tokens=req.max_tokens,
                default_max=srv.limits.default_max_tokens,
                prompt_len=len(ids),
                logprobs=gen_logprobs,
                prompt_logprobs=req.logprobs if score_prompt else None,
                count=best_of,
            )
        except APIError as e:
            if len(ids_list) > 1:
                e.message = f"prompt[{pi}]: {e.message}"
            raise
        batch.append((ids, params))
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    name = srv.model_name
    prompt_tokens = sum(len(ids) for ids in ids_list)
    echoes = [""] * len(ids_list)
    if req.echo and srv.tok is not None:
        echoes = await run_in_threadpool(lambda: [srv.tok.decode(ids) for ids in ids_list])

    def entries_prompt(c: int) -> list[tuple[int, float | None, list | None]]:
        """Choice ``c``'s prompt tokens as (id, logprob, top): the first unscored."""
        seq = h.seqs[c]
        out: list[tuple[int, float | None, list | None]] = [(seq.prompt_ids[0], None, None)]
        out.extend((e.token, e.logprob, e.top) for e in (seq.prompt_logprobs or [None])[1:])
        return out

    def entries_events(evs: list[Event]) -> list[tuple[int, float | None, list | None]]:
        return [(e.logprob.token, e.logprob.logprob, e.logprob.top) for e in evs if e.logprob is not None]

    def lp_obj(entries, offset0: int) -> tuple[dict, int]:
        """OpenAI's logprobs object of ``entries`` (text offsets from ``offset0``) and the offset after."""
        tokens, lps, tops, offs = [], [], [], []
        off = offset0
        for tok, lp, top in entries:
            s = srv.token_str(tok)
            tokens.append(s)
            offs.append(off)
            off += len(s)
            if lp is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(max(lp, LOGPROB_FLOOR))
            d = {srv.token_str(t): max(v, LOGPROB_FLOOR) for t, v in top}
            d.setdefault(s, max(lp, LOGPROB_FLOOR))  # the token itself, when not among the top k
            tops.append(d)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}, off

    h, q = srv.start_batch(batch)
    if req.stream:  # best_of == n here: candidate c is choice c
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        started = [False] * total
        offsets = [0] * total

        async def sse():
            toks = 0
            async for ev in srv.events(request, h, q):
                c = ev.choice
                if ev.token is not None:
                    toks += 1
                text, entries = ev.text, entries_events([ev]) if want_lp else []
                if not started[c]:  # the choice's first chunk: the echoed prompt (and its scores) first
                    started[c] = True
                    if req.echo:
                        text = echoes[c // best_of] + text
                        if score_prompt:
                            entries = entries_prompt(c) + entries
                if not text and not ev.finished and not entries:
                    continue
                lp = None
                if want_lp:
                    lp, offsets[c] = lp_obj(entries, offsets[c])
                ch = {
                    "index": c,
                    "text": text,
                    "logprobs": lp,
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
                        "usage": usage(prompt_tokens, toks, h.cached_tokens),
                    }
                )
            yield SSE_DONE

        return srv.stream(sse())
    texts, evs, reasons, toks = await srv.collect(request, h, q, total)
    choices = []
    for pi in range(len(ids_list)):
        cands = list(range(pi * best_of, (pi + 1) * best_of))
        if best_of > n:  # the n best by mean logprob per token (a stable sort: ties keep candidate order)
            cands.sort(key=lambda c: -_score([e.logprob for e in evs[c] if e.logprob is not None]))
        for j, c in enumerate(cands[:n]):
            lp = None
            if want_lp:
                entries = (entries_prompt(c) if score_prompt else []) + entries_events(evs[c])
                lp, _ = lp_obj(entries, 0)
            choices.append(
                {
                    "index": pi * n + j,
                    "text": echoes[pi] + "".join(texts[c]),
                    "logprobs": lp,
                    "finish_reason": reasons[c] or "length",
                }
            )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": usage(prompt_tokens, toks, h.cached_tokens),
    }
