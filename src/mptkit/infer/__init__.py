"""Inference: KV cache, sampling, batched generation, chat, the continuous-batching engine and the
OpenAI-compatible server.

Quick use::

    from mptkit.infer import generate_text
    text = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=32)
"""

from mptkit.infer.cache import KVCache
from mptkit.infer.generate import GenerationOutput, Generator, generate_text
from mptkit.infer.options import DecodeOptions
from mptkit.infer.sampling import SamplingParams

__all__ = ["DecodeOptions", "GenerationOutput", "Generator", "KVCache", "SamplingParams", "generate_text"]
