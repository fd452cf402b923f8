"""`mptkit train` end to end on a tiny corpus: data_prep (tokenizer + shards on first use), train, eval,
export, sample; the run folder's config and metrics; tokenizer/data mismatches; `mptkit plot`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from mptkit.cli import main
from mptkit.errors import EXIT_NOT_RETRYABLE


def _corpus(folder: Path) -> Path:
    import argparse
    import textwrap

    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(inspect.getsource(m) for m in (json, textwrap, argparse)).splitlines(keepends=True)
    for i in range(0, len(lines), 40):  # many small documents, so the val split gets some
        (folder / f"m{i:05d}.py").write_text("".join(lines[i:i + 40]))
    return folder


def _recipe(tmp: Path, **over) -> Path:
    d = {
        "variables": {"cache": str(tmp / "cache")},
        "max_seq_len": 32,
        "model": {"name": "mpt_causal_lm", "d_model": 32, "n_heads": 2, "n_layers": 2, "expansion_ratio": 4,
                  "max_seq_len": "${max_seq_len}", "vocab_size": 384, "learned_pos_emb": False,
                  "attn_config": {"alibi": True}},
        "tokenizer": {"name": "${variables.cache}/tok"},
        "data_prep": {"inputs": [str(tmp / "corpus")], "vocab_size": 384, "val_fraction": 0.2},
        "train_loader": {"name": "text", "dataset": {"local": "${variables.cache}/data", "split": "train",
                                                     "shuffle": True, "max_seq_len": "${max_seq_len}"}},
        "eval_loader": {"name": "text", "dataset": {"local": "${variables.cache}/data", "split": "val"}},
        "max_duration": "6ba", "global_train_batch_size": 8, "device_train_microbatch_size": 4,
        "eval_interval": "3ba", "eval_subset_num_batches": 2, "save_interval": "3ba",
        "save_folder": str(tmp / "runs" / "{run_name}" / "ck"), "run_folder": str(tmp / "runs" / "tiny"),
        "export_folder": str(tmp / "runs" / "tiny" / "hf"), "sample_prompt": "def ", "sample_max_new_tokens": 8,
        "autoresume": True, "progress_bar": False, "peak_tflops": 1.0, "torch_threads": 1,
    }
    d.update(over)
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


@pytest.mark.slow
def test_train_cli_end_to_end(tmp_path, capsys):
    """First run prepares tokenizer + data and trains; a rerun resumes the finished run (no new steps);
    the run folder has config.yaml, metrics.jsonl, summary.json; the HF export loads with its tokenizer."""
    _corpus(tmp_path / "corpus")
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "model (HF folder)" in out and "sample:" in out
    run = tmp_path / "runs" / "tiny"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_name"] == "tiny" and saved["model"]["max_seq_len"] == 32  # interpolated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_loss"] is not None
    assert (tmp_path / "cache" / "tok" / "tokenizer.json").exists()
    assert (tmp_path / "runs" / "tiny" / "ck" / "ep0-ba6" / "model" / "tokenizer.json").exists()
    from mptkit.io import load_tokenizer
    from mptkit.model import MPTForCausalLM

    m = MPTForCausalLM.from_pretrained(run / "hf")
    assert load_tokenizer(run / "hf") is not None and m.config.vocab_size == 384
    # rerun: autoresume finds the finished run; nothing more to train
    assert main(["train", str(recipe)]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith("ep0-ba6")
    # a different tokenizer than the one the data was prepared with
    _corpus(tmp_path / "corpus2")
    (tmp_path / "corpus2" / "extra.py").write_text("x = 1\n" * 50)
    from mptkit.data.tokenizer import train_tokenizer

    train_tokenizer([str(tmp_path / "corpus2" / "extra.py")], 320, tmp_path / "tok2")
    r2 = _recipe(tmp_path, tokenizer={"name": str(tmp_path / "tok2")}, data_prep=None,
                 run_folder=str(tmp_path / "runs" / "mismatch"), save_folder=None)
    assert main(["train", str(r2)]) == EXIT_NOT_RETRYABLE
    assert "tokenizer mismatch" in capsys.readouterr().err
    # data prepared with another max_seq_len
    r3 = _recipe(tmp_path, max_seq_len=16, data_prep=None, save_folder=None, run_folder=str(tmp_path / "r3"))
    assert main(["train", str(r3)]) == EXIT_NOT_RETRYABLE
    assert "max_seq_len 16 does not match" in capsys.readouterr().err


def test_train_cli_user_errors_are_one_line(tmp_path, capsys):
    """A missing data folder, a typo'd key and a missing recipe each print one actionable error line."""
    r = _recipe(tmp_path, data_prep=None)
    assert main(["train", str(r)]) == EXIT_NOT_RETRYABLE
    err = capsys.readouterr().err
    assert "does not exist" in err and "mptkit data prepare" in err and "Traceback" not in err
    assert main(["train", str(r), "global_train_batch_sise=4"]) == EXIT_NOT_RETRYABLE
    assert "did you mean 'global_train_batch_size'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == EXIT_NOT_RETRYABLE
    assert "no such recipe" in capsys.readouterr().err
    assert main(["train", str(r), "--print-config"]) == 0
    assert "global_train_batch_size: 8" in capsys.readouterr().out


def test_plot_writes_png(tmp_path):
    """`mptkit plot RUN` draws loss / lr / throughput from metrics.jsonl into a PNG."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": i, "train_loss": 5 - i * 0.1, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.3} for i in range(1, 20)]
    recs.append({"step": 19, "eval_loss": 3.0, "eval_perplexity": 20.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken")
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
