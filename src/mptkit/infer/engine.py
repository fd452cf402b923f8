"""The continuous-batching engine: one thread owns the model and a multi-slot KV cache.

Requests wait in a queue; between decode steps the engine admits waiting sequences into free cache slots,
runs at most one prefill chunk (so a long prompt does not stall the running batch), then one decode step
for every running sequence together. A sequence that finishes, or whose request is cancelled (a client
that went away), leaves its slot at once and the slot is reused by the next waiting sequence.

Events are delivered through a per-request callback, called on the engine thread; the server wraps it to
hand events to its asyncio loop.

Prompt reuse (``prefix_reuse``, on by default; llama.cpp's server does the same with ``cache_prompt``): a slot
keeps the keys and values of the tokens it last held when its sequence leaves, and a new sequence is placed in
the free slot whose tokens share the longest prefix with its prompt — a chat turn that re-sends the
conversation so far prefills only what is new. The kept keys/values were computed when those tokens were first
fed (prompt chunks, decode steps): a reused prefix gives the same logits as prefilling it again up to float
rounding (the attention's sums are grouped differently).
"""

from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mptkit.errors import InferenceError
from mptkit.infer.generate import Generator, Sequence, TokenLogprob, reusable_prefix
from mptkit.infer.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloaded(InferenceError):
    """The queue is full; try again later."""


class EngineStopped(InferenceError):
    """The engine is not running (shutting down or crashed)."""


@dataclass
class Event:
    choice: int
    text: str
    token: int | None
    logprob: TokenLogprob | None
    finished: bool
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Handle:
    """A submitted request: its sequences (one per choice; a request of several prompts has each prompt's
    choices in turn, ``starts`` the index of each prompt's first) and its callback."""

    rid: int
    seqs: list[Sequence]
    callback: Callable[[Event], None]
    starts: tuple[int, ...] = (0,)
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    done_count: int = 0
    cancelled: bool = False
    finished_at: float | None = None
    cached_tokens: int = 0  # prompt tokens of each prompt's first choice whose keys/values a slot already held

    @property
    def finished(self) -> bool:
        return self.done_count >= len(self.seqs)

    @property
    def prompt_tokens(self) -> int:
        """The prompts' tokens, each prompt counted once (not once per choice)."""
        return sum(len(self.seqs[i].prompt_ids) for i in self.starts if i < len(self.seqs))

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.output_ids) for s in self.seqs)


@dataclass
class _Slot:
    handle: Handle
    choice: int
    seq: Sequence
    fed: int = 0  # prompt tokens already in the cache
    next_token: int | None = None  # token to feed at the next decode step

    @property
    def decoding(self) -> bool:
        return self.next_token is not None and not self.seq.finished


