"""Evaluation: perplexity with sliding windows, the long-context loss curve, in-context-learning accuracy.

    from mptkit.eval import perplexity, long_context_curve, icl_accuracy, load_token_stream

* :func:`perplexity` (``mptkit eval perplexity``): token-level loss / perplexity / bits per byte of a text
  or token stream, every token scored once, with at least ``max_seq_len - stride`` tokens of context after the
  first window.
* :func:`long_context_curve` (``mptkit eval long-context``): mean loss per position bucket for windows of
  several lengths (past ``max_seq_len`` for ALiBi models).
* :func:`icl_accuracy` (``mptkit eval icl``): accuracy on llm-foundry's four ICL JSONL task types, zero- or
  few-shot, with llm-foundry's prompt construction.
* :func:`load_eval_config` / :func:`parse_icl_tasks` (``mptkit eval icl --config``): llm-foundry's
  ``icl_tasks`` YAML; :func:`evaluate_icl_tasks` runs it; :func:`aggregate` is llm-foundry's Eval Gauntlet.

All of them score tokens through :func:`mptkit.eval.scoring.next_token_logprobs`, which never holds the
(B, T, V) logits. See docs/evaluation.md.
"""

from mptkit.eval.data import TokenStream, encode_texts, load_token_stream
from mptkit.eval.gauntlet import GauntletConfig, GauntletResult, aggregate, load_gauntlet, parse_gauntlet
from mptkit.eval.icl import ICLResult, ICLTask, build_prompt, icl_accuracy, read_icl_jsonl
from mptkit.eval.icl_tasks import (
    ICLTaskConfig,
    TaskResult,
    evaluate_icl_tasks,
    load_eval_config,
    load_icl_tasks,
    parse_icl_tasks,
)
from mptkit.eval.long_context import LengthResult, long_context_curve
from mptkit.eval.perplexity import PerplexityResult, perplexity, sliding_windows
from mptkit.eval.scoring import load_model, next_token_logprobs

__all__ = [
    "GauntletConfig",
    "GauntletResult",
    "ICLResult",
    "ICLTask",
    "ICLTaskConfig",
    "LengthResult",
    "PerplexityResult",
    "TaskResult",
    "TokenStream",
    "aggregate",
    "build_prompt",
    "encode_texts",
    "evaluate_icl_tasks",
    "icl_accuracy",
    "load_eval_config",
    "load_gauntlet",
    "load_icl_tasks",
    "load_model",
    "load_token_stream",
    "long_context_curve",
    "next_token_logprobs",
    "parse_gauntlet",
    "parse_icl_tasks",
    "perplexity",
    "read_icl_jsonl",
    "sliding_windows",
]
