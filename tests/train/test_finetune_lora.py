"""LoRA finetuning through the user's path: the bundled instruct-lora recipe (`mptkit train`), its adapter-only
checkpoints, `mptkit export hf --merge / --adapter-only`, `mptkit generate BASE --adapter RUN`, resuming against
another base, SIGKILL + autoresume bitwise, and the adapter's size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.cli import main
from mptkit.errors import EXIT_NOT_RETRYABLE
from mptkit.io.adapter import is_adapter_folder
from mptkit.io.source import open_model_source
from mptkit.model import MPTForCausalLM
from mptkit.train import checkpoint as ck
from tests.helpers import Spread, kill_after_checkpoint, model_folder

ROOT = Path(__file__).resolve().parents[2]


def _base(tmp: Path, tok: Path, name: str = "base", seed: int = 5) -> Path:
    return model_folder(tmp / name, tok, seed=None, spread=Spread(std=0.3, seed=seed), max_seq_len=128)


def _data(tmp: Path) -> Path:
    from mptkit.data.finetune import builtin_records

    data = tmp / "data"
    data.mkdir()
    for split, n in (("train", 48), ("test", 8)):
        recs = [r for _, r in builtin_records("mptkit:stdlib-instruct", split)[:n]]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data


@pytest.mark.slow
def test_instruct_lora_recipe_trains_exports_merges_and_generates(tmp_path, make_tokenizer, capsys):
    tok = make_tokenizer()
    base = _base(tmp_path, tok)
    run = tmp_path / "run"
    over = [f"variables.base={base}", f"variables.data={_data(tmp_path)}", f"save_folder={run / 'checkpoints'}",
            f"run_folder={run}", f"export_folder={run / 'hf'}", "progress_bar=false", "torch_threads=1",
            "peak_tflops=1.0", "max_duration=4ba", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "save_interval=2ba", "eval_first=false", "activation_checkpointing=true", "scheduler.t_warmup=1ba"]
    recipe = str(ROOT / "configs" / "finetune" / "instruct-lora.yaml")
    base_bytes = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    assert main(["train", recipe, *over]) == 0
    # checkpoints and the export hold the adapter only (peft's files), the base's reference and fingerprint
    last = ck.find_latest_checkpoint(run / "checkpoints")
    assert last.name.endswith("-ba4")
    for folder in (last / "model", run / "hf"):
        assert is_adapter_folder(folder) and not (folder / "model.safetensors").exists(), folder
        meta = json.loads((folder / "mptkit_adapter.json").read_text())
        assert meta["base_folder"] == str(base.resolve()) and meta["base_fingerprint"].startswith("sha256:")
    sd = load_file(str(run / "hf" / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k for k in sd) and len(sd) == 2 * 4 * 2
    assert max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k) > 0  # it trained
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == base_bytes  # base untouched
    st = torch.load(last / "trainer_state.pt", weights_only=True)
    n_adapter = sum(v.numel() for v in sd.values())
    assert sum(s["exp_avg"].numel() for s in st["optimizer"]["state"].values()) == n_adapter  # adapter state only

    # export hf --merge: a plain model folder equal to base + adapter; --adapter-only: peft's files
    assert main(["export", "hf", str(run), str(tmp_path / "merged"), "--merge"]) == 0
    assert main(["export", "hf", str(run), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert is_adapter_folder(tmp_path / "adapter") and (tmp_path / "adapter" / "tokenizer.json").is_file()
    merged = MPTForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with open_model_source(base, adapter=tmp_path / "adapter") as src:
        unmerged = src.load_model().eval()
    plain = MPTForCausalLM.from_pretrained(base).eval()
    x = torch.randint(0, 400, (2, 40))
    with torch.no_grad():
        a, b, c = merged(x).logits, unmerged(x).logits, plain(x).logits
    assert (a - c).abs().max() > 1e-3  # the adapter is in the merged weights
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    assert main(["export", "hf", str(run), str(tmp_path / "x")]) == 2  # a LoRA run needs --merge / --adapter-only
    assert "--merge" in capsys.readouterr().err

    # generate: BASE --adapter RUN (unmerged, through the generator) gives the merged model's greedy tokens
    gen = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"]
    capsys.readouterr()
    assert main(["generate", str(base), "--adapter", str(run), *gen]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), *gen]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["generate", str(run), *gen]) == 0  # the run itself: its base with the adapter
    assert capsys.readouterr().out == with_adapter

    # resuming against another base: refused, naming what to change
    other = _base(tmp_path, tok, name="other", seed=6)
    over2 = [o for o in over if not o.startswith(("variables.base=", "max_duration="))]
    assert main(["train", recipe, *over2, f"variables.base={other}", "max_duration=6ba"]) == EXIT_NOT_RETRYABLE
    err = capsys.readouterr().err
    assert "trained on another base model" in err and "pretrained_model_name_or_path changed" in err


SCRIPT = r"""
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
model = {{"pretrained_model_name_or_path": sys.argv[2], "pretrained": True,
         "peft_config": {{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}}}}
