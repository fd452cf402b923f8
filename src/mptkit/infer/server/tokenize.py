"""``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: the model's tokenizer over HTTP, as vLLM
serves it, so a client needs no copy of the tokenizer. lm-eval-harness's ``local-completions`` model probes
these (its default ``tokenizer_backend=auto``) and, when they answer, tokenizes its log-likelihood requests
through them (``tokenizer_backend=remote``).

* ``/tokenize`` ``{"prompt": str}`` or ``{"messages": [...]}`` -> ``{"tokens", "count", "max_model_len"}``:
  a prompt's ids exactly as ``/v1/completions`` would tokenize it (special tokens' spellings are text unless
  the server parses them or the request sets ``parse_special_tokens``), or a conversation's as
  ``/v1/chat/completions`` would (the tokenizer's own chat_template, else ChatML). ``add_special_tokens`` is
  accepted and adds nothing: mptkit's tokenizers add no BOS/EOS to a prompt.
* ``/detokenize`` ``{"tokens": [int, ...]}`` -> ``{"prompt": str}``; ids outside the vocabulary are a 400.
* ``/tokenizer_info`` -> the tokenizer's class, special tokens (``eos_token``, ``bos_token``, ``pad_token``),
  ``model_max_length`` (the server's context) and ``chat_template``: the template the chat endpoint renders
  with (the tokenizer's own; mptkit's ChatML template when it has none or its own renders ChatML).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mptkit.data.tokenizer import CHATML_TEMPLATE
from mptkit.infer.server._deps import Request, run_in_threadpool
from mptkit.infer.server.protocol import APIError, DetokenizeRequest, TokenizeRequest

if TYPE_CHECKING:
    from mptkit.infer.server._deps import FastAPI
    from mptkit.infer.server.serving import Server

PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def _need_tokenizer(srv: Server, param: str | None) -> Any:
    if srv.tok is None:
        raise APIError(400, "this model has no tokenizer: the tokenizer endpoints need one", param=param)
    return srv.tok


def register(app: FastAPI, srv: Server) -> None:
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request):
        srv.check_auth(request)
        srv.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(
                400, "send exactly one of 'prompt' (a string) and 'messages' (a conversation)", param="prompt"
            )
        if req.messages is not None:
            msgs = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in req.messages
            ]
            ids = await run_in_threadpool(srv.chat_ids, msgs)
        else:
            _need_tokenizer(srv, "prompt")
            parse = srv.parse_special_tokens if req.parse_special_tokens is None else req.parse_special_tokens
            ids = await run_in_threadpool(srv.encode, req.prompt, "prompt", parse)
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.max_context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request):
        srv.check_auth(request)
        srv.check_model(req.model)
        tok = _need_tokenizer(srv, "tokens")
        ids = srv.encode(req.tokens, "tokens")  # checks the ids against the vocabulary
        return {"prompt": await run_in_threadpool(tok.decode, ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        srv.check_auth(request)
        tok = _need_tokenizer(srv, None)
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "unk_token": getattr(tok, "unk_token", None),
            "model_max_length": srv.max_context,
            "vocab_size": srv.gen.config.vocab_size,
            "chat_template": srv.chat_format.template or CHATML_TEMPLATE,
        }
