"""Checkpoint I/O and config handling: round trips, shards, .bin files, tokenizers, and bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from mptkit.errors import CheckpointError, ConfigError
from mptkit.io import load_tokenizer
from mptkit.model import MPTConfig, MPTForCausalLM
from tests.helpers import tiny_cfg


@pytest.fixture
def saved(tmp_path):
    model = MPTForCausalLM(tiny_cfg()).eval()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    return model, folder


def _same(a, b):
    ids = torch.randint(0, a.config.vocab_size, (2, 12))
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def test_save_load_round_trip_is_exact(saved):
    model, folder = saved
    back = MPTForCausalLM.from_pretrained(folder)
    assert _same(model, back)
    assert "lm_head.weight" not in __import__("safetensors.torch").torch.load_file(str(folder / "model.safetensors"))


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = MPTForCausalLM(tiny_cfg(tie_word_embeddings=False)).eval()
    model.save_pretrained(tmp_path / "s", max_shard_size="40KB")
    idx = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "s" / f).exists() for f in shards)
    assert not (tmp_path / "s" / "model.safetensors").exists()
    assert _same(model, MPTForCausalLM.from_pretrained(tmp_path / "s"))
    # Re-saving as a single file removes the old shards and index.
    model.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "s").glob("model-*-of-*.safetensors"))


def test_pytorch_bin_loads_with_weights_only(tmp_path, saved):
    model, folder = saved
    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), binf / "pytorch_model.bin")
    assert _same(model, MPTForCausalLM.from_pretrained(binf))


def test_pickled_non_tensor_bin_is_refused(tmp_path, saved):
    """A .bin holding arbitrary pickled objects is refused by weights_only loading, not executed."""
    _, folder = saved
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((folder / "config.json").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Boom()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        MPTForCausalLM.from_pretrained(evil)


def test_missing_tensor_is_named(saved):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    sd = load_file(str(folder / "model.safetensors"))
    del sd["transformer.blocks.1.ffn.up_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): transformer\.blocks\.1\.ffn\.up_proj\.weight"):
        MPTForCausalLM.from_pretrained(folder)


def test_wrong_shape_and_unexpected_tensor_are_named(saved):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    sd = load_file(str(folder / "model.safetensors"))
    sd["transformer.norm_f.weight"] = torch.ones(65)
    sd["transformer.blocks.0.attn.rotary.inv_freq"] = torch.ones(3)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        MPTForCausalLM.from_pretrained(folder)
    msg = str(e.value)
    assert "transformer.norm_f.weight: file (65,) vs model (64,)" in msg
    assert "unexpected tensors (1): transformer.blocks.0.attn.rotary.inv_freq" in msg


def test_corrupt_safetensors_is_reported_with_file(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        MPTForCausalLM.from_pretrained(folder)


def test_missing_weights_and_missing_folder(tmp_path, saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        MPTForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        MPTForCausalLM.from_pretrained(tmp_path / "nope")


def test_config_typo_is_an_error_naming_the_key(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_layer"] = cfg.pop("n_layers")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown key 'n_layer' — did you mean 'n_layers'"):
        MPTForCausalLM.from_pretrained(folder)


def test_attn_config_typo_and_invalid_json(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attn_config"]["clip_qvk"] = cfg["attn_config"].pop("clip_qkv")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"attn_config\.clip_qvk.*attn_config\.clip_qkv"):
        MPTForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text('{"d_model": 64,\n "n_heads": }')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        MPTForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"d_model": 65}, r"d_model \(65\) must be divisible by n_heads \(4\)"),
        ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 3}}, r"kv_n_heads \(3\) must divide n_heads \(4\)"),
        ({"attn_config": {"attn_type": "grouped_query_attention"}}, "kv_n_heads is required"),
        ({"norm_type": "batchnorm"}, "norm_type 'batchnorm' is not one of"),
        ({"n_heads": "4"}, "'n_heads' must be an integer"),
        ({"resid_pdrop": 1.5}, "'resid_pdrop' must be a probability"),
        ({"logit_scale": "huge"}, "logit_scale"),
        ({"attn_config": {"attn_impl": "xformers"}}, "attn_impl 'xformers' is not one of"),
    ],
)
def test_contradictory_or_invalid_configs_are_refused(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MPTConfig.from_dict(tiny_cfg(**over))


def test_alibi_overrides_learned_pos_emb_as_mpt_does():
    """learned_pos_emb: true with ALiBi is MPT's config.json: the key is kept as read, but the model has no
    position table (its weights and logits are the plain ALiBi model's) and runs past max_seq_len."""
    cfg = MPTConfig.from_dict(tiny_cfg(learned_pos_emb=True, attn_config={"alibi": True}))
    m = MPTForCausalLM(cfg).eval()
    assert cfg.learned_pos_emb is True
    plain = MPTForCausalLM(tiny_cfg(learned_pos_emb=False, attn_config={"alibi": True})).eval()
    plain.load_state_dict(m.state_dict())  # strict: the same tensors, no wpe
    ids = torch.randint(0, 211, (2, 100))  # past max_seq_len 64: a learned table would refuse it
    with torch.no_grad():
        assert torch.equal(m(ids).logits, plain(ids).logits)


def test_unknown_keys_round_trip_and_recipes_are_strict(tmp_path):
    d = tiny_cfg()
    d["my_custom_field"] = {"a": 1}
    d["attn_config"]["future_option"] = 7
    cfg = MPTConfig.from_dict(d, strict=False)
    cfg.save(tmp_path)
    back = json.loads((tmp_path / "config.json").read_text())
    assert back["my_custom_field"] == {"a": 1} and back["attn_config"]["future_option"] == 7
    with pytest.raises(ConfigError, match="unknown model key 'my_custom_field'"):
        MPTConfig.from_dict(d, strict=True)
    bad = tmp_path / "r.yaml"
    bad.write_text("d_model: 64\nn_heads: 4\nn_layer: 2\n")
    with pytest.raises(ConfigError, match="unknown model key 'n_layer' — did you mean 'n_layers'"):
        MPTConfig.from_yaml(bad)


def test_every_bundled_recipe_builds_on_meta():
    from mptkit.model.config import recipes_dir

    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert {"mpt-tiny", "mpt-125m", "mpt-350m", "mpt-1b", "mpt-7b", "mpt-30b"} <= set(names)
    for n in names:
        cfg = MPTConfig.from_yaml(recipes_dir() / f"{n}.yaml")
        cfg.init_device = "meta"
        assert MPTForCausalLM(cfg).num_params() > 0


def test_tokenizer_beside_weights_loads_locally(saved, make_tokenizer):
    _model, folder = saved
    make_tokenizer(folder)
    tok = load_tokenizer(folder)
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert tok.decode(ids) == "def f(x):\n    return x"
    assert load_tokenizer(folder.parent, missing_ok=True) is None


def test_save_with_dtype_and_load_back_in_fp32(tmp_path):
    model = MPTForCausalLM(tiny_cfg()).eval()
    model.save_pretrained(tmp_path / "bf", dtype=torch.bfloat16)
    back = MPTForCausalLM.from_pretrained(tmp_path / "bf")
    assert back.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(back.transformer.wte.weight, model.transformer.wte.weight.to(torch.bfloat16).float())


def test_a_meta_init_device_folder_is_no_override_in_the_errors(saved):
    """A folder whose config says init_device "meta" (where a recipe built it) loads on the CPU, and its
    mismatch errors name the folder alone: only the caller's overrides are listed as overrides."""
    from safetensors.torch import load_file, save_file

    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "init_device": "meta"}))
    assert MPTForCausalLM.from_pretrained(folder).config.init_device == "cpu"
    sd = load_file(str(folder / "model.safetensors"))
    del sd["transformer.blocks.1.ffn.up_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors") as e:
        MPTForCausalLM.from_pretrained(folder)
    assert "with overrides" not in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(CheckpointError, match=r"\(with overrides of attn_config\)"):
        MPTForCausalLM.from_pretrained(folder, attn_impl="torch")
