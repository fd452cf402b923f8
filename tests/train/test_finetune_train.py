"""Finetuning end to end: `mptkit train` with ``train_loader.name: finetuning`` starts from an HF model
folder (its tokenizer), learns chat answers from ChatML examples, evaluates on the responses only, exports;
the exported model then answers those conversations through the same ChatML prompt `mptkit chat` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mptkit.cli import main

QA = [("colour of the sky?", "blue"), ("two plus two?", "four"), ("capital of France?", "Paris"),
      ("opposite of hot?", "cold")]


def _base_model(tmp: Path, tok_folder: Path) -> Path:
    """A random-init tiny MPT saved as an HF folder, with the tokenizer beside it."""
    from tests.helpers import model_folder

    return model_folder(tmp / "base", tok_folder, seed=None, spread=None, max_seq_len=128)


def _recipe(tmp: Path, base: Path, **over) -> Path:
    data = tmp / "chat"
    data.mkdir(exist_ok=True)
    conv = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    (data / "test.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv[:2]))
    d = {
        "max_seq_len": 64,
        "model": {"name": "mpt_causal_lm", "pretrained_model_name_or_path": str(base), "pretrained": True},
        "train_loader": {"name": "finetuning", "dataset": {
            "hf_name": str(data), "split": "train", "max_seq_len": "${max_seq_len}", "shuffle": True,
            "system_prompt": None, "allow_pad_trimming": True, "decoder_only_format": True}},
        "eval_loader": {"name": "finetuning", "dataset": {"hf_name": str(data), "split": "test",
                                                          "max_seq_len": "${max_seq_len}", "system_prompt": None}},
        "max_duration": "60ba", "global_train_batch_size": 4, "device_train_microbatch_size": 4,
        "optimizer": {"name": "decoupled_adamw", "lr": 5e-3, "weight_decay": 0.0},
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "5ba"},
        "eval_interval": "30ba", "eval_first": True, "save_interval": "30ba",
        "save_folder": str(tmp / "run" / "ck"), "run_folder": str(tmp / "run"),
        "export_folder": str(tmp / "run" / "hf"), "progress_bar": False, "peak_tflops": 1.0, "torch_threads": 1,
        "seed": 3,
    }
    d.update(over)
    p = tmp / "chat.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_chat_finetune_learns_the_answers(tmp_path, make_tokenizer):
    base = _base_model(tmp_path, make_tokenizer())
    assert main(["train", str(_recipe(tmp_path, base))]) == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval_tokens"' in line]
    assert evals[0]["eval_loss"] > 2.0 > evals[-1]["eval_loss"], evals  # learned the held-in answers
    # eval counts response tokens only (the answer and <|im_end|>), not the prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    want = sum(len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for _, a in QA[:2])
    assert evals[-1]["eval_tokens"] == want
    # the training side counts the positions that carried loss: 60 steps over the 4 examples' answers; and,
    # as llm-foundry counts tokens, the samples' non-padding tokens (each step is the 4 examples here)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line]
    per_epoch = sum(len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for _, a in QA)
    from mptkit.data.finetune import FinetuneOptions, build_finetune_dataset

    ds = build_finetune_dataset(tmp_path / "chat" / "train.jsonl", tok, FinetuneOptions(max_seq_len=64,
                                                                                          system_prompt=None))
    real = int((ds.input_ids != tok.pad_token_id).sum())  # padding is the pad token, never in the text
    assert 0 < real < 4 * 64 and ds.token_count == real
    assert steps[-1]["target_tokens"] == 60 * per_epoch and steps[-1]["tokens"] == 60 * real

    from mptkit.infer import Generator, SamplingParams
    from mptkit.model import MPTForCausalLM
    from mptkit.prompts import IM_END, render_chatml

    model = MPTForCausalLM.from_pretrained(run / "hf")
    gen = Generator(model, AutoTokenizer.from_pretrained(str(run / "hf")))
    prompts = [render_chatml([{"role": "user", "content": q}]) for q, _ in QA]
    outs = gen.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, stop=[IM_END]))
    assert [o.text for o in outs] == [a for _, a in QA]


def test_finetune_recipe_errors_name_the_key(tmp_path, make_tokenizer, capsys):
    base = _base_model(tmp_path, make_tokenizer())
    cases = [
        ({"train_loader": {"name": "finetuning", "dataset": {"split": "train"}}}, "train_loader.dataset.hf_name"),
        ({"train_loader": {"name": "finetuning", "dataset": {"hf_name": "x", "target_respones": "all"}}},
         "did you mean 'train_loader.dataset.target_responses'"),
        ({"train_loader": {"name": "finetuning", "dataset": {"hf_name": "x", "decoder_only_format": False}}},
         "decoder_only_format"),
        ({"train_loader": {"name": "instruct", "dataset": {"hf_name": "x"}}}, "'text'.*'finetuning'"),
        ({"train_loader": {"name": "finetuning", "dataset": {"hf_name": str(tmp_path / "missing.jsonl")}}},
         "missing.jsonl: no such file"),
    ]
    for over, msg in cases:
        assert main(["train", str(_recipe(tmp_path, base, **over))]) != 0
        err = capsys.readouterr().err
        import re

        assert re.search(msg, err), (msg, err)


@pytest.mark.parametrize("recipe", ["instruct", "chat", "storywriter"])
def test_bundled_finetune_recipes_are_valid(recipe):
    """The bundled recipes parse and validate (every key known, loaders well formed), and their data sections
    resolve: the finetuning ones to a source and options, StoryWriter to prepared text in longer samples than
    its base model was trained with."""
    from mptkit.train.config import load_run_config
    from mptkit.train.recipe_data import _finetune_options, finetune_source

    root = Path(__file__).resolve().parents[2]
    cfg = load_run_config(root / "configs" / "finetune" / f"{recipe}.yaml")
    ds = cfg.train_loader["dataset"]
    assert cfg.model["pretrained"] is True and cfg.model["pretrained_model_name_or_path"]
    if cfg.train_loader["name"] == "finetuning":
        assert finetune_source(ds, "train_loader", "train") == f"mptkit:stdlib-{recipe}"
        opts = _finetune_options(ds, cfg, "train_loader")
        assert opts.max_seq_len == cfg.max_seq_len and opts.packing
        # what packing with sequence ids does to the trained model: tests/test_finetune_recipes.py
    else:
        assert cfg.data_prep and ds["local"] and cfg.model["max_seq_len"] == cfg.max_seq_len >= 1024
        # what it trains and exports: tests/test_finetune_recipes.py (StoryWriter past the base's context)


def test_token_durations_and_rates_count_non_padding_tokens(tmp_path, make_tokenizer):
    """As llm-foundry counts tokens for finetuning data (non-padding ones): ``max_duration: Ntok`` becomes
    steps through the data's non-padding tokens per sample, and ``tokens`` sums the batches' real lengths —
    3 epochs' worth of tokens is 3 epochs of steps and exactly 3x the data's tokens; MFU still counts every
    position computed (padding included, after pad trimming)."""
    from mptkit.data.finetune import FinetuneOptions, build_finetune_dataset
    from mptkit.io import load_tokenizer
    from mptkit.train.trainer import Trainer
    from tests.helpers import TINY_MODEL, make_cfg

    tok = load_tokenizer(make_tokenizer())
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA))
    ds = build_finetune_dataset(f, tok, FinetuneOptions(max_seq_len=32, allow_pad_trimming=True))
    assert ds.token_count == int((ds.input_ids != tok.pad_token_id).sum()) < 4 * 32
    cfg = make_cfg(tmp_path, model={**TINY_MODEL, "vocab_size": len(tok)}, max_duration=f"{3 * ds.token_count}tok",
                   global_train_batch_size=2, device_train_microbatch_size=2, save_folder=None)
    t = Trainer(cfg, train_dataset=ds)
    summary = t.fit()
    assert t.max_steps == 6 and summary["steps"] == 6  # 2 batches per epoch, 3 epochs
    assert summary["tokens"] == 3 * ds.token_count
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    widths = {r["step"]: r for r in recs if "train_loss" in r}
    assert all(0 < r["mfu"] for r in widths.values())
    w = t._step_width
    assert w < 32 and w % 8 == 0  # the last batch was cut to its longest sample (a multiple of 8)
    assert t._flops_per_batch(w) < t._flops_per_batch()
