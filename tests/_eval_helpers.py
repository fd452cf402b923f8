"""Shared pieces of the evaluation tests: a tiny model folder with a freshly trained tokenizer."""

from __future__ import annotations

import torch

from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from tests.conftest import tiny_cfg

VOCAB = 448  # the test tokenizer has 400 tokens


def model_folder(tmp_path, make_tokenizer, *, name="model", scale=True, **over):
    """A random tiny MPT saved with a freshly trained tokenizer; with ``scale`` the weights are drawn larger
    than MPT's init so that predictions (and choices' scores) clearly differ."""
    model = MPTForCausalLM(tiny_cfg(vocab_size=VOCAB, **over)).eval()
    if scale:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3 if "wte" in n else 0.12)
    folder = tmp_path / name
    model.save_pretrained(folder, tokenizer=load_tokenizer(make_tokenizer()))
    return folder
