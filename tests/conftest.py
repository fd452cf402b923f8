"""Shared fixtures: small models and data that the tests create themselves (no network)."""

from __future__ import annotations

import os

import pytest
import torch

# tests/_strict_skips.py: MPTKIT_STRICT_SKIPS=1 (CI) fails the run on a skip not on its allow-list
pytest_plugins = ["pytester", "tests._strict_skips"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def tiny_cfg(**over):
    """A tiny MPT config dict (fast on CPU); keyword overrides merge into attn_config/ffn_config."""
    d = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "expansion_ratio": 2,
        "max_seq_len": 64,
        "vocab_size": 211,
        "no_bias": True,
        "learned_pos_emb": False,
        "attn_config": {"alibi": True, "attn_impl": "torch"},
    }
    for k, v in over.items():
        if k in ("attn_config", "ffn_config", "init_config"):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return d


@pytest.fixture
def make_tokenizer(tmp_path):
    """Train a tiny byte-level BPE on text from the standard library and save it as an HF folder."""

    def _make(folder=None, vocab_size=400):
        import inspect
        import json

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        text = inspect.getsource(json) + inspect.getsource(inspect)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text.splitlines(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")
        folder = folder or (tmp_path / "tok")
        fast.save_pretrained(str(folder))
        return folder

    return _make
