"""Shared pieces of the trainer tests: a tiny learnable dataset and a tiny run config."""

from __future__ import annotations

import torch

from mptkit.train.config import config_from_dict
from mptkit.train.data import TensorDataset

TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 32,
              "vocab_size": 64, "learned_pos_emb": False, "attn_config": {"alibi": True, "attn_impl": "torch"}}


def pattern_data(n: int = 64, seq: int = 32, period: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows of a repeating random pattern at random phases: easy to learn, so loss must drop."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(2, 64, (period,), generator=g)
    phase = torch.randint(0, period, (n,), generator=g)
    idx = (phase[:, None] + torch.arange(seq)[None]) % period
    return base[idx]


def tiny_run(tmp, **over) -> dict:
    d = {"model": dict(TINY_MODEL), "max_duration": "12ba", "global_train_batch_size": 8,
         "device_train_microbatch_size": 4, "optimizer": {"name": "decoupled_adamw", "lr": 3e-3},
         "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
         "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
         "eval_interval": "0ba", "save_interval": "4ba", "save_folder": str(tmp / "ck"), "run_folder": str(tmp / "run"),
         "progress_bar": False, "log_to_console": False, "run_name": "t", "peak_tflops": 1.0, "torch_threads": 1,
         "seed": 5}
    for k, v in over.items():
        d[k] = v
    return d


def make_cfg(tmp, **over):
    return config_from_dict(tiny_run(tmp, **over))


def datasets(n: int = 64):
    x = pattern_data(n)
    return TensorDataset(x), TensorDataset(pattern_data(16, seed=0))
