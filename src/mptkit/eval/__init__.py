"""Evaluation: perplexity with sliding windows, the long-context loss curve, in-context-learning accuracy.

    from mptkit.eval import perplexity, long_context_curve, icl_accuracy, load_token_stream

* :func:`perplexity` (``mptkit eval perplexity``): token-level loss / perplexity / bits per byte of a text
  or token stream, every token scored once, with at least ``max_seq_len - stride`` tokens of context after the
  first window.
* :func:`long_context_curve` (``mptkit eval long-context``): mean loss per position bucket for windows of
  several lengths (past ``max_seq_len`` for ALiBi models).
* :func:`icl_accuracy` (``mptkit eval icl``): accuracy on llm-foundry's ``language_modeling`` and
  ``multiple_choice`` JSONL tasks, zero- or few-shot.

All of them score tokens through :func:`mptkit.eval.scoring.next_token_logprobs`, which never holds the
(B, T, V) logits. See docs/evaluation.md.
"""

from mptkit.eval.data import TokenStream, encode_texts, load_token_stream
from mptkit.eval.icl import ICLResult, ICLTask, build_prompt, icl_accuracy, read_icl_jsonl
from mptkit.eval.long_context import LengthResult, long_context_curve
from mptkit.eval.perplexity import PerplexityResult, perplexity, sliding_windows
from mptkit.eval.scoring import load_model, next_token_logprobs

__all__ = [
    "ICLResult",
    "ICLTask",
    "LengthResult",
    "PerplexityResult",
    "TokenStream",
    "build_prompt",
    "encode_texts",
    "icl_accuracy",
    "load_model",
    "load_token_stream",
    "long_context_curve",
    "next_token_logprobs",
    "perplexity",
    "read_icl_jsonl",
    "sliding_windows",
]
