"""Sampling parameters and the next-token choice: penalties, temperature, top-k, top-p, min-p, seed.

Order (as vLLM and transformers apply them): repetition penalty (prompt + output tokens), presence and
frequency penalties (output tokens, OpenAI's definition), then greedy (temperature 0) or temperature ->
top-k -> top-p -> min-p -> a draw from the sequence's own seeded generator. Log-probabilities reported
to the caller are those of the model's raw distribution (``log_softmax`` of the logits before any
processing), as OpenAI's API documents them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from mptkit.errors import InferenceError

MAX_LOGPROBS = 20  # the most top log-probabilities per position (vLLM's default ``max_logprobs``)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    # None: off; k >= 0: each prompt token's logprob (the first has none) and the top k at its position
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise InferenceError(f"invalid {name}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad("max_tokens", f"must be an integer >= 0, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not (0 <= self.min_p <= 1):
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2 <= v <= 2):
                bad(name, f"must be in [-2, 2], got {v!r}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be >= 0, got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be in [0, {MAX_LOGPROBS}], got {v!r}")

    @classmethod
    def from_kwargs(cls, **kw) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        aliases = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}
        out = {}
        for k, v in kw.items():
            k = aliases.get(k, k)
            if k not in known:
                from mptkit.utils.keys import closest

                hint = closest(k, sorted(known))
                raise InferenceError(f"unknown sampling parameter '{k}'" + (f" (did you mean '{hint}'?)" if hint else ""))
            out[k] = v
        return cls(**out)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SequenceSampler:
    """The per-sequence sampling state: seeded generator and token counts for the penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device="cpu"):
        self.p = params
        self.device = torch.device(device)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(int(seed))
        self.vocab_size = vocab_size
        self.out_counts = None
        self.seen = None
        if params.needs_penalties:
            self.out_counts = torch.zeros(vocab_size, device=self.device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if prompt_ids:
                ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long, device=self.device)
                self.seen[ids] = True
        self.n_out = 0
        self.suppress: list[int] = []  # token ids masked out (EOS/stop ids before min_tokens)

    def observe(self, token: int) -> None:
        self.n_out += 1
        if self.out_counts is not None and 0 <= token < self.vocab_size:
            # The counts may have been made inside torch.inference_mode (an engine thread, a caller's
            # context) and be updated outside it, or the reverse: update in inference mode, where an in-place
            # write is allowed on both inference and normal tensors.
            with torch.inference_mode():
                self.out_counts[token] += 1
                self.seen[token] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) raw logits -> processed fp32 logits (penalties, temperature, truncation).

        Never writes into ``logits``: they are the model's output (an inference tensor, and the raw
        distribution that ``token_logprobs`` reports after the choice), so every step below makes new
        tensors."""
        p = self.p
        x = logits.float()  # the same tensor when logits are fp32: only out-of-place ops on x below
        if self.out_counts is not None:
            if p.repetition_penalty != 1.0:
                rp = p.repetition_penalty
                x = torch.where(self.seen, torch.where(x > 0, x / rp, x * rp), x)
            if p.frequency_penalty or p.presence_penalty:
                x = x - p.frequency_penalty * self.out_counts - p.presence_penalty * (self.out_counts > 0).float()
        if self.suppress:
            x = x.index_fill(0, torch.tensor(self.suppress, device=x.device), float("-inf"))
        if p.greedy:
            return x
        x = x / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, -1)
            cum = probs.cumsum(-1)
            drop = (cum - probs) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
        if p.min_p > 0:
            probs = torch.softmax(x, -1)
            x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return x

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from (V,) raw logits."""
        x = self.process(logits)
        if self.p.greedy:
            if x.device.type == "cpu":  # numpy's argmax has less per-call overhead than torch's (same ties: first)
                return int(x.detach().numpy().argmax())
            return int(torch.argmax(x))
        probs = torch.softmax(x, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The raw distribution's log-probability of ``token`` and the top ``k`` (id, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), -1)
    top: list[tuple[int, float]] = []
    if k > 0:
        v, i = torch.topk(lp, k)
        top = [(int(a), float(b)) for a, b in zip(i.tolist(), v.tolist())]
    return float(lp[token]), top
