"""`mptkit generate`, `mptkit chat` and `mptkit serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mptkit.errors import InferenceError
from mptkit.utils import cli_args
from mptkit.utils.dtypes import WEIGHT_DTYPES, torch_dtype

log = logging.getLogger(__name__)

DTYPES = WEIGHT_DTYPES  # the --dtype choices


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="HF-layout model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + reply in tokens (default: max_seq_len; ALiBi models may go past it)")
    p.add_argument("--device", default="cpu", type=cli_args.device, help="cpu, cuda, cuda:1, … (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (default fp32)")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantise the block Linears' weights while loading: int8 (llama.cpp's q8_0 blocks) or q4 "
                        "(its q4_0 blocks; q8_0 / q4_0 also accepted; a folder from `mptkit export quant` loads "
                        "quantised without it)")
    p.add_argument("--threads", type=cli_args.threads, default=None,
                   help="torch CPU threads, 1 or more (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    p.add_argument("--attn-impl", default=None, metavar="IMPL",
                   help="attention backend for prefill (auto, torch, sdpa, blockwise, flex, flash; default: the "
                        "folder's config.json). Many HF MPT files name torch, the eager reference that holds "
                        "T x T scores: auto keeps long prompts O(T) in memory")
    p.add_argument("--adapter", default=None, metavar="ADAPTER",
                   help="a LoRA adapter (an adapter folder in peft's format, or a LoRA training run) applied "
                        "unmerged on top of MODEL")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="KV cache storage (default: the model's dtype); fp16 halves its memory and bytes per step")


def _add_sampling_args(p: argparse.ArgumentParser, *, temperature: float, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")


def _params(args, **over):
    from mptkit.infer.sampling import SamplingParams

    kw = {
        "max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty, "seed": args.seed, "stop": list(args.stop), "ignore_eos": args.ignore_eos,
    }
    kw.update(over)
    return SamplingParams(**kw)


def _load(args, *, need_tokenizer: bool = True):
    import torch

    from mptkit.infer.generate import Generator
    from mptkit.io.source import open_model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    # a model folder, a training run or a checkpoint (a LoRA run: its base with the adapter), plus --adapter
    with open_model_source(args.model, adapter=getattr(args, "adapter", None)) as source:
        model = source.load_model(dtype=torch_dtype(args.dtype), device=args.device, quant=args.quant,
                                  attn_impl=args.attn_impl)
        tok = source.load_tokenizer()
    if tok is None and need_tokenizer:
        raise InferenceError(f"{args.model}: no tokenizer files (tokenizer.json) next to the weights")
    return Generator(model, tok, max_context=args.max_context, compile=args.compile, kv_dtype=args.kv_dtype)


# ----------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise InferenceError("give --prompt TEXT, or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise InferenceError("the prompt is empty")
    if args.instruct:
        from mptkit.prompts import INSTRUCT_PROMPT

        prompt = INSTRUCT_PROMPT.format(instruction=prompt.strip())
    gen = _load(args)
    params = _params(args)

    def warn_if_capped(seqs) -> None:  # from the ids the generator encoded: the prompt is tokenized once
        n_prompt = len(seqs[0].prompt_ids)
        room = gen.max_context - n_prompt
        if 0 < room < params.max_tokens:  # (a prompt that leaves no room is an error further on)
            log.warning("--max-new-tokens %d: the context holds %d tokens and the prompt takes %d, so at most %d "
                        "new tokens will be generated%s", params.max_tokens, gen.max_context, n_prompt, room,
                        "" if gen.learned_pos else " (raise --max-context: ALiBi models may go past max_seq_len)")

    out = sys.stdout
    if args.echo:
        out.write(prompt)
    t0 = time.perf_counter()
    first = None
    n = 0
    for ev in gen.stream([prompt], params, on_start=warn_if_capped):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        if ev.text:
            out.write(ev.text)
            out.flush()
    out.write("\n")
    out.flush()
    dt = time.perf_counter() - t0
    if not args.quiet_stats:
        rate = (n - 1) / (dt - first) if n > 1 and dt > first else float("nan")
        print(f"[{n} tokens, first after {first or 0:.3f}s, {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- chat


def cmd_chat(args) -> int:
    from mptkit.infer.chat import ChatSession
    from mptkit.prompts import DEFAULT_SYSTEM_PROMPT

    gen = _load(args)
    system = None if args.no_system else args.system
    session = ChatSession(gen, system_prompt=system, params=_params(args))
    if system is None and not args.no_system and session.format.template is None:
        session.system_prompt = DEFAULT_SYSTEM_PROMPT  # ChatML's default; a model's own template decides its own
    print(f"mptkit chat ({args.model}, context {gen.max_context} tokens). /reset clears, /quit or Ctrl-D exits.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.history.clear()
            continue
        sys.stdout.write("assistant> ")
        try:
            for delta in session.send(text):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except InferenceError as e:
            session.history = session.history[:-1]
            print(f"\n[error: {e}]", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            continue
        sys.stdout.write("\n")


# ----------------------------------------------------------------------------- serve


API_KEY_ENV = "MPTKIT_API_KEY"


def _port(text: str) -> int:
    """argparse type of --port: 1..65535 (0, "any free port", is refused: the announced address would be wrong)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1..65535")
    return port


