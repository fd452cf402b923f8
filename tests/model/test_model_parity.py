"""mptkit's MPT against the independent reference, transformers' MptForCausalLM, in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MptConfig
from transformers import MptForCausalLM as HFMpt

from mptkit.model import MPTForCausalLM
from tests.helpers import NORMS, spread_weights


def _hf_model(tmp_path, *, d=96, h=6, layers=2, vocab=300, seq=64, clip=None, tie=True, bias_max=8):
    cfg = MptConfig(d_model=d, n_heads=h, n_layers=layers, vocab_size=vocab, max_seq_len=seq,
                    tie_word_embeddings=tie,
                    attn_config={"alibi": True, "clip_qkv": clip, "alibi_bias_max": bias_max})
    model = HFMpt(cfg).eval()
    spread_weights(model, NORMS)  # HF's init is tiny (std 0.02): use larger weights so attention patterns matter
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


SHAPES = [
    {"d": 96, "h": 6, "layers": 2},  # non-power-of-two heads: MPT's slope interleave
    {"d": 64, "h": 4, "layers": 3, "clip": 0.6},  # clip_qkv
    {"d": 120, "h": 5, "layers": 2, "clip": 1.0, "vocab": 257},
    {"d": 64, "h": 8, "layers": 2, "tie": False},  # untied lm_head
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_hf_checkpoint_loads_with_same_logits_and_loss(tmp_path, shape):
    hf, folder = _hf_model(tmp_path, **shape)
    ours = MPTForCausalLM.from_pretrained(folder)
    x = torch.randint(0, hf.config.vocab_size, (3, 50))
    with torch.no_grad():
        ref = hf(x, labels=x)
        for impl in ("torch", "sdpa"):
            ours.set_attn_impl(impl)
            got = ours(x, labels=x)
            assert (ref.logits - got.logits).abs().max().item() <= 1e-4, impl
            assert abs(ref.loss.item() - got.loss.item()) <= 1e-5, impl
    # A sanity check that the comparison is not trivially satisfied.
    assert ref.logits.std() > 0.5


def test_mptkit_save_loads_in_transformers_without_remote_code(tmp_path):
    from tests.helpers import tiny_cfg

    ours = MPTForCausalLM(tiny_cfg(expansion_ratio=4, attn_config={"clip_qkv": 2.0})).eval()
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["MptForCausalLM"] and "auto_map" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(hf).__name__ == "MptForCausalLM"
    x = torch.randint(0, 211, (2, 40))
    with torch.no_grad():
        a = hf(x, labels=x)
        b = ours(x, labels=x)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_mosaicml_original_layout_loads_and_runs(tmp_path):
    """A config.json with the structure of mosaicml/mpt-7b's (tiny sizes), weights from a HF model."""
    hf, folder = _hf_model(tmp_path, d=64, h=4, layers=2, vocab=256, seq=128)
    mosaic = {
        "architectures": ["MPTForCausalLM"],
        "attn_config": {
            "alibi": True, "alibi_bias_max": 8, "attn_impl": "triton", "attn_pdrop": 0,
            "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
            "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
        },
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                     "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "d_model": 64, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
        "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                        "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu",
                        "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0},
        "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 128,
        "model_type": "mpt", "n_heads": 4, "n_layers": 2, "no_bias": True,
        "norm_type": "low_precision_layernorm", "resid_pdrop": 0, "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "bfloat16", "transformers_version": "4.28.1", "use_cache": False, "verbose": 0,
        "vocab_size": 256,
    }
    (folder / "config.json").write_text(json.dumps(mosaic))
    ours = MPTForCausalLM.from_pretrained(folder)
    assert ours.config.layout == "mosaicml" and ours.config.alibi and not ours.config.use_learned_pos_emb
    x = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max().item() <= 1e-4
    # Saving keeps the original layout and every key, unknown ones included.
    ours.save_pretrained(tmp_path / "resaved")
    back = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert back["architectures"] == ["MPTForCausalLM"] and back["auto_map"] == mosaic["auto_map"]
    for k in ("tokenizer_name", "verbose", "torch_dtype", "learned_pos_emb"):
        assert back[k] == mosaic[k], k
    assert back["init_config"]["verbose"] == 0 and back["attn_config"]["attn_impl"] == "triton"


def test_mpt7b_recipe_on_meta_has_exact_parameter_count():
    from mptkit.model import load_model_config

    cfg = load_model_config("mpt-7b")
    cfg.init_device = "meta"
    m = MPTForCausalLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    assert m.num_params() == 6_649_286_656
    # llm-foundry's FLOPs formula at T=2048: 6N + 12 * L * d * T per token
    assert m.flops_per_token(2048) == 6 * 6_649_286_656 + 12 * 32 * 4096 * 2048