class Engine:
    """Continuous batching over ``max_batch`` cache slots; ``max_queue`` sequences may wait. The decode options
    (compiled kernels, key skipping, the OpenMP pool) are the generator's (``Generator(decode_options=...)``):
    its cache and decode steps are the engine's."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        initial_capacity: int = 512,
        switch_interval: float | None = 0.0001,
        prefix_reuse: bool = True,
    ):
        self.gen = generator
        self.switch_interval = switch_interval
        self._saved_switch_interval: float | None = None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.cache = generator.new_cache(slots=max_batch, capacity=min(generator.max_context, initial_capacity))
        self.slots: list[_Slot | None] = [None] * max_batch
        self.prefix_reuse = prefix_reuse
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # tokens whose K/V a free slot still holds
        self.waiting: collections.deque[_Slot] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self._wakers: list[Callable[[], None]] = []
        # counters (read by /metrics)
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0  # prompt tokens not prefilled: a slot held them already
        self.requests_finished = 0
        self.requests_cancelled = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            # The engine thread gives up and re-takes the GIL around every torch op; while HTTP/event-loop
            # threads run Python, each re-take waits up to the interpreter's switch interval (5 ms by
            # default), stalling the whole batch. A shorter interval bounds that wait (process-wide setting;
            # ``switch_interval=None`` leaves it alone). 0.1 ms: with 8 streams the event loop runs Python
            # for every step's events, and at 0.5 ms the engine thread waited for the GIL at every step
            # (measured: bench/results/inference.md).
            if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
                self._saved_switch_interval = sys.getswitchinterval()  # restored by stop()
                sys.setswitchinterval(self.switch_interval)
            if self.gen.device.type == "cpu":
                # the caller's idle OpenMP workers would make libgomp throttle the engine thread's own pool
                from mptkit.infer.kernels import release_openmp_threads

                release_openmp_threads(keep_pool=self.gen.decode_options.keep_openmp_pool)
            self._thread = threading.Thread(target=self._run, name="mptkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    # ---------------------------------------------------------------- API (any thread)
    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def submit(self, prompt_ids: list[int], params: list[SamplingParams], callback: Callable[[Event], None]) -> Handle:
        """Queue a request with one sequence per entry of ``params`` (the ``n`` choices)."""
        return self.submit_batch([(prompt_ids, params)], callback)

    def submit_batch(
        self, prompts: list[tuple[list[int], list[SamplingParams]]], callback: Callable[[Event], None]
    ) -> Handle:
        """Queue one request over several prompts, ``prompts`` = [(prompt ids, one params per choice), ...]:
        its sequences (and events' ``choice``) run prompt by prompt, so prompt ``i``'s choice ``j`` is
        ``sum(choices of the prompts before i) + j`` (with ``n`` choices each, OpenAI's ``i * n + j``). The
        queue limit applies to all the sequences together: the whole request is queued or refused."""
        if not self.running:
            raise EngineStopped("the generation engine is not running" + (f": {self.error}" if self.error else ""))
        seqs: list[Sequence] = []
        starts = []
        for prompt_ids, params in prompts:
            starts.append(len(seqs))
            seqs.extend(self.gen.new_sequence(prompt_ids, p) for p in params)
        h = Handle(next(self._ids), seqs, callback, tuple(starts))
        with self._cv:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise EngineOverloaded(
                    f"server at capacity: {self.num_running} sequences running, {len(self.waiting)} waiting "
                    f"(queue limit {self.max_queue})"
                )
            for i, s in enumerate(seqs):
                if s.finished:  # max_tokens=0
                    h.done_count += 1
                    continue
                self.waiting.append(_Slot(h, i, s))
            self._cv.notify_all()
        if h.finished:
            for i, s in enumerate(seqs):
                callback(Event(i, "", None, None, True, s.finish_reason or "length"))
        return h

    def add_waker(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (on the engine thread) when the events emitted since the last call should be delivered:
        as the next forward pass starts, and before the engine idles or stops; ``fn`` returning False removes
        it. A consumer that buffers the engine's events (the server's relay to its event loop) wakes its reader
        there rather than at every event: the reader's Python then runs while the engine computes outside the
        GIL, instead of contending with the engine's own Python (sampling, the next step's set-up) for it."""
        with self._cv:
            self._wakers.append(fn)

    def _wake(self) -> None:
        gone = []
        for fn in self._wakers:
            try:
                if fn() is False:  # the consumer is gone for good (a closed event loop): drop it
                    gone.append(fn)
            except Exception:  # a broken consumer must not kill the engine
                log.exception("engine: waker failed")
        if gone:
            with self._cv:
                self._wakers = [f for f in self._wakers if f not in gone]

    def cancel(self, h: Handle) -> None:
        """Stop a request: its sequences leave the batch before the next step."""
        with self._cv:
            if not h.finished:
                h.cancelled = True
                self._cv.notify_all()

    # ---------------------------------------------------------------- the loop (engine thread)
    def _free(self, i: int) -> None:
        sl = self.slots[i]
        self.slots[i] = None
        self._held[i] = sl.seq.fed_tokens(self.cache.lengths[i]) if self.prefix_reuse and sl is not None else []
        if not self._held[i]:
            self.cache.reset_slot(i)

    def _finish_seq(self, sl: _Slot) -> None:
        h = sl.handle
        h.done_count += 1
        if h.finished:
            h.finished_at = time.perf_counter()
            self.requests_finished += 1

    def _emit(self, sl: _Slot, tok: int, delta: str) -> None:
        h = sl.handle
        if h.first_token is None:
            h.first_token = time.perf_counter()
        self.tokens_generated += 1
        lp = sl.seq.logprobs[-1] if sl.seq.logprobs else None
        fin = sl.seq.finished
        if fin:
            self._finish_seq(sl)
        self._deliver(sl, Event(sl.choice, delta, tok, lp, fin, sl.seq.finish_reason if fin else None))

    def _deliver(self, sl: _Slot, ev: Event) -> None:
        h = sl.handle
        try:
            h.callback(ev)
        except Exception:  # a broken consumer must not kill the engine
            log.exception("engine: event callback failed; cancelling request %d", h.rid)
            h.cancelled = True

    def _sweep(self) -> None:
        """Free slots of finished or cancelled sequences; drop cancelled waiting ones."""
        for i, sl in enumerate(self.slots):
            if sl is None:
                continue
            if sl.seq.finished:
                self._free(i)
            elif sl.handle.cancelled:
                self._free(i)
                self._finish_seq(sl)
                if sl.handle.finished:
                    self.requests_cancelled += 1
        if any(w.handle.cancelled for w in self.waiting):
            keep = collections.deque()
            for w in self.waiting:
                if w.handle.cancelled:
                    self._finish_seq(w)
                    if w.handle.finished:
                        self.requests_cancelled += 1
                else:
                    keep.append(w)
            self.waiting = keep

    def _admit(self) -> None:
        while self.waiting:
            free = [i for i in range(self.max_batch) if self.slots[i] is None]
            if not free:
                return
            sl = self.waiting.popleft()
            prompt = sl.seq.prompt_ids
            # the free slot holding the longest prefix of this prompt; with none, the first free slot that holds
            # nothing (so held tokens stay for a later turn), else the first free slot
            # a prompt to score is fed from its first token (the kept keys/values would leave tokens unscored)
            reuse = self.prefix_reuse and sl.seq.prompt_logprobs is None
            keeps = {i: reusable_prefix(self._held[i], prompt) if reuse else 0 for i in free}
            best = max(free, key=lambda i: (keeps[i], not self._held[i], -i))
            keep = keeps[best]
            if keep > 0:
                self.cache.lengths[best] = keep  # the slot's K/V for the first `keep` tokens are this prompt's
            else:
                self.cache.reset_slot(best)
            self._held[best] = []
            sl.fed = keep
            if sl.choice in sl.handle.starts:
                sl.handle.cached_tokens += keep
            self.slots[best] = sl
            self.prompt_tokens += len(prompt)
            self.prompt_tokens_cached += keep

    def _prefill_one(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens in all, across the slots that need it, in one forward
        pass (``Generator.prefill_packed``): concurrent arrivals share one GEMM over their prompts."""
        budget = self.prefill_chunk
        segs: list[tuple[int, list[int]]] = []
        scores: list[tuple[list[int], int] | None] = []  # prompts to score: (the tokens each row predicts, k)
        for i, sl in enumerate(self.slots):
            if budget <= 0:
                break
            if sl is None or sl.next_token is not None or sl.handle.cancelled or sl.seq.finished:
                continue
            chunk = sl.seq.prompt_ids[sl.fed : sl.fed + budget]
            if chunk:
                segs.append((i, chunk))
                k = sl.seq.params.prompt_logprobs
                scores.append(None if k is None else (sl.seq.prompt_targets(sl.fed, len(chunk)), k))
                budget -= len(chunk)
        if not segs:
            return
        self._wake()
        if any(sc is not None for sc in scores):
            logits, scored = self.gen.prefill_packed_scored(self.cache, segs, scores)
        else:
            logits, scored = self.gen.prefill_packed(self.cache, segs), [None] * len(segs)
        for (i, chunk), row, sc in zip(segs, logits, scored):
            sl = self.slots[i]
            sl.fed += len(chunk)
            if sc is not None:
                sl.seq.add_prompt_logprobs(sc)
            if sl.fed >= len(sl.seq.prompt_ids):
                if sl.seq.score_only:  # scored, nothing to generate: done (the sweep frees the slot)
                    sl.seq.finish_scoring()
                    self._finish_seq(sl)
                    self._deliver(sl, Event(sl.choice, "", None, None, True, sl.seq.finish_reason))
                    continue
                tok, delta = sl.seq.step(row)
                sl.next_token = tok
                self._emit(sl, tok, delta)

    def _decode(self) -> None:
        active = [sl is not None and sl.decoding and not sl.handle.cancelled for sl in self.slots]
        if not any(active):
            return
        hi = max(i for i, a in enumerate(active) if a) + 1
        tokens = [(sl.next_token if (sl is not None and sl.next_token is not None) else 0) for sl in self.slots[:hi]]
        self._wake()
        logits = self.gen.decode(self.cache, tokens, active[:hi])
        self.steps += 1
        for i in range(hi):
            if not active[i]:
                continue
            sl = self.slots[i]
            tok, delta = sl.seq.step(logits[i])
            sl.next_token = tok
            self._emit(sl, tok, delta)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._sweep()
                    while not self._stop and not self.waiting and all(s is None for s in self.slots):
                        self._wake()
                        self._cv.wait(timeout=1.0)
                        self._sweep()
                    if self._stop:
                        break
                    self._admit()
                self._prefill_one()
                self._decode()
        except Exception as e:  # report to every waiting consumer, then stop
            log.exception("engine crashed")
            self.error = f"{type(e).__name__}: {e}"
            self._stop = True
            for sl in list(self.slots) + list(self.waiting):
                if sl is not None and not sl.seq.finished:
                    try:
                        sl.handle.callback(Event(sl.choice, "", None, None, True, "error", error=self.error))
                    except Exception:
                        log.exception("could not report the engine crash to one of its requests")
        finally:
            self._wake()  # whatever was emitted last reaches its readers