def api_key(args) -> str | None:
    """The server's key: --api-key, else the first line of --api-key-file, else $MPTKIT_API_KEY (unset or
    empty: none). The file and the variable keep the key out of the process list (`ps`)."""
    if args.api_key is not None:
        key = args.api_key
        where = "--api-key"
    elif args.api_key_file is not None:
        where = f"--api-key-file {args.api_key_file}"
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InferenceError(f"{where}: cannot read the key ({e.strerror or e})") from None
        key = text.strip().splitlines()[0] if text.strip() else ""
    else:
        return os.environ.get(API_KEY_ENV, "").strip() or None
    if not key.strip():
        raise InferenceError(f"{where}: the API key is empty")
    return key.strip()


def cmd_serve(args) -> int:
    import torch

    from mptkit.infer.server import ServerLimits, build_server, serve

    key = api_key(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", args.host)
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit,
                          max_batch=args.max_batch, max_queue=args.max_queue)
    srv = build_server(args.model, max_context=args.max_context, api_key=key, limits=limits,
                       model_name=args.model_name, compile=args.compile,
                       dtype=torch_dtype(args.dtype), device=args.device, kv_dtype=args.kv_dtype, quant=args.quant,
                       attn_impl=args.attn_impl, adapter=args.adapter,
                       public_metrics=args.public_metrics, parse_special_tokens=args.parse_special_tokens)
    print(f"serving '{srv.model_name}' on http://{args.host}:{args.port}/ (OpenAI API at /v1)", file=sys.stderr)
    serve(srv, host=args.host, port=args.port, log_level="warning" if args.quiet_http else "info")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    _add_model_args(p)
    p.add_argument("--prompt", default=None, help="the prompt (default or '-': read stdin)")
    p.add_argument("--instruct", action="store_true",
                   help="wrap the prompt in the Instruct template (Dolly's, as MPT-7B-Instruct and "
                        "configs/finetune/instruct.yaml train with): the prompt is the instruction")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--quiet-stats", action="store_true", help="do not print tokens/s to stderr")
    _add_sampling_args(p, temperature=0.0, max_new=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal (the tokenizer's own chat_template, else ChatML as MPT-7B-Chat)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: ChatML's default system message; none "
                   "with the tokenizer's own chat_template)")
    p.add_argument("--no-system", action="store_true", help="no system message")
    _add_sampling_args(p, temperature=0.7, max_new=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' on /v1 and /metrics (visible in `ps`: prefer "
                           f"--api-key-file or ${API_KEY_ENV})")
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help=f"read the key from the first line of PATH (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the key")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="/v1/completions: special tokens spelled in a text prompt (<|endoftext|>) become control "
                        "tokens (default: they are text; a request's parse_special_tokens field overrides)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting before 429")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--quiet-http", action="store_true", help="no per-request access log")
    p.set_defaults(func=cmd_serve)
