"""`mptkit export hf`: the exported folder loads in transformers (no remote code) with mptkit's logits and
tokenizer; dtypes, shards, layouts, run/checkpoint sources, warnings, refusals and atomic replacement."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mptkit.cli import main as cli_main
from mptkit.errors import ExportError
from mptkit.export.hf import export_hf
from mptkit.model import MPTForCausalLM
from tests.helpers import saved_model

X = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(7))
TEXT = "def load(fp, *, cls=None):\n    return json.loads(fp.read())  # naïve\n"


def test_export_loads_in_transformers_with_the_same_logits_and_tokenizer(tmp_path, make_tokenizer):
    """The default export is transformers' MptForCausalLM layout: AutoModelForCausalLM loads it without
    trust_remote_code and computes mptkit's logits (<= 1e-4); AutoTokenizer encodes like the source."""
    tok = make_tokenizer()
    model = saved_model(tmp_path / "m", tok, expansion_ratio=4, attn_config={"clip_qkv": 1.5})
    res = export_hf(tmp_path / "m", tmp_path / "out")
    assert res.incompatibilities == []
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["MptForCausalLM"] and "auto_map" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "MptForCausalLM"
    with torch.no_grad():
        a = hf(X).logits
        b = model(X).logits
    assert a.std() > 0.5  # the comparison is not trivially satisfied
    assert (a - b).abs().max().item() <= 1e-4
    t_src = AutoTokenizer.from_pretrained(str(tok))
    t_out = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = t_out(TEXT)["input_ids"]
    assert ids == t_src(TEXT)["input_ids"] and len(ids) > 5
    assert t_out.decode(ids) == TEXT
    assert t_out.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_export_stores_rounded_weights(tmp_path, make_tokenizer, dtype, torch_dtype):
    """--dtype bf16/fp16: every tensor is stored in that dtype with the rounded values; config.json says so;
    transformers loads it and its logits stay close to mptkit's fp32 ones."""
    model = saved_model(tmp_path / "m", make_tokenizer(), expansion_ratio=4)
    export_hf(tmp_path / "m", tmp_path / "out", dtype=dtype)
    sd = model.state_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
            t = f.get_tensor(k)
            assert t.dtype == torch_dtype, k
            assert torch.equal(t, sd[k].to(torch_dtype)), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        err = (hf(X).logits - model(X).logits).abs().max().item()
    assert err < 0.25 if dtype == "bf16" else err < 0.05


def test_shards_and_mosaicml_layout(tmp_path, make_tokenizer):
    """--max-shard-size splits the weights with an index that transformers follows; --layout mosaicml writes
    MosaicML's config (MPTForCausalLM + auto_map) that mptkit reads back to the same model."""
    model = saved_model(tmp_path / "m", make_tokenizer(), expansion_ratio=4)
    export_hf(tmp_path / "m", tmp_path / "sharded", max_shard_size="40KB")
    idx = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(idx["weight_map"].values())
    assert len(shards) >= 3 and all((tmp_path / "sharded" / s).exists() for s in shards)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        assert (hf(X).logits - model(X).logits).abs().max().item() <= 1e-4

    export_hf(tmp_path / "m", tmp_path / "mosaic", layout="mosaicml")
    cfg = json.loads((tmp_path / "mosaic" / "config.json").read_text())
    assert cfg["architectures"] == ["MPTForCausalLM"] and "AutoModelForCausalLM" in cfg["auto_map"]
    back = MPTForCausalLM.from_pretrained(tmp_path / "mosaic")
    with torch.no_grad():
        assert torch.equal(back(X).logits, model(X).logits)


def test_settings_transformers_cannot_express_are_warned_and_listed(tmp_path, make_tokenizer, caplog):
    """A GQA + qk_ln model exports (mptkit reads it back exactly) with one warning line per setting."""
    model = saved_model(tmp_path / "m", make_tokenizer(), attn_config={
        "qk_ln": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2})
    with caplog.at_level(logging.WARNING, logger="mptkit.export.hf"):
        res = export_hf(tmp_path / "m", tmp_path / "out")
    assert any("kv heads" in s for s in res.incompatibilities)
    assert any("qk_ln" in s for s in res.incompatibilities)
    for item in res.incompatibilities:
        assert item in caplog.text
    back = MPTForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(X).logits, model(X).logits)


def test_run_folder_resolves_to_the_newest_checkpoint_via_the_trainer(tmp_path, make_tokenizer, monkeypatch):
    """SRC that is not a model folder is handed to the trainer checkpoints' newest-valid lookup
    (mptkit.io.checkpoints.find_latest_checkpoint, stubbed here); the tokenizer kept at the run's top level
    is found and copied; a run without checkpoints is an error."""
    import mptkit.io.source as io_source

    run = tmp_path / "run"
    make_tokenizer(run)
    model = saved_model(run / "checkpoints" / "ba20" / "model")
    seen = []

    def find_latest_checkpoint(p):
        seen.append(p)
        return p / "checkpoints" / "ba20" if (p / "checkpoints").exists() else None

    monkeypatch.setattr(io_source, "find_latest_checkpoint", find_latest_checkpoint)
    res = export_hf(run, tmp_path / "out")
    assert seen and res.tokenizer_from == run
    assert (tmp_path / "out" / "tokenizer.json").exists()
    back = MPTForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(X).logits, model(X).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no valid checkpoint"):
        export_hf(tmp_path / "empty", tmp_path / "out2")


