"""Run-config parsing: llm-foundry keys, ${var} interpolation, overrides, durations, typo errors."""

from __future__ import annotations

import pytest

from mptkit.errors import ConfigError
from mptkit.train.config import (
    apply_overrides,
    config_from_dict,
    interpolate,
    load_run_config,
    parse_duration,
)


def test_durations_parse_units_and_multipliers():
    """'Nba', 'Nep', 'Ntok' with K/M/B suffixes and bare ints parse to the right value and unit."""
    assert parse_duration("200ba", "d").value == 200 and parse_duration("200ba", "d").unit == "ba"
    assert parse_duration("1ep", "d").unit == "ep"
    assert parse_duration("5Mtok", "d").value == 5_000_000
    assert parse_duration("2.5e9tok", "d").value == 2.5e9
    assert parse_duration(3, "d", int_unit="ep").unit == "ep"
    d = parse_duration("5Mtok", "d")
    assert d.to_batches(batches_per_epoch=None, tokens_per_batch=1000, samples_per_batch=4) == 5000
    assert parse_duration("2ep", "d").to_batches(batches_per_epoch=7, tokens_per_batch=1, samples_per_batch=1) == 14
    with pytest.raises(ConfigError, match="Nba"):
        parse_duration("100 batches", "max_duration")


def test_interpolation_keeps_types_and_substitutes_text():
    """${x} alone takes x's value and type; inside a string it is substituted as text; nested refs work."""
    out = interpolate({"max_seq_len": 128, "v": {"name": "c4"}, "model": {"max_seq_len": "${max_seq_len}"},
                       "path": "./data/${v.name}-${max_seq_len}", "seed": "${model.max_seq_len}"})
    assert out["model"]["max_seq_len"] == 128
    assert out["path"] == "./data/c4-128"
    assert out["seed"] == 128
    with pytest.raises(ConfigError, match="max_seq_lne|did you mean"):
        interpolate({"max_seq_len": 1, "a": "${max_seq_lne}"})
    with pytest.raises(ConfigError, match="cycle"):
        interpolate({"a": "${b}", "b": "${a}"})


def test_llm_foundry_style_variables_are_allowed_and_typos_are_not():
    """Top-level keys used only through ${...} (data_local, global_seed) are variables, not errors;
    a misspelled run key names the closest valid one."""
    cfg = config_from_dict({"data_local": "./c4", "global_seed": 17, "seed": "${global_seed}",
                            "train_loader": {"name": "text", "dataset": {"local": "${data_local}", "split": "train"}},
                            "max_duration": "10ba"})
    assert cfg.seed == 17 and cfg.train_loader["dataset"]["local"] == "./c4"
    with pytest.raises(ConfigError, match="global_train_batch_size"):
        config_from_dict({"global_train_batch_sise": 8})
    with pytest.raises(ConfigError, match="optimizer.weight_decay"):
        config_from_dict({"optimizer": {"name": "decoupled_adamw", "weight_decy": 0.1}})
    with pytest.raises(ConfigError, match="decoupled_lionw"):
        config_from_dict({"optimizer": {"name": "decoupled_lion"}})
    with pytest.raises(ConfigError, match="cosine_with_warmup"):
        config_from_dict({"scheduler": {"name": "cosine_warmup"}})
    with pytest.raises(ConfigError, match="'auto'"):
        config_from_dict({"device_train_microbatch_size": "big"})


def test_overrides_parse_yaml_values_and_nest(tmp_path):
    """key.sub=value overrides apply before interpolation, with YAML-typed values."""
    p = tmp_path / "r.yaml"
    p.write_text("max_seq_len: 64\nmodel:\n  d_model: 32\n  max_seq_len: ${max_seq_len}\n"
                 "optimizer: {name: decoupled_adamw, lr: 1.0e-3}\n")
    cfg = load_run_config(p, ["max_seq_len=32", "optimizer.lr=1e-2", "optimizer.betas=[0.8, 0.9]",
                              "autoresume=true"])
    assert cfg.model["max_seq_len"] == 32
    assert cfg.optimizer["lr"] == 0.01 and cfg.optimizer["betas"] == [0.8, 0.9]
    assert cfg.autoresume is True and cfg.run_name == "r"
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_bundled_recipes_validate():
    """Every recipe under configs/pretrain parses and validates (keys, durations, optimizer, scheduler)."""
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"quickstart", "mpt-125m", "mpt-1b", "mpt-7b"}
    for r in recipes:
        cfg = load_run_config(r)
        assert cfg.global_train_batch_size > 0, r


