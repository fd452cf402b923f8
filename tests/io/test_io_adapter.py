"""Adapter folders in peft's format, checked against peft itself on transformers' MptForCausalLM."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import MptConfig
from transformers import MptForCausalLM as HFMpt

from mptkit.errors import CheckpointError
from mptkit.io.adapter import load_adapter, save_adapter
from mptkit.model import MPTForCausalLM
from mptkit.model.lora import LoRALinear, LoraSettings, apply_lora, base_fingerprint


def _hf_base(tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=300, max_seq_len=64, expansion_ratio=4,
                    attn_config={"alibi": True})
    hf = HFMpt(cfg).eval()
    folder = tmp_path / f"base{seed}"
    hf.save_pretrained(folder)
    return folder


def _randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_mptkit_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    base = _hf_base(tmp_path)
    ours = MPTForCausalLM.from_pretrained(base).eval()
    fp = base_fingerprint(ours)
    apply_lora(ours, LoraSettings.from_dict({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                             "modules_to_save": ["norm_f"]}))
    _randomise(ours)
    with torch.no_grad():
        ours.transformer.norm_f.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "adapter", base_folder=base, fingerprint=fp)
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight" in keys
    hf = peft.PeftModel.from_pretrained(HFMpt.from_pretrained(base), str(tmp_path / "adapter")).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
        plain = HFMpt.from_pretrained(base).eval()(x).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapter changes the logits
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_mptkit_with_the_same_logits(tmp_path, rslora):
    base = _hf_base(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["Wqkv", "out_proj", "up_proj", "down_proj"],
                          lora_dropout=0.05, use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    hf = peft.get_peft_model(HFMpt.from_pretrained(base), cfg).eval()
    with torch.no_grad():  # larger updates than peft's init_lora_weights=False gives a 64-wide model
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.mul_(3)
    hf.save_pretrained(tmp_path / "peft")
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.blocks.1.ffn.down_proj.lora_B.weight" in saved
    ours = load_adapter(MPTForCausalLM.from_pretrained(base).eval(), tmp_path / "peft")
    assert ours.transformer.blocks[0].attn.Wqkv.scaling == pytest.approx(16 / (2 if rslora else 4))
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
        plain = HFMpt.from_pretrained(base).eval()(x).logits
    assert (ref - plain).abs().max() > 1e-2
    assert (ref - got).abs().max().item() <= 1e-5


def test_adapter_refused_on_another_base_or_shape(tmp_path):
    a, b = _hf_base(tmp_path, 0), _hf_base(tmp_path, 1)
    ours = MPTForCausalLM.from_pretrained(a)
    fp = base_fingerprint(ours)
    apply_lora(ours, LoraSettings())
    save_adapter(ours, tmp_path / "ad", base_folder=a, fingerprint=fp)
    with pytest.raises(CheckpointError, match="trained on another base model.*pass the base model"):
        load_adapter(MPTForCausalLM.from_pretrained(b), tmp_path / "ad")
    # another shape (d_model 96): named tensor and shapes
    torch.manual_seed(0)
    wide = HFMpt(MptConfig(d_model=96, n_heads=4, n_layers=2, vocab_size=300, max_seq_len=64))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"Wqkv.lora_A.weight has shape \(8, 64\).*needs \(8, 96\)"):
        load_adapter(MPTForCausalLM.from_pretrained(tmp_path / "wide"), tmp_path / "ad", check=False)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    # an adapter folder opens as its recorded base + the adapter; exporters that cannot carry it refuse it
    from mptkit.errors import ExportError
    from mptkit.export.gguf import export_gguf
    from mptkit.io.source import open_model_source

    with open_model_source(tmp_path / "ad") as src:
        assert src.folder.resolve() == a.resolve() and src.adapter == tmp_path / "ad"
        with pytest.raises(CheckpointError, match="quantised base"):
            src.load_model(quant="int8")
    with pytest.raises(ExportError, match="--merge"):
        export_gguf(tmp_path / "ad", tmp_path / "x.gguf")
