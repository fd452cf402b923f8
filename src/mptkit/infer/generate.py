"""Generation: prefill + decode over a :class:`~mptkit.infer.cache.KVCache`, streaming text with stop
strings, batched generation with per-sequence positions (no padding), and ``generate_text``.

The per-token path is kept lean: one forward of (n, 1) tokens, cache writes in place, ALiBi bias from a
precomputed ramp, logits only for the last position (``logits_to_keep=1``), no T x T work.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from mptkit.errors import InferenceError
from mptkit.infer.cache import KVCache, context_limit
from mptkit.infer.decode import FastDecoder
from mptkit.infer.options import DecodeOptions
from mptkit.infer.sampling import SamplingParams, SequenceSampler, token_logprobs
from mptkit.model.quant import linear_kernel
from mptkit.utils.dtypes import WEIGHT_DTYPES, torch_dtype

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512
SCORE_CHUNK_ELEMS = 1 << 24  # logits per chunk when scoring prompt tokens (64 MB in fp32)


# ----------------------------------------------------------------------------- incremental text


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    It decodes a small window (``prefix`` .. end) and emits what the newest tokens added, so the cost per
    token is constant. A few prompt tokens seed the window so tokenizers that drop a leading space on the
    first token still produce the right text."""

    def __init__(self, tokenizer, prompt_ids: Seq[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)
        # a fast tokenizer's Rust backend decodes the same text without the wrapper's conversions (two calls
        # per token per sequence)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def _dec(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prev = self._dec(self.ids[self.prefix : self.read])
        new = self._dec(self.ids[self.prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            delta = new[len(prev) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prev = self._dec(self.ids[self.prefix : self.read])
        new = self._dec(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new[len(prev) :] if len(new) > len(prev) else ""


# ----------------------------------------------------------------------------- one sequence


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    elapsed: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sequence:
    """One sequence being generated: sampling state, stop rules and the text emitted so far."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        tokenizer=None,
        vocab_size: int,
        eos_token_id: int | None,
        context_limit: int,
        device="cpu",
    ):
        if not prompt_ids:
            raise InferenceError("the prompt is empty (0 tokens); give at least one token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = SequenceSampler(params, self.prompt_ids, vocab_size, device)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer, self.prompt_ids) if tokenizer is not None else None
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(int(eos_token_id))
        self.context_limit = context_limit
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # the prompt's tokens scored (``params.prompt_logprobs``): entry t for prompt token t, None for the first
        # (nothing precedes it); filled by whoever prefills the prompt (the engine), chunk by chunk
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.text = ""  # all text decoded so far (may run past a stop string)
        self.emitted = 0  # chars of text already handed out
        self.finish_reason: str | None = None
        self.final_text: str | None = None
        self.max_stop = max((len(s) for s in params.stop), default=0)
        if params.min_tokens > 0 and self.stop_ids:
            self.sampler.suppress = sorted(self.stop_ids)
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            self.finish_reason = "length"
            self.final_text = ""
        elif params.max_tokens == 0:  # scoring only: the prompt is fed (and scored), nothing is generated
            if len(self.prompt_ids) > context_limit:
                raise InferenceError(
                    f"the prompt has {len(self.prompt_ids)} tokens; the context limit is {context_limit} tokens"
                )
        elif len(self.prompt_ids) >= context_limit:
            raise InferenceError(
                f"the prompt has {len(self.prompt_ids)} tokens; the context limit is {context_limit} tokens "
                "(prompt + at least one new token must fit)"
            )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def score_only(self) -> bool:
        """Its prompt is to be scored and nothing generated (``max_tokens=0`` with ``prompt_logprobs``)."""
        return self.params.max_tokens == 0 and self.params.prompt_logprobs is not None

    def prompt_targets(self, start: int, n: int) -> list[int]:
        """The tokens that prompt positions ``start .. start+n-1`` predict (their next prompt tokens; the last
        prompt position predicts a new token, not a prompt token, so it has none)."""
        return self.prompt_ids[start + 1 : start + n + 1]

    def add_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Record the scores of the next prompt tokens."""
        self.prompt_logprobs.extend(entries)

    def finish_scoring(self) -> None:
        """A scoring-only sequence whose prompt is all fed ends here (``finish_reason`` "length")."""
        self.finish_reason = "length"
        self.final_text = ""

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def fed_tokens(self, n: int) -> list[int]:
        """The first ``n`` tokens of prompt + output: what a cache holding ``n`` of this sequence's tokens holds
        (the last token sampled is never fed); [] if ``n`` is more than the sequence has."""
        return (self.prompt_ids + self.output_ids)[:n] if n <= self.total_len else []

    def step(self, logits: torch.Tensor) -> tuple[int, str]:
        """Choose the next token from (V,) logits, apply stop rules; return (token, text delta)."""
        tok = self.sampler.choose(logits)
        if self.logprobs is not None:
            lp, top = token_logprobs(logits, tok, self.params.logprobs or 0)
            self.logprobs.append(TokenLogprob(tok, lp, top))
        return tok, self.append(tok)

    def append(self, tok: int) -> str:
        self.sampler.observe(tok)
        if self.sampler.suppress and self.sampler.n_out >= self.params.min_tokens:
            self.sampler.suppress = []
        self.output_ids.append(tok)
        if tok in self.stop_ids:  # a stop token ends the text and is not part of it
            self.finish_reason = "stop"
            tail = self.detok.flush() if self.detok else ""
            self.text += tail
            return self._finish_text(len(self.text))
        if self.detok is not None:
            self.text += self.detok.add(tok)
        if self.params.stop:
            start = max(0, self.emitted - self.max_stop)
            hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self.finish_reason = "stop"
                return self._finish_text(min(hits))
        if len(self.output_ids) >= self.params.max_tokens or self.total_len >= self.context_limit:
            self.finish_reason = "length"
            if self.detok is not None:
                self.text += self.detok.flush()
            return self._finish_text(len(self.text))
        # hold back a suffix that might be the start of a stop string
        safe = len(self.text)
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _finish_text(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        self.final_text = self.text[:end]
        return delta

    def output(self) -> GenerationOutput:
        text = self.final_text if self.final_text is not None else self.text[: self.emitted]
        return GenerationOutput(
            text=text, token_ids=list(self.output_ids), finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids), logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )


def reusable_prefix(held: Seq[int], prompt: Seq[int]) -> int:
    """How many of ``prompt``'s first tokens a cache holding ``held`` can keep: their common prefix, leaving at
    least one prompt token to feed (its logits give the first new token)."""
    limit = min(len(held), len(prompt) - 1)
    n = 0
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------- the generator


@dataclass
class StreamEvent:
    index: int  # which sequence of the batch
    token: int
    text: str  # text delta (may be "")
    finished: bool
    finish_reason: str | None = None


KV_DTYPE_NAMES = {n: torch_dtype(n) for n in WEIGHT_DTYPES}  # fp32/float32, bf16/bfloat16, fp16/float16


def _prompt_scope(fn):
    """A :class:`Generator` method that runs the model's forward on a prompt: inside the generator's
    :meth:`~Generator._prompt_arithmetic`."""

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self._prompt_arithmetic():
            return fn(self, *args, **kwargs)

    return run


def kv_cache_dtype(kv_dtype: torch.dtype | str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage type: ``None``/"auto" = the model's dtype; "fp16" halves an fp32 model's cache
    (K/V rounded to fp16 when stored, attention still computed in the model's dtype — llama.cpp's default)."""
    if kv_dtype is None or kv_dtype == "auto":
        return model_dtype
    if isinstance(kv_dtype, torch.dtype):
        if kv_dtype not in KV_DTYPE_NAMES.values():
            raise InferenceError(f"kv_dtype {kv_dtype} is not supported; use one of fp32, fp16, bf16")
        return kv_dtype
    if kv_dtype not in KV_DTYPE_NAMES:
        raise InferenceError(f"kv_dtype {kv_dtype!r} is not supported; use one of auto, fp32, fp16, bf16")
    return KV_DTYPE_NAMES[kv_dtype]


class Generator:
    """Runs a model with a KV cache: prefill and decode for one or many sequences.

    ``kv_dtype`` ("auto", "fp32", "fp16", "bf16"): how the KV cache stores keys and values (default: the model's
    dtype). "fp16" on an fp32 model halves the cache's memory and the bytes each decode step reads (the
    compiled CPU kernels convert on the fly); outputs then differ from full recompute by fp16 rounding.

    ``decode_options`` (:class:`~mptkit.infer.options.DecodeOptions`): the decode path's knobs (compiled CPU
    kernels, small-M rows, prefill key skipping), used by the fast decoder and every cache made here. The fast
    decoder runs only where :func:`mptkit.model.fastpath.model_coverage` covers the model (decided here, once);
    otherwise (a wrapped or subclassed module) decode steps run the model's own forward."""

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_context: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        compile: bool = False,
        fast_decode: bool = True,
        kv_dtype: torch.dtype | str | None = None,
        decode_options: DecodeOptions | None = None,
    ):
        self.model = model.eval()
        self.decode_options = decode_options or DecodeOptions()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_context = context_limit(self.config, max_context)
        self.prefill_chunk = prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = kv_cache_dtype(kv_dtype, self.dtype)
        self.learned_pos = bool(self.config.use_learned_pos_emb)
        self._decode_fn = self._forward_last
        self.fast = FastDecoder.for_model(model, self.decode_options) if fast_decode else None
        if compile:
            self._decode_fn = torch.compile(self._forward_last, dynamic=True)
            self.fast = None
        self._quant_fn = None  # the quantised linears' kernel for the prompt's forward: the decode step's
        if self.fast is not None and self.fast.q8 is not None:
            from mptkit.infer.quant_kernels import module_kernel

            self._quant_fn = module_kernel(self.fast.q8, self.decode_options.small_rows)

    def _prompt_arithmetic(self):
        """The context the prompt's forward runs in: a quantised model's linears through the decode step's
        kernels (the integer path: the same rounding of the activations at every position, prompt or not)."""
        return linear_kernel(self._quant_fn) if self._quant_fn is not None else contextlib.nullcontext()

    # -------------------------------------------------------------- helpers
    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InferenceError("a text prompt needs a tokenizer (this model folder has none); pass token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InferenceError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def new_cache(self, slots: int = 1, capacity: int | None = None) -> KVCache:
        cache = KVCache(
            self.config, slots=slots, capacity=capacity, max_context=self.max_context, dtype=self.kv_dtype,
            device=self.device, compute_dtype=self.dtype, options=self.decode_options,
        )
        cache.set_slopes(self.model.slopes)
        return cache

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return Sequence(
            prompt_ids, params, tokenizer=self.tokenizer, vocab_size=self.config.vocab_size,
            eos_token_id=self.eos_token_id, context_limit=self.max_context, device=self.device,
        )

    def _forward_last(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None):
        return self.model(ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]

    # -------------------------------------------------------------- model steps
    @_prompt_scope
    @torch.inference_mode()
    def prefill(self, cache: KVCache, slot: int, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` into ``slot`` (in chunks); return the last position's logits (V,)."""
        logits = None
        t = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = t[:, s : s + self.prefill_chunk]
            cache.begin_prefill(slot, chunk.shape[1])
            logits = self._forward_last(chunk, cache, None)
        return logits[0]

    @_prompt_scope
    @torch.inference_mode()
    def prefill_packed(self, cache: KVCache, segments: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed prompt chunks of several slots — ``segments`` = [(slot, ids), ...], distinct slots, each chunk
        at most ``prefill_chunk`` long — in one forward pass; return each chunk's last-position logits (n, V).

        One GEMM over all the chunks' tokens instead of one per prompt (a 64-token prompt runs the weights at
        half the rate of 512 tokens together on CPU); each chunk attends to its own slot only. Models with
        learned position embeddings (whose positions come from a single "past" length) run one pass per
        chunk instead."""
        if not segments:
            raise InferenceError("prefill_packed: no segments")
        if self.learned_pos or len(segments) == 1:
            return torch.stack([self.prefill(cache, slot, ids) for slot, ids in segments])
        cache.begin_prefill_packed([(slot, len(ids)) for slot, ids in segments])
        flat = [t for _, ids in segments for t in ids]
        out = self.model(torch.tensor(flat, dtype=torch.long, device=self.device)[None], cache=cache,
                         return_logits=False, return_hidden=True)
        ends = torch.tensor(list(itertools.accumulate(len(ids) for _, ids in segments)), device=self.device) - 1
        return self.model.logits(out.hidden_states[0, ends])

    @_prompt_scope
    @torch.inference_mode()
    def prefill_packed_scored(
        self,
        cache: KVCache,
        segments: list[tuple[int, list[int]]],
        scores: list[tuple[list[int], int] | None],
    ) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """:meth:`prefill_packed`, and for each segment whose ``scores`` entry is ``(targets, k)`` the
        log-probabilities of ``targets`` — ``targets[j]`` is the token that the chunk's row ``j`` predicts
        (the next prompt token; at most one per row) — with each row's top ``k``: one
        :class:`TokenLogprob` per target. Every row of a scored chunk gets the LM head (in fp32, a bounded
        number of rows at a time), the others only their last row, as in :meth:`prefill_packed`."""
        if not any(sc is not None for sc in scores):
            return self.prefill_packed(cache, segments), [None] * len(segments)
        if self.learned_pos or len(segments) == 1:
            last, scored = [], []
            for (slot, ids), sc in zip(segments, scores):
                if sc is None:
                    last.append(self.prefill(cache, slot, ids))
                    scored.append(None)
                    continue
                h = self._prefill_hidden(cache, slot, ids)
                last.append(self.model.logits(h[-1:])[0])
                scored.append(self.score_rows(h, *sc))
            return torch.stack(last), scored
        cache.begin_prefill_packed([(slot, len(ids)) for slot, ids in segments])
        flat = [t for _, ids in segments for t in ids]
        out = self.model(torch.tensor(flat, dtype=torch.long, device=self.device)[None], cache=cache,
                         return_logits=False, return_hidden=True)
        hs = out.hidden_states[0]
        ends = torch.tensor(list(itertools.accumulate(len(ids) for _, ids in segments)), device=self.device) - 1
        scored, start = [], 0
        for (_, ids), sc in zip(segments, scores):
            scored.append(None if sc is None else self.score_rows(hs[start : start + len(ids)], *sc))
            start += len(ids)
        return self.model.logits(hs[ends]), scored

    def _prefill_hidden(self, cache: KVCache, slot: int, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` into ``slot`` (in chunks); return every position's final hidden state (T, D)."""
        t = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        parts = []
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = t[:, s : s + self.prefill_chunk]
            cache.begin_prefill(slot, chunk.shape[1])
            parts.append(self.model(chunk, cache=cache, return_logits=False, return_hidden=True).hidden_states[0])
        return torch.cat(parts)

    def score_rows(self, hidden: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
        """``log p(targets[j])`` under row ``j`` of ``hidden`` (final hidden states; rows past the targets are
        ignored) and each row's top ``k`` (id, logprob), from fp32 ``log_softmax`` of the LM head's logits,
        ``SCORE_CHUNK_ELEMS`` logits at a time (a long prompt never holds its (T, V) logits)."""
        n = len(targets)
        out: list[TokenLogprob] = []
        if n == 0:
            return out
        step = max(1, SCORE_CHUNK_ELEMS // max(1, self.config.vocab_size))
        tgt = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        for s in range(0, n, step):
            lp = torch.log_softmax(self.model.logits(hidden[s : min(n, s + step)]).float(), -1)
            chosen = lp.gather(1, tgt[s : s + step, None])[:, 0].tolist()
            if k > 0:
                v, i = torch.topk(lp, k, dim=-1)
                tops = [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
            else:
                tops = [[] for _ in chosen]
            out.extend(TokenLogprob(t, c, top) for t, c, top in zip(targets[s : s + step], chosen, tops))
        return out

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: list[int], active: list[bool] | None = None) -> torch.Tensor:
        """One token for each of slots ``0..len(tokens)-1`` -> logits (n, V)."""
        n = len(tokens)
        cache.begin_decode(n, active)
        if self.fast is not None and self.fast.usable():
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            pos = torch.tensor(cache.lengths[:n], device=self.device) if (self.learned_pos and n > 1) else None
            return self.fast(ids, cache, pos)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask = cache.decode_attention_mask() if (self.learned_pos and n > 1) else None
        return self._decode_fn(ids, cache, mask)

    # -------------------------------------------------------------- generation
    def stream(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
        *,
        on_start: Callable[[list[Sequence]], Any] | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate for a batch of prompts (each in its own cache slot: per-sequence positions, no padding),
        yielding a :class:`StreamEvent` per new token."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        seqs = [self.new_sequence(self.encode(p), sp) for p, sp in zip(prompts, plist)]
        if on_start is not None:
            on_start(seqs)
        n = len(seqs)
        if n == 0:
            return
        longest = max(s.total_len for s in seqs)
        cache = self.new_cache(slots=n, capacity=min(self.max_context, longest + max(s.params.max_tokens for s in seqs)))
        nxt = [0] * n
        for i, s in enumerate(seqs):
            if s.finished:
                continue
            if s.params.prompt_logprobs is None:
                logits = self.prefill(cache, i, s.prompt_ids)
            else:  # the prompt scored by its prefill
                sc = (s.prompt_targets(0, len(s.prompt_ids)), s.params.prompt_logprobs)
                last, scored = self.prefill_packed_scored(cache, [(i, s.prompt_ids)], [sc])
                s.add_prompt_logprobs(scored[0])
                if s.score_only:
                    s.finish_scoring()
                    continue
                logits = last[0]
            tok, delta = s.step(logits)
            nxt[i] = tok
            yield StreamEvent(i, tok, delta, s.finished, s.finish_reason)
        while True:
            active = [not s.finished for s in seqs]
            if not any(active):
                break
            hi = max(i for i, a in enumerate(active) if a) + 1
            logits = self.decode(cache, nxt[:hi], active[:hi])
            for i in range(hi):
                if not active[i]:
                    continue
                tok, delta = seqs[i].step(logits[i])
                nxt[i] = tok
                yield StreamEvent(i, tok, delta, seqs[i].finished, seqs[i].finish_reason)

    def generate(
        self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None, **kw
    ) -> list[GenerationOutput]:
        """Generate for every prompt (batched); returns one :class:`GenerationOutput` per prompt."""
        if params is None:
            params = SamplingParams.from_kwargs(**kw)
        holder: list[list[Sequence]] = []
        t0 = time.perf_counter()
        first: dict[int, float] = {}
        for ev in self.stream(prompts, params, on_start=holder.append):
            first.setdefault(ev.index, time.perf_counter() - t0)
        elapsed = time.perf_counter() - t0
        outs = []
        for i, s in enumerate(holder[0]):
            o = s.output()
            o.time_to_first_token = first.get(i)
            o.elapsed = elapsed
            outs.append(o)
        return outs


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    *,
    decode_options: DecodeOptions | None = None,
    **sampling,
) -> str:
    """The completion of ``prompt`` (text only): greedy by default, else sampled with ``seed``.

    Extra keyword arguments are :class:`SamplingParams` fields (top_k, top_p, min_p, stop, …);
    ``decode_options`` as for :class:`Generator`."""
    max_context = sampling.pop("max_context", None)
    params = SamplingParams.from_kwargs(max_tokens=max_new_tokens, temperature=temperature, seed=seed, **sampling)
    gen = Generator(model, tokenizer, max_context=max_context, decode_options=decode_options)
    return gen.generate([prompt], params)[0].text
