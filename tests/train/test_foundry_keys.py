"""llm-foundry's TrainConfig keys through the trainer: ``dur`` durations, ``load_weights_only`` /
``load_ignore_keys`` / ``load_strict_model_weights``, ``save_weights_only``, ``callbacks.hf_checkpointer``, the
keys mptkit refuses (with the reason), and docs/training.md's table of every key (it cannot drift)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.errors import CheckpointError, ConfigError
from mptkit.train.config import RunConfig, config_from_dict
from mptkit.train.foundry_keys import LLM_FOUNDRY_TRAIN_KEYS, REFUSED
from mptkit.train.trainer import Trainer
from tests.helpers import TINY_MODEL, datasets, make_cfg, tiny_run

ROOT = Path(__file__).resolve().parents[2]


def _trainer(cfg):
    tr, ev = datasets()
    return Trainer(cfg, train_dataset=tr, eval_dataset=ev)


def _weights(ck):
    return load_file(str(ck / "model" / "model.safetensors"))


@pytest.mark.parametrize("max_duration,frac,batches", [("50ba", "0.1dur", 5), ("3ep", "0.25dur", 6),
                                                       ("40sp", "0.5dur", 3)])
def test_dur_warmup_equals_the_equivalent_batch_count(tmp_path, max_duration, frac, batches):
    """t_warmup in ``dur`` gives the run's schedule exactly the lr of the same warmup in batches (composer's
    conversion: a fraction of max_duration, in its unit; of its batches for epochs: 8 batches per epoch here)."""
    a = _trainer(make_cfg(tmp_path / "a", max_duration=max_duration, save_folder=None,
                          scheduler={"name": "cosine_with_warmup", "t_warmup": frac, "alpha_f": 0.1})).setup()
    b = _trainer(make_cfg(tmp_path / "b", max_duration=max_duration, save_folder=None,
                          scheduler={"name": "cosine_with_warmup", "t_warmup": f"{batches}ba", "alpha_f": 0.1})).setup()
    assert a.schedule.t_warmup == batches == b.schedule.t_warmup
    assert [a.schedule(t) for t in range(a.max_steps + 1)] == [b.schedule(t) for t in range(b.max_steps + 1)]
    assert a.schedule(batches - 1) < 1.0 and a.schedule(batches) == pytest.approx(1.0)


def test_max_duration_in_dur_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_duration"):
        make_cfg(tmp_path, max_duration="0.5dur")


def test_load_weights_only_starts_a_new_run_from_the_weights(tmp_path):
    """load_path + load_weights_only: step 0, a fresh optimizer, the checkpoint's weights (all but the
    tensors load_ignore_keys names, which stay as the recipe builds them)."""
    _trainer(make_cfg(tmp_path / "a")).fit()
    src = tmp_path / "a" / "ck" / "ep1-ba12"
    trained = _weights(src)
    fresh = _trainer(make_cfg(tmp_path / "f", save_folder=None)).setup().model.state_dict()
    t = _trainer(make_cfg(tmp_path / "b", load_path=str(src), load_weights_only=True,
                          load_ignore_keys=["state/model/model.transformer.wte*"])).setup()
    assert t.step == 0 and t.resumed_from is None and len(t.optimizer.state) == 0
    sd = t.model.state_dict()
    assert torch.equal(sd["transformer.wte.weight"], fresh["transformer.wte.weight"])
    assert not torch.equal(sd["transformer.wte.weight"], trained["transformer.wte.weight"])
    others = [k for k in trained if "wte" not in k]
    assert others and all(torch.equal(sd[k], trained[k]) for k in others)
    s = t.fit()
    assert s["steps"] == 12 and s["resumed_from"] is None


def test_load_strict_model_weights_and_composer_files(tmp_path):
    """A source with fewer layers: refused under load_strict_model_weights (naming the missing tensors), loaded
    where it fits with false; a Composer-layout .pt file is read as load_path too."""
    one = {**TINY_MODEL, "n_layers": 1}
    _trainer(make_cfg(tmp_path / "a", model=one, max_duration="4ba")).fit()
    src = tmp_path / "a" / "ck" / "ep0-ba4"
    with pytest.raises(CheckpointError, match="missing .*blocks.1"):
        _trainer(make_cfg(tmp_path / "b", load_path=str(src), load_weights_only=True)).setup()
    t = _trainer(make_cfg(tmp_path / "c", load_path=str(src), load_weights_only=True,
                          load_strict_model_weights=False)).setup()
    w = _weights(src)
    assert torch.equal(t.model.state_dict()["transformer.blocks.0.attn.Wqkv.weight"],
                       w["transformer.blocks.0.attn.Wqkv.weight"])
    pt = tmp_path / "composer.pt"
    torch.save({"state": {"model": {f"model.{k}": v for k, v in w.items()}}}, pt)
    t2 = _trainer(make_cfg(tmp_path / "d", model=one, load_path=str(pt), load_weights_only=True)).setup()
    assert all(torch.equal(t2.model.state_dict()[k], v) for k, v in w.items())
    with pytest.raises(CheckpointError, match="load_weights_only"):
        _trainer(make_cfg(tmp_path / "e", model=one, load_path=str(pt))).setup()


def test_save_weights_only_checkpoints_hold_no_optimizer_and_are_not_resumed(tmp_path):
    _trainer(make_cfg(tmp_path / "a", save_weights_only=True, max_duration="4ba")).fit()
    ck = tmp_path / "a" / "ck" / "ep0-ba4"
    st = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert st["weights_only"] is True and st["optimizer"] is None
    with pytest.raises(CheckpointError, match="weights only"):
        _trainer(make_cfg(tmp_path / "b", load_path=str(ck))).setup()
    t = _trainer(make_cfg(tmp_path / "c", load_path=str(ck), load_weights_only=True)).setup()
    assert t.step == 0
    with pytest.raises(ConfigError, match="autoresume"):
        make_cfg(tmp_path, save_weights_only=True, autoresume=True)
    with pytest.raises(ConfigError, match="weights-only load"):
        make_cfg(tmp_path, load_path=str(ck), load_ignore_keys=["*wte*"])


def test_hf_checkpointer_writes_hf_folders_at_its_interval_in_its_precision(tmp_path):
    """callbacks.hf_checkpointer {save_folder, save_interval: 5ba, precision: bfloat16}: huggingface/ba5, ba10 and
    the end of training (ba12), each an HF folder in bf16 that transformers loads; the last holds the final
    weights (the run's last checkpoint's, rounded to bf16)."""
    from transformers import AutoModelForCausalLM

    hf = {"save_folder": str(tmp_path / "hfck"), "save_interval": "5ba", "precision": "bfloat16"}
    _trainer(make_cfg(tmp_path, callbacks={"hf_checkpointer": hf})).fit()
    out = tmp_path / "hfck" / "huggingface"
    assert sorted(p.name for p in out.iterdir()) == ["ba10", "ba12", "ba5"]
    final = _weights(tmp_path / "ck" / "ep1-ba12")
    got = load_file(str(out / "ba12" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], final[k].to(torch.bfloat16)) for k in got)
    m = AutoModelForCausalLM.from_pretrained(out / "ba5", dtype=torch.bfloat16)
    assert type(m).__name__ == "MptForCausalLM"
    with pytest.raises(ConfigError, match="MLflow"):
        make_cfg(tmp_path, callbacks={"hf_checkpointer": {**hf, "mlflow_registered_model_name": "x"}})
    with pytest.raises(ConfigError, match="save_interval"):
        make_cfg(tmp_path, callbacks={"hf_checkpointer": {"save_folder": "x"}})


@pytest.mark.parametrize("key,value", [("icl_tasks_str", "[{label: x}]"), ("icl_subset_num_batches", 2),
                                       ("device_train_batch_size", 4), ("save_filename", "ep{epoch}.pt"),
                                       ("code_paths", ["x.py"]), ("profiler", {"schedule": {}})])
def test_refused_keys_name_the_reason_and_are_fine_unset(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"{key}: not supported: .+"):
        config_from_dict(tiny_run(tmp_path, **{key: value}))
    config_from_dict(tiny_run(tmp_path, **{key: None}))


def _doc_table_keys() -> dict[str, str]:
    text = (ROOT / "docs" / "training.md").read_text()
    start = text.index("### Every llm-foundry TrainConfig key")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            for key in re.findall(r"`([a-z_0-9]+)`", cells[0]):
                rows[key] = cells[1]
    return rows


def test_the_docs_table_lists_every_key_the_parser_knows():
    """docs/training.md's table has a row for every llm-foundry TrainConfig key and every top-level key mptkit
    reads, each marked supported / mapped / refused; refused ones are exactly those the parser refuses, and every
    llm-foundry key is either read or refused (no key is silently dropped)."""
    rows = _doc_table_keys()
    fields = {f.name for f in dataclasses.fields(RunConfig) if not f.name.startswith("_")}
    assert set(LLM_FOUNDRY_TRAIN_KEYS) <= set(rows), sorted(set(LLM_FOUNDRY_TRAIN_KEYS) - set(rows))
    assert fields <= set(rows), sorted(fields - set(rows))
    assert set(rows) <= fields | set(REFUSED), sorted(set(rows) - fields - set(REFUSED))
    assert {k for k, v in rows.items() if v == "refused"} == set(REFUSED)
    assert set(LLM_FOUNDRY_TRAIN_KEYS) <= fields | set(REFUSED)
    assert set(rows.values()) <= {"supported", "mapped", "refused", "mptkit"}
    json.dumps(rows)


def test_fsdp_device_mesh_maps_onto_the_fsdp2_mesh(tmp_path):
    """composer's fsdp_config.device_mesh: [shard] or [replicate, shard] (mpt-7b.yaml's [2, 4]: HSDP, 2 replicas
    of 4-way shards); the mesh FSDP2 is built on has that shape, and one that does not fit the ranks or disagrees
    with the data_parallel degrees is refused naming the key."""
    from mptkit.train.fsdp import build_mesh
    from mptkit.train.fsdp_config import parse_fsdp_config

    s = parse_fsdp_config({"sharding_strategy": "FULL_SHARD", "device_mesh": [2, 4]})
    assert (s.sharding_strategy, s.data_parallel_replicate_degree, s.data_parallel_shard_degree) == (
        "HYBRID_SHARD", 2, 4)
    assert parse_fsdp_config({"sharding_strategy": "SHARD_GRAD_OP", "device_mesh": [2, 2]}).sharding_strategy == (
        "_HYBRID_SHARD_ZERO2")
    one = parse_fsdp_config({"device_mesh": [4]})
    assert (one.sharding_strategy, one.data_parallel_shard_degree) == ("FULL_SHARD", 4)
    with pytest.raises(ConfigError, match="use sharding_strategy HYBRID_SHARD"):  # [4] on 8 ranks
        build_mesh(one, 8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="must equal the number of ranks"):  # [2, 4] on 4 ranks
        build_mesh(s, 4, torch.device("cpu"))
    for bad, match in (([2, 0], "device_mesh: expected"), ([1, 2, 3], "device_mesh: expected"),
                       ("2x4", "device_mesh: expected")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict(tiny_run(tmp_path, fsdp_config={"device_mesh": bad}))
    with pytest.raises(ConfigError, match="disagrees"):
        parse_fsdp_config({"device_mesh": [2, 4], "data_parallel_shard_degree": 2})
    with pytest.raises(ConfigError, match="NO_SHARD"):
        parse_fsdp_config({"sharding_strategy": "NO_SHARD", "device_mesh": [2, 4]})


def test_compile_config_compiles_the_blocks_and_stays_eager_on_cpu(tmp_path, monkeypatch, caplog):
    """compile_config: on CPU the blocks stay eager with a warning (measured no faster, docs/training.md);
    MPTKIT_COMPILE_ON_CPU=1 compiles each block in place (torch.compile's options passed through); a key that
    is no torch.compile option is refused."""
    import logging

    with caplog.at_level(logging.WARNING, logger="mptkit"):
        t = _trainer(make_cfg(tmp_path / "a", save_folder=None, compile_config={})).setup()
    assert "run eagerly" in caplog.text
    assert all(b._compiled_call_impl is None for b in t.model.transformer.blocks)
    monkeypatch.setenv("MPTKIT_COMPILE_ON_CPU", "1")
    calls = []  # torch.compile itself takes ~15 s to import and set up here: record the calls instead
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    t = _trainer(make_cfg(tmp_path / "b", save_folder=None, compile_config={"dynamic": False})).setup()
    assert [c[0] for c in calls] == list(t.model.transformer.blocks) and calls[0][1] == {"dynamic": False}
    with pytest.raises(ConfigError, match="compile_config.fullgrph"):
        make_cfg(tmp_path, compile_config={"fullgrph": True})


def test_cuda_allocator_keys_set_the_environment_before_cuda_starts(tmp_path, monkeypatch):
    from mptkit.train.trainer import _cuda_environment

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    _cuda_environment(make_cfg(tmp_path, max_split_size_mb=256, expandable_segments=True, cuda_load_lazy=True))
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256,expandable_segments:True"
    assert os.environ["CUDA_MODULE_LOADING"] == "LAZY"
