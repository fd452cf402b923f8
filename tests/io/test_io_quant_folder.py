"""Quantised model folders (``mptkit.io.quant_folder``): saved and loaded back exactly, quantising while loading
equals quantising the loaded model, a mismatched format version or entry is one clear error, and the CLI's
``--quant`` / ``mptkit export quant`` run end to end with their bad inputs refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mptkit.cli import main
from mptkit.errors import CheckpointError, ConfigError
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from mptkit.model.quant import QuantLinear, quantize_model
from tests.helpers import tiny_cfg

X = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(0))


def _fp32(tmp_path, **over):
    torch.manual_seed(0)
    m = MPTForCausalLM(tiny_cfg(**over)).eval()
    d = tmp_path / "fp32"
    m.save_pretrained(d)
    return m, d


def _equal_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_saved_and_loaded_back_exactly(tmp_path):
    m, _ = _fp32(tmp_path, no_bias=False)
    quantize_model(m)
    m.save_pretrained(tmp_path / "q")
    entry = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert entry["version"] == 2 and entry["type"] == "int8" and len(entry["quantized"]) == 8
    assert entry["head"] == "q8_0"  # the tied LM head's q8_0 copy, the embedding kept fp32 for the lookup
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.blocks.0.attn.Wqkv.weight_q").dtype == torch.int8
        assert f.get_tensor("transformer.blocks.0.attn.Wqkv.scales").dtype == torch.float16
        assert f.get_tensor("transformer.blocks.0.attn.Wqkv.bias").dtype == torch.float32
    assert "transformer.blocks.0.attn.Wqkv.weight" not in names and "transformer.wte.weight" in names
    assert {"quant_head.weight_q", "quant_head.scales"} <= names
    back = MPTForCausalLM.from_pretrained(tmp_path / "q")  # default dtype fp32: the scales stay fp16
    assert type(back.transformer.blocks[1].ffn.down_proj) is QuantLinear
    assert _equal_state(m, back)
    assert back.config.extra["quantization"] == entry
    with torch.no_grad():
        assert torch.equal(back(X).logits, m(X).logits)
    # loading it asking for its own type is fine; a quantised folder re-saved is the same folder
    again = MPTForCausalLM.from_pretrained(tmp_path / "q", quant="int8")
    assert _equal_state(m, again)


def test_the_tied_head_is_a_q8_0_copy_and_version_1_folders_still_load(tmp_path):
    """--quant int8 / q4: the tied LM head's logits come from a q8_0 copy of wte (llama.cpp's q8_0 files quantise
    token_embd as q8_0 too), the lookup from the fp32 embedding; ``head=False`` keeps the head fp32. A version-1
    folder (written before the head was quantised: no ``head`` key, no quant_head tensors) loads as it was."""
    from mptkit.model.quant import dequantize_weight, quantize_weight

    for quant in ("int8", "q4"):
        m, _ = _fp32(tmp_path, no_bias=False)
        wte = m.transformer.wte.weight.detach().clone()
        quantize_model(m, quant)
        q, s = quantize_weight(wte, "q8_0")
        assert torch.equal(m.quant_head.weight_q, q) and torch.equal(m.quant_head.scales, s)
        assert torch.equal(m.transformer.wte.weight, wte)  # the lookup's table unchanged
        with torch.no_grad():
            h = m.transformer(X, slopes=m.slopes)
            torch.testing.assert_close(m(X).logits, h @ dequantize_weight(q, s, "q8_0").t(), rtol=1e-5, atol=1e-5)
            assert m.num_params() == MPTForCausalLM(tiny_cfg(no_bias=False)).num_params()  # a copy, not params
    kept, _ = _fp32(tmp_path)
    rep = quantize_model(kept, "int8", head=False)
    assert rep.head is None and getattr(kept, "quant_head", None) is None
    kept.save_pretrained(tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    cfg["quantization"]["version"] = 1
    del cfg["quantization"]["head"]  # what a version-1 writer wrote
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    back = MPTForCausalLM.from_pretrained(tmp_path / "v1")
    assert getattr(back, "quant_head", None) is None and _equal_state(kept, back)
    with torch.no_grad():
        assert torch.equal(back(X).logits, kept(X).logits)


def test_quantising_while_loading_equals_quantising_the_loaded_model(tmp_path):
    _, d = _fp32(tmp_path, d_model=48, n_heads=3)  # some Linears do not fit the blocks: kept fp32 either way
    streamed = MPTForCausalLM.from_pretrained(d, quant="int8")
    after = MPTForCausalLM.from_pretrained(d)
    quantize_model(after)
    assert _equal_state(streamed, after)
    assert streamed.config.extra["quantization"] == after.config.extra["quantization"]
    assert type(streamed.transformer.blocks[0].attn.Wqkv) is torch.nn.Linear
    assert type(streamed.transformer.blocks[0].ffn.down_proj) is QuantLinear


def _quantised_folder(tmp_path):
    m, _ = _fp32(tmp_path)
    quantize_model(m)
    m.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": 3}, r"format version 3, this mptkit reads versions 1, 2 \(a newer mptkit wrote it: upgrade"),
        (
            {"version": 0},
            r"format version 0, this mptkit reads versions 1, 2 \(re-quantise it from the fp32 model",
        ),
        ({"format": "gptq"}, "has format 'gptq'"),
        ({"block_size": 64}, "block_size 64 is not one this mptkit reads"),
        (
            {"quantized": ["transformer.blocks.7.attn.Wqkv"]},
            "names transformer.blocks.7.attn.Wqkv, which this model",
        ),
    ],
)
def test_a_mismatched_entry_is_one_clear_error(tmp_path, change, match):
    q = _quantised_folder(tmp_path)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization"].update(change)
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        MPTForCausalLM.from_pretrained(q)


def test_unknown_quant_name_on_load(tmp_path):
    _, d = _fp32(tmp_path)
    with pytest.raises(ConfigError, match="unknown quantisation type 'q3'"):
        MPTForCausalLM.from_pretrained(d, quant="q3")


def test_cli_export_quant_then_generate_and_bad_inputs(tmp_path, make_tokenizer, capsys):
    tok = load_tokenizer(make_tokenizer())
    torch.manual_seed(0)
    src = tmp_path / "m"
    MPTForCausalLM(tiny_cfg(vocab_size=len(tok), max_seq_len=128)).save_pretrained(src, tokenizer=tok)
    out = tmp_path / "m-int8"
    assert main(["export", "quant", str(src), str(out), "--quant", "int8"]) == 0
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["type"] == "int8"
    fp32_bytes = (src / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < fp32_bytes
    capsys.readouterr()
    args = ["--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos", "--quiet-stats"]
    assert main(["generate", str(out), *args]) == 0
    from_folder = capsys.readouterr().out
    assert main(["generate", str(src), "--quant", "int8", *args]) == 0
    assert capsys.readouterr().out == from_folder  # the same int8 model either way
    # bad inputs: one line, exit 2, nothing written
    assert main(["generate", str(src), "--quant", "q3", *args]) == 2
    assert "unknown quantisation type 'q3'" in capsys.readouterr().err
    assert main(["export", "quant", str(src), str(tmp_path / "bad"), "--quant", "q3"]) == 2
    assert "unknown quantisation type 'q3'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["generate", str(out), "--quant", "q4", *args]) == 2  # an int8 folder is not re-quantised
    assert "already quantised (int8)" in capsys.readouterr().err
    assert main(["export", "hf", str(out), str(tmp_path / "hf")]) == 2
    assert "quantised folder" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    assert (
        main(["eval", "perplexity", str(src), "--data", str(text), "--quant", "int8", "--device", "cpu"]) == 0
    )
    assert (
        main(["eval", "perplexity", str(src), "--data", str(text), "--quant", "q3", "--device", "cpu"]) == 2
    )
    assert "unknown quantisation type 'q3'" in capsys.readouterr().err


def test_q4_folder_saved_loaded_and_through_the_cli(tmp_path, make_tokenizer, capsys):
    """A q4_0 folder: packed uint8 nibbles + fp16 scales on disk, loaded back exactly; `mptkit export quant
    --type q4_0` equals `--quant q4` while loading; generate runs on it; an entry whose block does not match
    its type is refused."""
    tok = load_tokenizer(make_tokenizer())
    torch.manual_seed(0)
    src = tmp_path / "m"
    m = MPTForCausalLM(tiny_cfg(vocab_size=len(tok), max_seq_len=128, no_bias=False)).eval()
    m.save_pretrained(src, tokenizer=tok)
    out = tmp_path / "m-q4"
    assert main(["export", "quant", str(src), str(out), "--type", "q4_0"]) == 0
    entry = json.loads((out / "config.json").read_text())["quantization"]
    assert entry["type"] == "q4" and entry["block"] == "q4_0" and len(entry["quantized"]) == 8
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        wq = f.get_tensor("transformer.blocks.0.ffn.up_proj.weight_q")
        assert wq.dtype == torch.uint8 and tuple(wq.shape) == (2 * 64, 64 // 2)  # expansion 2
        assert f.get_tensor("transformer.blocks.0.ffn.up_proj.scales").dtype == torch.float16
    back = MPTForCausalLM.from_pretrained(out)
    quantize_model(m, "q4")
    assert _equal_state(m, back) and type(back.transformer.blocks[0].attn.Wqkv) is QuantLinear
    assert _equal_state(MPTForCausalLM.from_pretrained(src, quant="q4_0"), back)
    capsys.readouterr()
    args = ["--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos", "--quiet-stats"]
    assert main(["generate", str(out), *args]) == 0
    from_folder = capsys.readouterr().out
    assert main(["generate", str(src), "--quant", "q4", *args]) == 0
    assert capsys.readouterr().out == from_folder
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"]["block"] = "q8_0"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="type 'q4' / block 'q8_0'"):
        MPTForCausalLM.from_pretrained(out)


def test_unmapped_reader_equals_safetensors_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from mptkit.io.quant_folder import read_safetensors_unmapped

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(5, 7, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int8).reshape(2, 3),
        "d": torch.randn(4, 2, generator=g).half(),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }
    f = tmp_path / "t.safetensors"
    save_file(tensors, str(f))
    got = dict(read_safetensors_unmapped(f))
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        list(read_safetensors_unmapped(f))
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        list(read_safetensors_unmapped(f))


def test_random_quantized_model_is_built_quantised_and_saves_as_a_folder(tmp_path):
    """bench/bench_quant_7b.py's builder: a random-init model streamed through the quantising loader (no fp32
    model ever built) — the same as quantising that model, saved and loaded back exactly."""
    from mptkit.io.quant_folder import random_quantized_model
    from mptkit.model.config import MPTConfig

    cfg = MPTConfig.from_dict(tiny_cfg(no_bias=False))
    m = random_quantized_model(cfg, "q4", seed=3)
    blk = m.transformer.blocks[0]
    assert type(blk.attn.Wqkv) is QuantLinear and blk.attn.Wqkv.block == "q4_0"
    assert float(blk.norm_1.weight.detach().min()) == 1.0 and float(blk.attn.Wqkv.bias.detach().abs().max()) == 0.0
    assert 0.015 < float(m.transformer.wte.weight.detach().std()) < 0.025
    assert m.config.extra["quantization"]["type"] == "q4"
    m.save_pretrained(tmp_path / "r")
    back = MPTForCausalLM.from_pretrained(tmp_path / "r")
    assert _equal_state(m, back)
    with torch.no_grad():
        assert torch.equal(back(X).logits, m(X).logits)
    assert _equal_state(random_quantized_model(cfg, "q4", seed=3), m)  # seeded
