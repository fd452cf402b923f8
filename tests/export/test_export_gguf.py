"""`mptkit export gguf`: the file read back with gguf.GGUFReader holds exactly the model (names, shapes,
values, metadata, tokenizer); settings llama.cpp cannot compute are refused by name; writes are atomic.

The llama.cpp side (the same continuation and close logits) is in test_export_llama_cpp.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mptkit.cli import main as cli_main
from mptkit.errors import ExportError
from mptkit.export.gguf import export_gguf, llama_cpp_incompatibilities
from mptkit.model.config import MPTConfig
from tests.helpers import VOCAB, saved_model, tiny_cfg


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _expected_gguf(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their GGUF names (what the file must hold, before any folding)."""
    cfg = model.config
    m = {"token_embd.weight": model.transformer.wte.weight,
         "output_norm.weight": model.transformer.norm_f.weight}
    if getattr(model.transformer.norm_f, "bias", None) is not None:
        m["output_norm.bias"] = model.transformer.norm_f.bias
    if hasattr(model.transformer, "wpe"):
        m["position_embd.weight"] = model.transformer.wpe.weight
    if not cfg.tie_word_embeddings:
        m["output.weight"] = model.lm_head.weight
    names = {"norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output",
             "attn.q_ln": "attn_q_norm", "attn.k_ln": "attn_k_norm", "norm_2": "ffn_norm",
             "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}
    for i, blk in enumerate(model.transformer.blocks):
        for n, p in blk.named_parameters():
            mod, kind = n.rsplit(".", 1)
            m[f"blk.{i}.{names[mod]}.{kind}"] = p
    return {k: v.detach().float() for k, v in m.items()}


CONFIGS = {
    "mha-alibi": {},
    "untied-clip": {"tie_word_embeddings": False, "attn_config": {"clip_qkv": 0.8}},
    "gqa-6heads": {"d_model": 96, "n_heads": 6, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    "biases-mqa": {"no_bias": False, "d_model": 96, "n_heads": 6, "attn_config": {"attn_type": "multiquery_attention"}},
    "learned-pos-no-alibi": {"learned_pos_emb": True, "attn_config": {"alibi": False}, "expansion_ratio": 3},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_file_holds_the_exact_tensors_and_metadata(tmp_path, make_tokenizer, name):
    """Every tensor of the model is in the file under llama.cpp's name with the same shape and identical
    f32 values, nothing else is; the hyper-parameters are the model's."""
    tok = make_tokenizer()
    model = saved_model(tmp_path / "m", tok, **CONFIGS[name])
    cfg = model.config
    res = export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    fields, tensors = _read(tmp_path / "m.gguf")
    want = _expected_gguf(model)
    assert set(tensors) == set(want)
    for k, v in want.items():
        t = tensors[k]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, k
        got = np.asarray(t.data).reshape(tuple(v.shape))  # GGUFReader's numpy shape is PyTorch's
        assert list(t.shape[::-1]) == list(v.shape), k  # ggml's ne order is the reverse
        np.testing.assert_array_equal(got, v.numpy(), err_msg=k)
    assert res.n_tensors == len(want)
    assert fields["general.architecture"] == "mpt"
    assert fields["mpt.context_length"] == cfg.max_seq_len
    assert fields["mpt.embedding_length"] == cfg.d_model
    assert fields["mpt.block_count"] == cfg.n_layers
    assert fields["mpt.feed_forward_length"] == cfg.ffn_hidden_size
    assert fields["mpt.attention.head_count"] == cfg.n_heads
    assert fields["mpt.attention.head_count_kv"] == cfg.kv_n_heads
    assert math.isclose(fields["mpt.attention.layer_norm_epsilon"], cfg.layer_norm_epsilon, rel_tol=1e-6)
    assert fields["mpt.attention.max_alibi_bias"] == (8.0 if cfg.alibi else 0.0)
    if cfg.attn_config["clip_qkv"] is not None:
        assert math.isclose(fields["mpt.attention.clamp_kqv"], cfg.attn_config["clip_qkv"], rel_tol=1e-6)
    else:
        assert "mpt.attention.clamp_kqv" not in fields
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


def test_tokenizer_is_embedded_in_id_order_and_padded_to_the_vocab(tmp_path, make_tokenizer):
    """The token list is the tokenizer's vocabulary by id, padded to vocab_size with UNUSED entries; special
    tokens are CONTROL; merges, eos/pad ids are the tokenizer's (bos = eos, as GPT-NeoX)."""
    tok = make_tokenizer()
    saved_model(tmp_path / "m", tok)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    fields, _ = _read(tmp_path / "m.gguf")
    tj = json.loads((tok / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    for t, i in vocab.items():
        assert tokens[i] == t
    n = len(vocab)
    assert n == 400 and all(ty == gguf.TokenType.UNUSED for ty in types[n:])
    assert types[0] == types[1] == gguf.TokenType.CONTROL and tokens[0] == "<|endoftext|>"
    assert all(ty == gguf.TokenType.NORMAL for ty in types[2:n])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.bos_token_id"] == 0
    assert fields["tokenizer.ggml.padding_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_f16_matrices_are_rounded_and_norms_stay_f32(tmp_path, make_tokenizer):
    """--dtype f16: weight matrices are the model's values rounded to f16, 1-D tensors stay exact f32."""
    model = saved_model(tmp_path / "m", make_tokenizer(), no_bias=False)
    export_gguf(tmp_path / "m", tmp_path / "m16.gguf", dtype="f16")
    fields, tensors = _read(tmp_path / "m16.gguf")
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    for k, v in _expected_gguf(model).items():
        t = tensors[k]
        got = np.asarray(t.data).reshape(tuple(v.shape))
        if v.dim() >= 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, k
            np.testing.assert_array_equal(got, v.half().numpy(), err_msg=k)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, k
            np.testing.assert_array_equal(got, v.numpy(), err_msg=k)
    size16 = (tmp_path / "m16.gguf").stat().st_size
    export_gguf(tmp_path / "m", tmp_path / "m32.gguf")
    assert size16 < 0.6 * (tmp_path / "m32.gguf").stat().st_size


def test_softmax_scale_and_logit_scale_are_folded(tmp_path, make_tokenizer):
    """llama.cpp has a fixed 1/sqrt(head_dim) and no logit scale: softmax_scale is folded into Wqkv's Q rows
    (K and V rows untouched), logit_scale into an explicit output tensor (the tied embedding stays)."""
    s, ls = 0.05, 0.5
    model = saved_model(tmp_path / "m", make_tokenizer(), logit_scale=ls, attn_config={"softmax_scale": s})
    res = export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert len(res.folded) == 2
    _, tensors = _read(tmp_path / "m.gguf")
    d, hd = 64, 16
    r = s * math.sqrt(hd)
    w = model.transformer.blocks[0].attn.Wqkv.weight.detach()
    got = np.asarray(tensors["blk.0.attn_qkv.weight"].data).reshape(tuple(w.shape))
    np.testing.assert_allclose(got[:d], (w[:d] * r).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got[d:], w[d:].numpy())
    wte = model.transformer.wte.weight.detach()
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(tuple(wte.shape)), wte.numpy())
    np.testing.assert_allclose(np.asarray(tensors["output.weight"].data).reshape(tuple(wte.shape)),
                               (wte * ls).numpy(), rtol=1e-6)


REFUSED = {
    "norm_type": {"norm_type": "rmsnorm"},
    "ffn_type": {"ffn_config": {"ffn_type": "mptglu"}},
    "qk_ln": {"attn_config": {"qk_ln": True}},
    "softmax_scale": {"attn_config": {"softmax_scale": 0.1, "clip_qkv": 1.0}},
}


@pytest.mark.parametrize("key", list(REFUSED))
def test_inexpressible_settings_are_refused_naming_the_key(tmp_path, make_tokenizer, key):
    """A model llama.cpp's mpt graph would compute differently is refused before anything is written."""
    cfg = MPTConfig.from_dict(tiny_cfg(**REFUSED[key]))
    assert any(key in p for p in llama_cpp_incompatibilities(cfg))
    saved_model(tmp_path / "m", make_tokenizer(), **REFUSED[key])
    with pytest.raises(ExportError, match=key):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert list(tmp_path.glob(".m.gguf*")) == []


def test_expressible_settings_pass_the_check():
    """The MPT-7B configuration and the variants llama.cpp computes raise nothing."""
    for over in [{}, *CONFIGS.values(), {"logit_scale": "inv_sqrt_d_model"}]:
        assert llama_cpp_incompatibilities(MPTConfig.from_dict(tiny_cfg(**over))) == [], over


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path, make_tokenizer):
    saved_model(tmp_path / "m", make_tokenizer(), vocab_size=300)
    with pytest.raises(ExportError, match="vocab_size is 300"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")


def test_missing_tokenizer_is_an_error_unless_given(tmp_path, make_tokenizer):
    """No tokenizer beside the model: a clear error; --tokenizer DIR supplies one."""
    saved_model(tmp_path / "run" / "m")
    with pytest.raises(ExportError, match="--tokenizer"):
        export_gguf(tmp_path / "run" / "m", tmp_path / "m.gguf")
    tok = make_tokenizer(tmp_path / "elsewhere")
    res = export_gguf(tmp_path / "run" / "m", tmp_path / "m.gguf", tokenizer=tok)
    assert res.tokenizer_from == tok and (tmp_path / "m.gguf").stat().st_size > 0


def test_non_byte_level_tokenizer_is_refused(tmp_path, make_tokenizer):
    tok = make_tokenizer()
    tj = json.loads((tok / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (tok / "tokenizer.json").write_text(json.dumps(tj))
    saved_model(tmp_path / "m", tok)
    with pytest.raises(ExportError, match="Whitespace"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")


def test_failed_export_leaves_the_previous_file_untouched(tmp_path, make_tokenizer, monkeypatch):
    """An error while the tensors stream out removes the temporary file; the good .gguf stays as it was."""
    import mptkit.export.gguf as g

    saved_model(tmp_path / "m", make_tokenizer())
    out = tmp_path / "m.gguf"
    export_gguf(tmp_path / "m", out)
    before = out.read_bytes()
    calls = {"n": 0}
    real = g._prepare

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(g, "_prepare", flaky)
    with pytest.raises(OSError, match="simulated"):
        export_gguf(tmp_path / "m", out, dtype="f16", overwrite=True)
    assert calls["n"] == 5
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf", "tok"]


def test_cli_writes_the_file_and_reports_errors_in_one_line(tmp_path, make_tokenizer, capsys):
    saved_model(tmp_path / "m", make_tokenizer(), norm_type="rmsnorm")
    rc = cli_main(["export", "gguf", str(tmp_path / "m"), str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "norm_type=rmsnorm" in err and "Traceback" not in err
    saved_model(tmp_path / "ok", make_tokenizer(tmp_path / "tok2"))
    rc = cli_main(["export", "gguf", str(tmp_path / "ok"), str(tmp_path / "ok.gguf"), "--dtype", "f16"])
    assert rc == 0
    fields, _ = _read(tmp_path / "ok.gguf")
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)


def test_f16_overflow_is_refused(tmp_path, make_tokenizer):
    """A weight beyond f16's range would become inf in an f16 file: refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    saved_model(tmp_path / "m", make_tokenizer())
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd["transformer.blocks.1.ffn.up_proj.weight"][0, 0] = 1e6
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"blocks\.1\.ffn\.up_proj.*--dtype f32"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f16")
    assert not (tmp_path / "m.gguf").exists()
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f32")
