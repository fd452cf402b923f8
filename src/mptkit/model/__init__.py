"""The MPT model: config, attention, blocks, the causal LM, init (files on disk: :mod:`mptkit.io`)."""

from mptkit.model.attention import alibi_slopes, attention
from mptkit.model.config import MPTConfig, load_model_config
from mptkit.model.model import CausalLMOutput, MPTForCausalLM

__all__ = [
    "CausalLMOutput",
    "MPTConfig",
    "MPTForCausalLM",
    "alibi_slopes",
    "attention",
    "load_model_config",
]