cfg = make_cfg(tmp, model=model, max_duration="24ba", save_interval="4ba", autoresume=True,
               save_num_checkpoints_to_keep=2, activation_checkpointing=True, optimizer={{"name": "decoupled_adamw",
               "lr": 1e-2}})
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def _run(folder: Path, base: Path, kill_after_step: int | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), str(folder), str(base)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_step is None:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        return err.decode()
    kill_after_checkpoint(p, folder / "ck", kill_after_step)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the process finished before it could be killed: make the run longer"
    return ""


@pytest.mark.slow
def test_lora_sigkill_then_autoresume_is_bitwise_identical(tmp_path):
    """Grad accumulation (microbatch 4 of 8), activation checkpointing and adapter dropout; kill -9 after the
    step-8 checkpoint, rerun: the adapter equals the uninterrupted run's bit for bit."""
    from tests.helpers import TINY_MODEL

    base = model_folder(tmp_path / "base", None, seed=3, spread=None, **{k: v for k, v in TINY_MODEL.items()
                                                                        if k != "name"})
    _run(tmp_path / "full", base)
    _run(tmp_path / "killed", base, kill_after_step=8)
    before = ck.find_latest_checkpoint(tmp_path / "killed" / "ck")
    assert before is not None and int(before.name.split("-ba")[1]) < 24
    log = _run(tmp_path / "killed", base)
    assert f"resumed from {before}" in log, log[-2000:]
    a = load_file(str(ck.find_latest_checkpoint(tmp_path / "full" / "ck") / "model" / "adapter_model.safetensors"))
    last = ck.find_latest_checkpoint(tmp_path / "killed" / "ck")
    assert last.name.endswith("-ba24")
    b = load_file(str(last / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_adapter_file_is_under_5_percent_of_the_quickstart_model_at_r8(tmp_path):
    from mptkit.io.adapter import save_adapter
    from mptkit.model.lora import LoraSettings, apply_lora

    cfg = MPTForCausalLM("mpt-tiny").config.replace(vocab_size=4096, max_seq_len=128)  # the quickstart model
    model = MPTForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, LoraSettings.from_dict({"r": 8}))
    save_adapter(model, tmp_path / "ad")
    size = (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    base = (tmp_path / "base" / "model.safetensors").stat().st_size
    assert size < 0.05 * base, (size, base)


@pytest.mark.parametrize("recipe", ["instruct-lora", "chat-lora"])
def test_bundled_lora_recipes_are_valid(recipe, caplog):
    """By name (package data) and by path: every key known (no warning), LoRA settings valid, the same data and
    packing as the full-finetune recipe they extend; a bad peft_config is refused before any work."""
    import logging

    from mptkit.errors import ConfigError
    from mptkit.model.lora import DEFAULT_TARGETS, LoraSettings
    from mptkit.train.config import load_run_config
    from mptkit.train.recipe_data import _finetune_options, finetune_source

    with caplog.at_level(logging.WARNING, logger="mptkit.train.config"):
        cfg = load_run_config(recipe)
    assert caplog.records == []
    s = LoraSettings.from_dict(cfg.model["peft_config"])
    assert s.r == 8 and s.target_modules == DEFAULT_TARGETS
    ds = cfg.train_loader["dataset"]
    assert finetune_source(ds, "train_loader", "train") == f"mptkit:stdlib-{recipe.split('-')[0]}"
    assert _finetune_options(ds, cfg, "train_loader").packing
    path = ROOT / "configs" / "finetune" / f"{recipe}.yaml"
    with pytest.raises(ConfigError, match="model.peft_config: unknown key 'rank'"):
        load_run_config(path, ["model.peft_config.rank=4"])
    load_run_config(path, ["fsdp_config.sharding_strategy=FULL_SHARD"])  # LoRA under FSDP2 (test_finetune_lora_fsdp)
    with pytest.raises(ConfigError, match="peft_config with fsdp_config.state_dict_type"):
        load_run_config(path, ["fsdp_config.state_dict_type=sharded"])


DDP_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
model = {{"pretrained_model_name_or_path": sys.argv[2], "pretrained": True,
         "peft_config": {{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}}}
cfg = make_cfg(tmp, model=model, max_duration="4ba", save_interval="4ba", device_train_microbatch_size=2,
               device="cpu", optimizer={{"name": "decoupled_adamw", "lr": 1e-2}})
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


@pytest.mark.slow
def test_lora_two_gloo_ranks_match_one_process(tmp_path):
    """DDP (2 gloo ranks) reduces the adapters' gradients only: the adapter equals one process's with the same
    global batch (to float rounding), and the checkpoint still holds the adapter alone."""
    import socket

    from tests.helpers import TINY_MODEL

    base = model_folder(tmp_path / "base", None, seed=3, spread=None, **{k: v for k, v in TINY_MODEL.items()
                                                                        if k != "name"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = DDP_SCRIPT.format(root=str(ROOT))
    one = subprocess.run([sys.executable, "-c", code, str(tmp_path / "one"), str(base)], env=env,
                         capture_output=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        e = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "two"), str(base)], env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    a = load_file(str(tmp_path / "one" / "ck" / "ep0-ba4" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ck" / "ep0-ba4" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and not (tmp_path / "two" / "ck" / "ep0-ba4" / "model" / "model.safetensors").exists()
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