def test_a_bundled_recipe_runs_by_name(tmp_path, monkeypatch):
    """`mptkit train quickstart` (from any folder) is the shipped recipe; a local file of that name wins; an
    unknown name is still "no such recipe"."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    monkeypatch.chdir(tmp_path)
    for name, sub in (("quickstart", "pretrain"), ("instruct", "finetune")):
        assert load_run_config(name).to_dict() == load_run_config(root / sub / f"{name}.yaml").to_dict()
    with pytest.raises(ConfigError, match="no such recipe.*did you mean the bundled recipe 'quickstart'"):
        load_run_config("quickstrat")
    (tmp_path / "quickstart").write_text("run_name: mine\nmax_duration: 3ba\n")
    assert load_run_config("quickstart").run_name == "mine"


def test_token_durations_do_not_round_up_a_float_error():
    """With a mean number of tokens per batch (finetuning data: 100 tokens over 9 samples, batches of 3) a
    duration of exactly one epoch's tokens is one epoch of steps, not one more."""
    d = parse_duration("100tok", "max_duration")
    assert 100 / (100 / 9 * 3) > 3  # the float error the conversion has to absorb
    assert d.to_batches(batches_per_epoch=3, tokens_per_batch=100 / 9 * 3, samples_per_batch=3) == 3
    assert parse_duration("101tok", "d").to_batches(batches_per_epoch=3, tokens_per_batch=100 / 9 * 3,
                                                    samples_per_batch=3) == 4


def test_recipe_sections_are_typed_with_their_defaults():
    """The recipe's sections are typed (attributes under llm-foundry's key names), each default resolved from
    one place (betas by optimizer, alpha_f by schedule); the validated config written out (config.yaml) reads
    back to the same config."""
    import yaml

    cfg = config_from_dict({"optimizer": {"name": "decoupled_lionw", "lr": 1e-4},
                            "scheduler": {"name": "constant_with_warmup"},
                            "callbacks": {"optimizer_monitor": None}})
    assert (cfg.optimizer.name, cfg.optimizer.lr, tuple(cfg.optimizer.betas)) == ("decoupled_lionw", 1e-4, (0.9, 0.99))
    assert cfg.optimizer.fused is None and cfg.scheduler.alpha_f == 1.0 and cfg.algorithms.clip is None
    assert cfg.callbacks.optimizer_monitor.batch_log_interval == 10 and cfg.callbacks.scheduled_gc is None
    d = config_from_dict({}).optimizer
    assert (d.name, d.lr, tuple(d.betas), d.eps, d.weight_decay) == ("decoupled_adamw", 6e-4, (0.9, 0.95), 1e-8, 0.0)
    fused = config_from_dict({"optimizer": {"name": "adamw", "fused": True}})
    assert fused.optimizer.fused is True and fused.to_dict()["optimizer"]["fused"] is True
    inv = config_from_dict({"scheduler": {"name": "inv_sqrt_with_warmup", "alpha_f_decay": 0.2}})
    assert inv.scheduler.alpha_f == 0.2
    back = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict() and back.optimizer == cfg.optimizer
    assert cfg.sample.max_new_tokens == 64 and cfg.checkpointing.autoresume is False


@pytest.mark.parametrize("chunk, runs", [(0, False), (16, True)])
def test_model_fast_paths_in_a_recipe_reach_the_training_step(tmp_path, monkeypatch, chunk, runs):
    """``model.fast_paths`` (the CPU fast paths' options) reaches the modules of the run's model: with
    ``mlp_chunk: 16`` the training step's MLP runs chunked (the chunked Function is called with 16 rows per step);
    with ``mlp_chunk: 0`` it never is. Checked through the trainer, not the config's field."""
    from mptkit.model import blocks
    from mptkit.train.trainer import Trainer
    from tests.helpers import TINY_MODEL, datasets, make_cfg

    seen = []
    real = blocks._ChunkedMLP.apply

    def spy(x, w_up, w_down, c):
        seen.append(c)
        return real(x, w_up, w_down, c)

    monkeypatch.setattr(blocks._ChunkedMLP, "apply", spy)
    model = {**TINY_MODEL, "fast_paths": {"mlp_chunk": chunk}}
    train, val = datasets()
    cfg = make_cfg(tmp_path, model=model, max_duration="2ba", save_folder=None, eval_interval="0ba")
    Trainer(cfg, train_dataset=train, eval_dataset=val).fit()
    assert (seen and set(seen) == {16}) if runs else not seen


def test_model_fast_paths_bad_keys_are_refused_before_any_work(tmp_path):
    from tests.helpers import TINY_MODEL, make_cfg

    with pytest.raises(ConfigError, match=r"fast_paths: unknown option\(s\) \['mlp_chunks'\]"):
        make_cfg(tmp_path, model={**TINY_MODEL, "fast_paths": {"mlp_chunks": 0}}).validate()
    with pytest.raises(ConfigError, match="mlp_chunk must be a whole number"):
        make_cfg(tmp_path, model={**TINY_MODEL, "fast_paths": {"mlp_chunk": -1}}).validate()