def test_refuses_to_clobber_sources_and_unrelated_folders(tmp_path, make_tokenizer):
    saved_model(tmp_path / "m", make_tokenizer())
    with pytest.raises(ExportError, match="replace the source"):
        export_hf(tmp_path / "m", tmp_path / "m", overwrite=True)
    with pytest.raises(ExportError, match="replace the source"):
        export_hf(tmp_path / "m", tmp_path, overwrite=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(tmp_path / "m", tmp_path / "docs", overwrite=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="no such file"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ExportError, match="--dtype"):
        export_hf(tmp_path / "m", tmp_path / "out", dtype="int8")


def test_failed_overwrite_keeps_the_previous_export(tmp_path, make_tokenizer, monkeypatch):
    """--overwrite builds the new folder beside the old one: a failure mid-way leaves the old export whole."""
    import mptkit.io.hf_folder as cio

    saved_model(tmp_path / "m", make_tokenizer())
    export_hf(tmp_path / "m", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ExportError, match="not empty"):
        export_hf(tmp_path / "m", tmp_path / "out")  # without --overwrite

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cio.MPTConfig, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        export_hf(tmp_path / "m", tmp_path / "out", dtype="bf16", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out", "tok"]


def test_cli_export_hf(tmp_path, make_tokenizer, capsys):
    model = saved_model(tmp_path / "m", make_tokenizer(), expansion_ratio=4)
    rc = cli_main(["export", "hf", str(tmp_path / "m"), str(tmp_path / "out"), "--dtype", "fp32"])
    assert rc == 0
    back = MPTForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(X).logits, model(X).logits)
    rc = cli_main(["export", "hf", str(tmp_path / "nope"), str(tmp_path / "out2")])
    assert rc == 2 and "no such file" in capsys.readouterr().err


def test_real_trainer_checkpoints_newest_valid_one_is_exported(tmp_path, make_tokenizer):
    """With the trainer's checkpoint format: two checkpoints in a run, the newest truncated; the export
    (HF and GGUF) takes the newest *valid* one, with its tokenizer."""
    ckpt = pytest.importorskip("mptkit.train.checkpoint")
    tok = make_tokenizer()
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    run = tmp_path / "run"
    old = saved_model(tmp_path / "old", seed=1, expansion_ratio=4)
    new = saved_model(tmp_path / "new", seed=2, expansion_ratio=4)
    ckpt.save_checkpoint(run, model=old, trainer_state={"step": 10}, epoch=0, step=10, tokenizer=t)
    c20 = ckpt.save_checkpoint(run, model=new, trainer_state={"step": 20}, epoch=0, step=20, tokenizer=t)
    with torch.no_grad():
        want_old = old(X).logits
    w = c20 / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # the newest checkpoint is truncated
    res = export_hf(run, tmp_path / "out")
    assert res.source.parent.name == "ep0-ba10"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (hf(X).logits - want_old).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))(TEXT)["input_ids"] == t(TEXT)["input_ids"]
    gguf = pytest.importorskip("gguf")
    from mptkit.export.gguf import export_gguf

    export_gguf(run, tmp_path / "run.gguf")
    r = gguf.GGUFReader(str(tmp_path / "run.gguf"))
    emb = {x.name: x for x in r.tensors}["token_embd.weight"]
    assert torch.equal(torch.from_numpy(emb.data.copy()), old.transformer.wte.weight.detach())


def test_bin_source_exports_the_same_tensors_and_refuses_pickles(tmp_path, make_tokenizer):
    """A model folder holding `pytorch_model.bin` (older MPT uploads) exports to the same safetensors
    weights; a .bin that needs arbitrary unpickling is refused by weights_only=True, naming the file."""
    tok = make_tokenizer()
    model = saved_model(tmp_path / "m", tok)
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "m" / "pytorch_model.bin")
    export_hf(tmp_path / "m", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        sd = model.state_dict()
        for k in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
            assert torch.equal(f.get_tensor(k), sd[k]), k
    torch.save({"w": types.SimpleNamespace(a=1)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ExportError, match=r"pytorch_model\.bin: cannot load with weights_only=True"):
        export_hf(tmp_path / "m", tmp_path / "out2")


def test_arguments_are_checked_before_the_source_is_opened(tmp_path):
    """A bad --dtype / --layout / --max-shard-size is refused before the source is read (a sharded source would
    be consolidated first): here the source does not even exist."""
    from mptkit.export.gguf import export_gguf

    for kw, msg in (({"dtype": "int8"}, "--dtype"), ({"layout": "x"}, "--layout"), ({"max_shard_size": "lots"}, "cannot read size")):
        with pytest.raises(ExportError, match=msg) as e:
            export_hf(tmp_path / "missing", tmp_path / "out", **kw)
        assert "no such file" not in str(e.value)
    with pytest.raises(ExportError, match="--dtype"):
        export_gguf(tmp_path / "missing", tmp_path / "o.gguf", dtype="q4")


def test_exported_tokenizer_truncates_to_what_the_exported_model_accepts(tmp_path, make_tokenizer):
    """The exported tokenizer's limit is the model's ``max_seq_len`` (mptkit's trained tokenizers say 2048): text
    tokenized with ``truncation=True`` — as lm-eval's ``hf`` backend and most harnesses do — fits transformers'
    MPT, which refuses anything longer; the source tokenizer's files are left as they were."""
    tok = make_tokenizer()
    before = (tok / "tokenizer_config.json").read_bytes()
    saved_model(tmp_path / "m", tok, max_seq_len=48, expansion_ratio=4)
    export_hf(tmp_path / "m", tmp_path / "out")
    t_out = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    long_text = TEXT * 40
    ids = t_out(long_text, truncation=True)["input_ids"]
    assert len(ids) == 48 < len(t_out(long_text)["input_ids"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert hf(torch.tensor([ids])).logits.shape == (1, 48, hf.config.vocab_size)
    assert (tok / "tokenizer_config.json").read_bytes() == before
