"""Small models for the export tests: a seeded random mptkit model saved with a trained BPE tokenizer."""

from __future__ import annotations

import torch

from mptkit.model import MPTForCausalLM
from tests.conftest import tiny_cfg

VOCAB = 448  # the fixture tokenizer has 400 tokens: 48 embedding rows past it (padded, as MPT-7B's 50432)


def make_model(folder, tok_folder=None, *, seed=0, scale_weights=True, **over):
    """An MPT model with ``tiny_cfg(**over)`` (vocab 448), weights seeded, saved to ``folder`` with the
    tokenizer files of ``tok_folder`` (if given). Weights are drawn a little larger than MPT's init so that
    attention patterns and the ALiBi bias matter to the logits."""
    over.setdefault("vocab_size", VOCAB)
    torch.manual_seed(seed)
    model = MPTForCausalLM(tiny_cfg(**over)).eval()
    if scale_weights:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.5 if "wte" in n or "wpe" in n else 0.15)
                elif n.endswith("bias"):
                    p.normal_(0, 0.1)
                else:
                    p.uniform_(0.6, 1.4)
    model.save_pretrained(folder, tokenizer=str(tok_folder) if tok_folder is not None else None)
    return model
