"""LoRA adapters (model/lora.py): exactness at B=0, merging, peft's name matching, bad settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mptkit.errors import ConfigError
from mptkit.model.fastpath import block_coverage, mlp_reason, model_coverage
from mptkit.model.lora import (
    LoRALinear,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    base_fingerprint,
    merge_lora,
    param_counts,
)
from tests.helpers import tiny_model


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_fresh_adapter_is_exactly_the_base_and_only_adapters_train():
    model = tiny_model()
    x = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        ref = model(x).logits
    wrapped = apply_lora(model, LoraSettings.from_dict({"r": 4, "lora_alpha": 8}))
    assert len(wrapped) == 2 * 4  # Wqkv, out_proj, up_proj, down_proj in each of 2 blocks
    with torch.no_grad():
        got = model(x).logits
    assert torch.equal(got, ref)  # B = 0: bitwise the base model
    trainable, _ = param_counts(model)
    assert trainable == sum(m.lora_A.weight.numel() + m.lora_B.weight.numel()
                            for m in model.modules() if isinstance(m, LoRALinear))
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # peft's names (transformers' MptForCausalLM module paths)
    keys = set(adapter_state_dict(model))
    assert "base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight" in keys
    assert "base_model.model.transformer.blocks.1.ffn.down_proj.lora_B.weight" in keys


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged_and_the_fast_paths_step_aside(rslora):
    model = tiny_model(spread=None)  # MPT's init: logits of order 1, so 1e-5 is fp32 rounding
    apply_lora(model, LoraSettings.from_dict({"r": 4, "lora_alpha": 16, "use_rslora": rslora, "lora_dropout": 0.1}))
    _randomise_adapters(model)
    # the decoder / kernels / chunked MLP do not cover the wrapped Linears: the model's forward runs them
    assert not model_coverage(model).fast
    assert "Wqkv" in block_coverage(model.transformer.blocks[0]).reason
    assert mlp_reason(model.transformer.blocks[0].ffn) is not None
    x = torch.randint(0, 211, (2, 30))
    base = tiny_model(spread=None)
    with torch.no_grad():
        unmerged = model(x).logits
        b = base(x).logits
    assert (unmerged - b).abs().max() > 1e-2  # the adapter changes the output
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model_coverage(model).fast
    with torch.no_grad():
        merged = model(x).logits
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_the_adapter_trains_through_the_chunked_mlp_sized_batch():
    # rows above the chunked MLP's threshold: the wrapped up/down projections must still get gradients
    from mptkit.model.fastpath import FastPathOptions

    model = tiny_model().train()
    model.set_fast_paths(FastPathOptions(mlp_chunk=8))
    apply_lora(model, LoraSettings.from_dict({"r": 2}))
    x = torch.randint(0, 211, (2, 30))
    model(x, labels=x).loss.backward()
    a = model.transformer.blocks[0].ffn.up_proj.lora_A.weight
    b = model.transformer.blocks[0].ffn.up_proj.lora_B.weight
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert a.grad is not None  # zero while B = 0, as in peft
    assert model.transformer.wte.weight.grad is None


def test_target_modules_match_as_peft_matches():
    m = tiny_model()
    assert len(apply_lora(m, LoraSettings.from_dict({"target_modules": ["attn.Wqkv"]}))) == 2
    m = tiny_model()
    assert apply_lora(m, LoraSettings.from_dict({"target_modules": r".*\.1\.ffn\.up_proj"})) == [
        "transformer.blocks.1.ffn.up_proj"]
    m = tiny_model()
    apply_lora(m, LoraSettings.from_dict({"target_modules": ["Wqkv"], "modules_to_save": ["norm_f"]}))
    assert m.transformer.norm_f.weight.requires_grad
    assert "base_model.model.transformer.norm_f.weight" in adapter_state_dict(m)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"matches no Linear.*\['Wqkv', 'down_proj', 'out_proj', 'up_proj'\]"):
        apply_lora(tiny_model(), LoraSettings.from_dict({"target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ConfigError, match="unknown key 'lora_alpa'.*lora_alpha"):
        LoraSettings.from_dict({"lora_alpa": 16})
    with pytest.raises(ConfigError, match="peft_type"):
        LoraSettings.from_dict({"peft_type": "IA3"})
    with pytest.raises(ConfigError, match=r"\.r: the rank"):
        LoraSettings.from_dict({"r": 0})
    with pytest.raises(ConfigError, match="use_dora"):
        LoraSettings.from_dict({"use_dora": True})
    with pytest.raises(ConfigError, match="modules_to_save: 'norm_x' names no module"):
        apply_lora(tiny_model(), LoraSettings.from_dict({"modules_to_save": ["norm_x"]}))
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(tiny_model(), LoraSettings.from_dict({"modules_to_save": ["wte"]}))


def test_base_fingerprint_tells_bases_apart():
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    fa = base_fingerprint(a)
    assert fa == base_fingerprint(tiny_model(seed=0)) and fa != base_fingerprint(b)
    apply_lora(a, LoraSettings())
    assert base_fingerprint(a) == fa  # the adapters are not part of the base


def test_base_held_in_bf16_adapters_fp32():
    model = tiny_model()
    apply_lora(model, LoraSettings.from_dict({"base_dtype": "bf16", "r": 2}))
    lin = model.transformer.blocks[0].attn.Wqkv
    assert lin.base_layer.weight.dtype == torch.bfloat16 and lin.lora_A.weight.dtype == torch.float32
    x = torch.randint(0, 211, (1, 10))
    out = model(x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.float32 and lin.lora_B.weight.grad is not None
    assert isinstance(model.transformer.blocks[0].norm_1, nn.Module)
